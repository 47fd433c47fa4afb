"""Launching ranks with torchrun semantics, and the multi-node command lines.

Single node, no torchrun (no RANK in the environment): ``spawn_local`` starts ``world_size`` processes
``python -m runtime.launch JOB.json`` with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR=127.0.0.1 / a free
MASTER_PORT / OMP_NUM_THREADS=1, as torchrun would. If one rank fails, the survivors (blocked in a collective)
are killed at once and its one-line error is raised as ``RankFailed``; its traceback is in its log file. Every
process group also carries a timeout, so a lost rank cannot hang the others forever.

Multi-node: ``launch_commands`` gives the torchrun and srun lines, e.g. for 16 GPUs on 8-GPU nodes::

    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 \\
        --rdzv-id=mpplan --no-python mpplan run plan.json
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from planner.plan import Plan

REPO_ROOT = Path(__file__).resolve().parents[1]  # so spawned ranks import this checkout's packages
KILL_GRACE_S = 5.0  # after SIGTERM, how long a survivor may take to exit before SIGKILL
FAILURE_GRACE_S = 2.0  # after a first rank fails, how long to let the others report before stopping them
# what a rank reports when a peer died rather than for a reason of its own (gloo / NCCL wording)
_PEER_FAILURE_MARKS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


class RankFailed(RuntimeError):
    """A rank raised or died; ``message`` is its one-line error, ``log_path`` holds its traceback."""

    def __init__(self, rank: int, message: str, log_path: Path | None):
        self.rank, self.message, self.log_path = rank, message, log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"rank {rank} failed: {message}{where}")


@dataclass
class Job:
    """Everything a rank needs, written to JSON for spawned ranks."""

    plans: list[str]
    """plan.json texts, run one after another in the same process group (tests group several checks)."""
    steps: int = 10
    seed: int = 0
    data: str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    device: str = "cpu"
    """cpu (gloo) or cuda (nccl)."""
    result_path: str = ""
    """Where rank 0 writes the list of run reports."""
    pg_timeout_s: float = 600.0
    """Timeout of every collective (init_process_group(timeout=...)): a rank that stops answering fails its
    peers after this long. Generous by default: ranks building a large stage reach their first collective late."""
    fail_rank: int | None = field(default=None)
    """Fault injection for tests: this rank raises before training."""


def run_rank(job: Job, teardown: bool = True) -> list[dict] | None:
    """One rank of a job, inside torchrun or a spawned process: init the process group, train each plan;
    rank 0 returns (and writes to job.result_path) the reports. teardown=False leaves the process group to
    the process's exit (spawned workers, see _worker_main)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from planner.plan import Plan as PlanModel
    from runtime.train import RunSettings, train_plan

    torch.set_num_threads(1)  # one thread per rank: 2 threads made 8-rank DDP 20x slower here (facts file)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if job.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=job.pg_timeout_s))
    rank = dist.get_rank()
    if job.fail_rank == rank:
        raise RuntimeError(f"injected failure on rank {job.fail_rank}")
    settings = RunSettings(steps=job.steps, seed=job.seed, data=job.data, lr=job.lr, weight_decay=job.weight_decay)
    reports = [train_plan(PlanModel.model_validate_json(text), settings, device) for text in job.plans]
    # on failure the process group is left as is: the rank exits, and its peers see the closed connection
    if rank == 0 and job.result_path:  # the results are safe before any teardown
        tmp = Path(job.result_path + ".tmp")
        tmp.write_text(json.dumps(reports))
        tmp.replace(job.result_path)
    dist.barrier()
    if teardown:
        dist.destroy_process_group()
    return reports if rank == 0 else None


