"""Shared by the shard build and CPU training: on Linux/glibc, keep freed memory inside the process.

glibc hands big freed blocks back to the OS (munmap, heap trim), so every step's multi-MB activations and
gradients are page-faulted in again. Raising the mmap and trim thresholds keeps those blocks for reuse, so
most of those faults go away. The shard build gains the same way on each chunk's arrays (figures in
benchmarks/RESULTS.md, under bench_shard.py).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_M_TRIM_THRESHOLD = -1     # mallopt parameter numbers from glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: blocks up to 32 MiB come from the reusable heap
TRIM_THRESHOLD = 1 << 30   # free heap top kept up to 1 GiB instead of 128 KiB
TOP_PAD = 64 << 20         # grow the heap in 64 MiB steps
ENV_OFF = "CTRPIPE_MALLOC_TUNING"   # set to 0 to leave the allocator alone

_applied = False


def _glibc(name: str, argtypes: list, restype: type) -> ctypes._CFuncPtr | None:
    """libc's function `name` on Linux unless CTRPIPE_MALLOC_TUNING=0; None where there is none (e.g. musl)."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_OFF, "1") == "0":
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process (it cannot be undone); True if the settings are in place.

    A no-op returning False off Linux, on a libc without `mallopt` (e.g. musl), or with CTRPIPE_MALLOC_TUNING=0.
    The cost: the process keeps its peak heap instead of returning it between steps.
    """
    global _applied
    if _applied:
        return True
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    if mallopt is None:
        return False
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    return _applied


def share_main_arena() -> bool:
    """Make threads that need a malloc arena from now on share the existing ones (glibc M_ARENA_MAX=1). True if
    set. `ctrpipe shard` calls it first thing, before polars and pyarrow start their threads (each would take an
    arena), so every glibc allocation of the build (numpy arrays, the kernels' outputs) comes from the main
    heap; polars and pyarrow keep their own buffers in their own allocators (jemalloc, mimalloc).

    With keep_freed_memory every arena keeps the peak of what its threads freed; the shard build allocates and
    frees chunk-sized arrays on several threads (transforms, statistics, writer, reader), so per-thread arenas
    make peak memory the sum of those peaks, and each arena faults its own pages in. One shared heap reuses
    whatever any thread freed (figures in benchmarks/RESULTS.md, under bench_shard.py). Called later, once other
    threads own arenas, new threads would take turns on those, busy ones included: measured slower in the
    `--workers` processes, which get one arena from their start instead (one_arena_for_children). Process-wide
    and permanent (glibc fixes the limit the first time a thread needs an arena); left alone where the user set
    MALLOC_ARENA_MAX or a glibc arena tunable, and with CTRPIPE_MALLOC_TUNING=0.
    """
    if _user_set_arenas():
        return False
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1


def _user_set_arenas() -> bool:
    """The user chose the arenas (MALLOC_ARENA_MAX or a glibc arena tunable): ctrpipe leaves them alone."""
    return "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", "")


@contextmanager
def one_arena_for_children() -> Iterator[None]:
    """Processes started inside the block (the build's `--workers`) begin with MALLOC_ARENA_MAX=1: what
    share_main_arena does for this process, from their first allocation, before any thread of theirs exists.

    A worker runs many tasks (files), each with new transform, reader and writer threads; with an arena per
    thread and keep_freed_memory, the arenas kept each task's freed peaks and a worker grew with its number of
    files (figures: benchmarks/RESULTS.md, bench_shard_workers.py). Set in this process's environment only for
    the block (glibc read it here at start-up: nothing changes for this process); left alone where the user set
    MALLOC_ARENA_MAX or a glibc arena tunable, with CTRPIPE_MALLOC_TUNING=0, and off glibc Linux.
    """
    key = "MALLOC_ARENA_MAX"
    if _user_set_arenas() or _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int) is None:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def release_free_heap() -> bool:
    """Hand the pages of the heap's free chunks back to the OS (glibc malloc_trim(0)); True if it ran. It runs
    only where keep_freed_memory applied its tuning: untuned, glibc gives freed memory back by itself.

    keep_freed_memory makes the heap keep a step's peak, and an evaluation's larger batch would then come on
    top of it: training releases it before each evaluation (the effect on peak RSS: benchmarks/RESULTS.md,
    "Memory plan"). The next steps fault those pages in again once.
    """
    trim = _glibc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    if trim is None or not _applied:
        return False
    trim(0)
    return True


def _status_bytes(field: str) -> int | None:
    """One kB figure of /proc/self/status (e.g. VmHWM) in bytes, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident bytes: VmHWM on Linux. Not `ru_maxrss`, which Linux carries over from the
    process image a child was forked from, so a run started from a large process (a notebook, a test runner)
    reported that process's peak instead of its own. `ru_maxrss` elsewhere (bytes on macOS, KiB on others)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # POSIX only, as the fallback's ru_maxrss

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def meminfo() -> dict[str, int]:
    """/proc/meminfo's figures in bytes (MemTotal, MemAvailable, ...); empty off Linux."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return info


def available_bytes() -> int | None:
    """Host memory a new allocation can still get without swapping (MemAvailable), or None off Linux; within a
    memory-limited cgroup (a container, a Slurm job, a Kubernetes pod) at most what its limit leaves: the
    kernel's OOM killer ends the process at the cgroup's limit, whatever the machine has free."""
    available = meminfo().get("MemAvailable")
    room = cgroup_room()
    return room if available is None else available if room is None else min(available, room)


_NO_LIMIT = 1 << 60         # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def cgroup_room(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup (and each cgroup above it) still allows: its limit less its usage
    that cannot be reclaimed (its clean page cache can, as MemAvailable counts it: a run's mapped shards);
    None without a limit or off Linux. Reads cgroup v2 (memory.max) and v1 (memory.limit_in_bytes); in a
    container the path /proc names may be the mount's root."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    rooms: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        v2 = parts[0] == "0" and parts[1] == ""
        if not v2 and "memory" not in parts[1].split(","):
            continue
        base = root if v2 else root / "memory"
        files = ("memory.max", "memory.current", "") if v2 else \
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_")
        rel = Path(parts[2].lstrip("/"))
        for folder in {base / p for p in (rel, *rel.parents)} | {base}:     # ancestors' limits apply too
            room = _cgroup_folder_room(folder, *files)
            if room is not None:
                rooms.append(room)
    return max(min(rooms), 0) if rooms else None


def _cgroup_folder_room(folder: Path, limit_name: str, usage_name: str, stat_prefix: str) -> int | None:
    try:
        text = (folder / limit_name).read_text().strip()
        if text == "max" or int(text) >= _NO_LIMIT:
            return None
        usage = int((folder / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    cache = 0           # clean file pages, active and inactive: reclaimable (dirty ones must be written first)
    signs = {"active_file": 1, "inactive_file": 1, "dirty": -1, "writeback": -1} if stat_prefix else \
        {"active_file": 1, "inactive_file": 1, "file_dirty": -1, "file_writeback": -1}
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            sign = signs.get(key.removeprefix(stat_prefix)) if key.startswith(stat_prefix) else None
            if sign is not None:
                cache += sign * int(value)
    except (OSError, ValueError):
        pass
    return int(text) - max(usage - max(cache, 0), 0)


def anon_rss() -> int | None:
    """This process's anonymous resident memory (RssAnon: heap, tensors, buffers), or None off Linux. The rest
    of RSS are mapped files: pages on disk, which the kernel drops and reads again, and tmpfs files (RssShmem:
    a shard cache put in /dev/shm is held by the tmpfs whether or not a run maps it)."""
    return _status_bytes("RssAnon")


class AnonPeak:
    """The peak of `anon_rss` while the block runs, sampled every `interval` seconds by a daemon thread
    (benchmarks/bench_plan.py samples every millisecond).

    `peak_rss` (VmHWM) also counts the file pages a process maps: a training run reads its shard cache through
    memory maps, so on a large cache that peak reads as about the cache's size, memory the kernel reclaims as
    it needs. This peak is the memory the run cannot give back. Sampled: a spike shorter than the interval
    may be missed. `peak` is None off Linux."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak: int | None = anon_rss()
        self._stop = threading.Event()
        self._lock = threading.Lock()          # the sampler thread and so_far's caller both update `peak`
        self._thread = threading.Thread(target=self._run, name="ctrpipe-anon-peak", daemon=True)

    def _sample(self) -> None:
        now = anon_rss()
        if now is not None:
            with self._lock:
                self.peak = max(self.peak or 0, now)

    def so_far(self) -> int | None:
        """The peak up to now, this moment included."""
        self._sample()
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> AnonPeak:
        if self.peak is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()


_FILES_UNLIMITED = 1 << 20
_RAISED_FILES = False


def open_file_limit(raise_soft: bool = False) -> int:
    """Files this process may hold open: the soft RLIMIT_NOFILE (1 << 20 when unlimited, 1024 where there is
    no `resource` module). With `raise_soft`, the soft limit is first raised towards the hard one (at most
    65,536), once per process, as many data tools do: memory maps each hold a descriptor, and the common
    default of 1,024 is reached by a cache of a few hundred shards."""
    global _RAISED_FILES
    try:
        import resource
    except ImportError:
        return 1024
    if raise_soft and not _RAISED_FILES:
        _RAISED_FILES = True
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            except (ValueError, OSError):
                pass                            # a container may forbid it: the soft limit stands
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _FILES_UNLIMITED if soft == resource.RLIM_INFINITY else int(soft)
