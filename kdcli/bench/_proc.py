"""Peak memory of one piece of work: a child process's peak RSS, or a sampled RSS rise in this process.

CPU memory of PyTorch is not seen by ``tracemalloc`` (tensors are allocated in C++), and a process's
``ru_maxrss`` only ever grows, so one process cannot measure several runs one after the other. The clean
measure is one child process per run that reports its own :func:`peak_rss_mb` (``VmHWM`` of
``/proc/self/status``: the high-water mark of the child's own address space, started afresh by ``exec``).
The ``ru_maxrss`` that ``os.wait4`` returns for a child is *not* that: Linux carries the parent's RSS at
the fork into the child's counter, so it is only an upper bound (max of the parent's RSS and the child's
peak); :func:`run_child` returns it as a fallback. In-process (tests, quick looks) :class:`RssSampler`
samples ``/proc/self/statm`` and reports the rise of the resident set over its value at the start:
approximate (allocator caching, 20 ms sampling). CUDA runs report ``torch.cuda.max_memory_allocated``
instead (exact for tensors, resettable); :func:`tensor_peak_mb` is the CPU equivalent for a few steps
(``torch.profiler`` memory events), used by ``kdcli bench speed``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _maxrss_mb(ru_maxrss: int) -> float:
    # Linux reports KiB, macOS bytes
    return ru_maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """This process's resident set now (MB); the peak so far where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return _maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss_mb() -> float:
    """This process's peak resident set (MB) since its ``exec``: ``VmHWM``; ``ru_maxrss`` without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return _maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_child(argv: list[str], log_path: Path, env: dict[str, str] | None = None,
              timeout: float | None = None, stop: threading.Event | None = None) -> tuple[int, float]:
    """Run ``argv`` with stdout+stderr into ``log_path``; returns (exit code, ``ru_maxrss`` of the child in MB,
    an upper bound of its peak: see the module docstring). ``stop`` set (from another thread, which a Ctrl-C
    does not reach) kills the child like a timeout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if (deadline is not None and time.monotonic() > deadline) or (stop is not None and stop.is_set()):
                    proc.kill()
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.2)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM handler): the child must not outlive us
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, _maxrss_mb(usage.ru_maxrss)


def tail(path: Path, lines: int = 1) -> str:
    try:
        text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(text[-lines:])


@contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter), then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tensor_peak_mb(fn: Callable[[], object]) -> float:
    """Peak of the CPU tensor memory allocated by ``fn`` above what was held when it started (MB).

    From ``torch.profiler`` with ``profile_memory=True``: every allocation and free of a tensor is an event
    with its size; their running sum in time order peaks at the answer. Exact for tensors (the CPU analogue
    of ``torch.cuda.max_memory_allocated``), blind to non-tensor memory (oneDNN scratch, Python objects), and
    independent of how the allocator caches or returns pages — unlike an RSS rise."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_fd2():
            prof.stop()
    deltas = []
    for e in prof.events():
        # an operator's own allocations minus frees; "[memory]" records are frees/allocations outside operators
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start, d))
    deltas.sort(key=lambda x: x[0])
    total = peak = 0
    for _, d in deltas:
        total += d
        peak = max(peak, total)
    return peak / 2**20


class RssSampler:
    """Context manager: ``peak_mb`` = highest RSS seen while inside, minus the RSS on entry."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_mb())

    def __enter__(self) -> RssSampler:
        self.start = self.peak = current_rss_mb()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_mb())

    @property
    def peak_mb(self) -> float:
        return self.peak - self.start
