"""Peak memory of one rank, measured the way the planner predicts it: bytes held by torch's allocator.

CUDA: ``torch.cuda.max_memory_allocated``. CPU has no allocator statistics, so the meter runs torch.profiler
with ``profile_memory=True`` from before the model is built through the warm-up steps: every allocation and free
of torch's CPU allocator is then an event (c10's ProfiledCPUMemoryReporter), and replaying them gives the peak of
live tensor bytes, the CPU analogue of CUDA's max allocated. The profiler slows the steps it watches, so it is
stopped before the timed steps. Resident-set growth is not used: it also counts glibc's retained heap, Python
objects, gloo's buffers and the profiler's own events, none of which a tensor-level model predicts.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch._C._profiler import _ExperimentalConfig
from torch.profiler import ProfilerActivity, profile

from planner.quiet import fd_to_devnull


def peak_allocated_from_trace(events: list[dict]) -> int:
    """Peak of the bytes live in torch's CPU allocator, from a chrome trace's ``[memory]`` events (args:
    ``Addr``, ``Bytes``: + allocated, - freed), counted over the blocks allocated while the profiler watched.

    The events are replayed by address rather than read from their ``Total Allocated``: a block freed on a
    thread the profiler does not watch (a gloo worker dropping the last reference to a collective's buffer)
    has no free event and never leaves that running total. The allocator only hands an address out again
    once it is free, so a block allocated at a live address ends the earlier one there. A block whose address
    is not handed out again stays counted: the peak can only be over, not under (measured: DTensor's all-reduce
    outputs, a few % of a TP plan's peak)."""
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    live: dict[int, int] = {}
    now = peak = 0
    for e in mem:
        addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
        now -= live.pop(addr, 0)  # a free, or an allocation at an address whose free was not seen
        if nbytes > 0:
            live[addr] = nbytes
            now += nbytes
        peak = max(peak, now)
    return peak


class MemoryMeter:
    """Construct before the model is built, ``stop_watching()`` after the warm-up steps, then ``peak_bytes()``."""

    def __init__(self, device: torch.device):
        self.device = device
        self._peak: int | None = None
        self._profiler = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        config = _ExperimentalConfig(trace_only=True)  # the events are only exported: skip building Python's
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, experimental_config=config)
        with fd_to_devnull(2):  # kineto prints a line to fd 2 at every start and stop
            self._profiler.start()

    @property
    def kind(self) -> str:
        return ("cuda max allocated" if self.device.type == "cuda"
                else "peak bytes held by torch's CPU allocator over the first steps (torch.profiler memory events)")

    def stop_watching(self) -> None:
        if self._profiler is None or self._peak is not None:
            return
        with fd_to_devnull(2):  # kineto prints a line to fd 2 at every start and stop
            self._profiler.stop()
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            self._profiler.export_chrome_trace(str(trace))
            self._peak = peak_allocated_from_trace(json.loads(trace.read_text())["traceEvents"])
        self._profiler = None

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        self.stop_watching()
        return self._peak or 0