def free_port() -> int:
    """A free TCP port on the loopback for a local rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_line(log_path: Path, code: int | None) -> str:
    error_file = log_path.with_suffix(".error")
    if error_file.exists():
        return error_file.read_text().strip()
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name} (no Python error)"
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()] if log_path.exists() else []
    return lines[-1].strip() if lines else f"exited with code {code} without output"


def _culprit(codes: list[int | None], logs: list[Path]) -> int:
    """The rank that failed first for its own reason: a rank killed by a signal or with a Python error that is
    not a peer's broken connection, earliest error first; peers' "connection closed" errors come last."""
    def key(rank: int) -> tuple[bool, float]:
        error_file = logs[rank].with_suffix(".error")
        if not error_file.exists():
            return (False, 0.0)  # died without reporting (a signal): the likeliest cause
        victim = any(m in error_file.read_text() for m in _PEER_FAILURE_MARKS)
        return (victim, error_file.stat().st_mtime)

    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    return min(failed, key=key)


def _wait_for_exits(procs: list[subprocess.Popen], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def spawn_local(job: Job, world_size: int, log_dir: Path | None = None, timeout_s: float | None = None) -> list[dict]:
    """Run ``job`` on ``world_size`` local ranks and return rank 0's reports; RankFailed if any rank fails
    (or the whole run exceeds ``timeout_s``)."""
    own_dir = log_dir is None  # a temp directory of our own is removed after a clean run, kept after a failure
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="mpplan-run-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = log_dir / "job.json", log_dir / "result.json"
    job = Job(**{**asdict(job), "result_path": str(result_path)})
    job_path.write_text(json.dumps(asdict(job)))
    result_path.unlink(missing_ok=True)
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(world_size):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                   "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
            log = log_dir / f"rank{rank}.log"
            log.with_suffix(".error").unlink(missing_ok=True)
            logs.append(log)
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "runtime.launch", str(job_path)], env=env,
                                              stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd()))
        start = time.monotonic()
        while True:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                _wait_for_exits(procs, FAILURE_GRACE_S)
                codes = [p.poll() for p in procs]
                _stop(procs)
                rank = _culprit(codes, logs)
                raise RankFailed(rank, _error_line(logs[rank], codes[rank]), logs[rank])
            if all(c == 0 for c in codes):
                break
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                _stop(procs)
                raise RankFailed(0, f"run exceeded {timeout_s:.0f} s and was stopped", logs[0])
            time.sleep(0.05)
    finally:
        _stop(procs)
    reports = json.loads(result_path.read_text())
    if own_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    return reports


def launch_commands(plan: Plan, plan_path: str) -> list[str]:
    """The torchrun line for each node and an srun line for SLURM, from the cluster's GPUs per node."""
    nodes = plan.cluster.num_nodes
    per_node = min(plan.cluster.gpus_per_node, plan.parallel.world_size)
    command = f"--no-python mpplan run {plan_path}"
    if nodes == 1:
        return [f"torchrun --standalone --nproc-per-node={per_node} {command}",
                f"srun --nodes=1 --ntasks=1 --gpus-per-node={per_node} "
                f"torchrun --standalone --nproc-per-node={per_node} {command}"]
    rdzv = "--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id=mpplan"
    torchrun = f"torchrun --nnodes={nodes} --nproc-per-node={per_node} {rdzv} {command}"
    # one torchrun per node; the first node of the allocation hosts the rendezvous
    srun = (f"srun --nodes={nodes} --ntasks-per-node=1 --gpus-per-node={per_node} bash -c "
            f"'MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) "
            f"torchrun --nnodes={nodes} --nproc-per-node={per_node} {rdzv} {command}'")
    return [torchrun, srun]


def one_line_error(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line`` of an exception, followed by its root cause's (torch's pipelining and DDP wrap the
    real error in one whose first line is blank)."""
    def line(e: BaseException) -> str:
        text = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    message = line(exc) if root is exc else f"{line(exc)} <- {line(root)}"
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _worker_main(job_path: str) -> int:
    rank = os.environ.get("RANK", "?")
    log_dir = Path(job_path).parent
    try:
        run_rank(Job(**json.loads(Path(job_path).read_text())), teardown=False)
    except BaseException as e:  # noqa: BLE001 - any failure of a rank is reported the same way
        (log_dir / f"rank{rank}.error").write_text(one_line_error(e) + "\n")
        traceback.print_exc()
        return 1
    # Done and results written: leave without running C++ destructors. gloo's background threads sometimes
    # abort the interpreter's teardown ("terminate called without an active exception", SIGABRT) after a
    # correct run (seen in about 1 run in 20 here, and once in 6 in the facts file).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
