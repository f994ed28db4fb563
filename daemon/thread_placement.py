"""Which CPU each of the daemon's threads runs on, when ONNX Runtime's threads fill every core.

During a decode step ONNX Runtime keeps every core busy: the engine thread (its calling thread, which
runs its share of each large kernel and all the small single-threaded ones) and one pool thread per other
core, spinning between kernels. The event loop, the front door and gRPC's threads wake once or twice per
token, and wherever they land they preempt one of those. Preempting the engine thread stalls the step;
preempting a pool thread hardly does, because the engine thread takes over the pool thread's remaining
blocks of work (ONNX Runtime hands work out in small dynamic blocks). So the engine thread gets the first
allowed CPU to itself, the pool threads the others, and every other thread of the daemon shares the last
one with a pool thread. Measured on the int8 demo model, 2 cores, through the daemon: 1.05x the decode
tokens/s of unpinned threads (`engine.pin_threads: false` turns it off).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPlacement:
    engine_cpu: int
    worker_cpus: tuple[int, ...]  # one per ONNX Runtime pool thread
    service_cpu: int  # the event loop, front door, gRPC and tokenizer threads

    def onnxruntime_affinities(self) -> str:
        """The value of ONNX Runtime's session.intra_op_thread_affinities: 1-based processor ids, one per pool thread."""
        return ";".join(str(cpu + 1) for cpu in self.worker_cpus)


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (a container's or systemd's CPU set, not the machine's count)."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux: every CPU
        return list(range(os.cpu_count() or 1))
    return sorted(os.sched_getaffinity(0))


def plan_placement(threads: int, allowed: Iterable[int]) -> ThreadPlacement | None:
    """Placement of `threads` ONNX Runtime threads (the engine thread included) over the allowed CPUs; None
    where pinning does not fit: one thread, or fewer threads than CPUs (the spare CPUs take the rest)."""
    cpus = sorted(allowed)
    if threads < 2 or threads != len(cpus) or not hasattr(os, "sched_setaffinity"):
        return None
    return ThreadPlacement(cpus[0], tuple(cpus[1:]), cpus[-1])


def default_placement(threads: int) -> ThreadPlacement | None:
    """The daemon's placement for `threads` ONNX Runtime threads (0: one per allowed CPU) over this process's CPUs."""
    cpus = allowed_cpus()
    return plan_placement(threads or len(cpus), cpus)


def pin_current_thread(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})  # 0: the calling thread (Linux applies affinity per thread)


# Where the model's threads fill every core, each streamed message takes CPU from the step: 25 ms chunks win
# back most of it, while a person reading the text sees no difference (figures: docs/benchmarks.md).
CONTENDED_STREAM_INTERVAL_MS = 25


def auto_stream_interval_ms(step_threads: int, cpus: int) -> int:
    """generation.stream_interval_ms "auto": tokens batched CONTENDED_STREAM_INTERVAL_MS apart where a step's
    CPU threads (0 for a GPU backend) fill all `cpus` this process may use, else every token at once.

    Each streamed message costs gRPC's Python stack ~0.5 ms of CPU in the daemon; where the step's threads
    fill every core that CPU is taken from the step, while on a GPU or with a core to spare it costs no speed.
    """
    return CONTENDED_STREAM_INTERVAL_MS if step_threads and step_threads >= cpus else 0
