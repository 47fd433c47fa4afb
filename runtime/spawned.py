"""Run a measurement in spawned local processes and collect what they report over a queue.

The profiler's multi-process measurements (runtime/profile_comm.py, runtime/profile_tp.py,
runtime/profile_concurrent.py) share this loop: start one process per rank, hand every message to the caller
until it says the job is done, and turn a rank's error, a dead rank or a timeout into one RuntimeError.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from typing import Callable, Sequence


def report_failure(results, rank: int, error: Exception) -> None:
    """In a spawned process: send ``error`` as one line (with the failing source line) and exit 1;
    run_spawned raises it in the parent."""
    where = traceback.format_exc().strip().splitlines()[-2]
    results.put(("error", rank, f"{type(error).__name__}: {error} [{where}]"))
    raise SystemExit(1)


def report_and_leave(dist, results, rank: int, message: tuple) -> None:
    """In a spawned rank that is done: rank 0 sends ``message``, then every rank leaves the process group
    together (the barrier keeps rank 0's peers in the group until it has sent)."""
    if rank == 0:
        results.put(message)
    dist.barrier()
    dist.destroy_process_group()


def run_spawned(target: Callable[..., None], make_args: Callable[[mp.context.SpawnContext], Sequence[tuple]],
                what: str, timeout_s: float, on_message: Callable[[tuple], bool]) -> None:
    """Start ``target(*args, results)`` in one spawned process per tuple of ``make_args(ctx)`` (the context, for
    shared objects such as a Barrier). Each message a process puts on ``results`` goes to ``on_message``, which
    returns True once the job is complete; a message ``("error", rank, text)`` raises RuntimeError. Processes
    still alive 10 s after the end are terminated."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # held until the end: a shared object (a Barrier) in the arguments must outlive the processes' start-up, or
    # its semaphore is unlinked before a child can open it (FileNotFoundError there)
    arg_list = list(make_args(ctx))
    procs = [ctx.Process(target=target, args=(*args, results), daemon=True) for args in arg_list]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{what} process died with exit code {dead[0].exitcode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not finish in {timeout_s:.0f} s") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"{what} rank {msg[1]} failed: {msg[2]}")
            if on_message(msg):
                return
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
