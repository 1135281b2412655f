"""hostmem.keep_freed_memory: glibc malloc tuning (shard build, CPU training), applied once, can be switched off.

Each check runs in a fresh process (the setting is process-wide and cannot be undone) and looks at what the
allocator then does, through glibc's own `mallinfo2` counters: a 16 MiB block must come from the heap, not
from its own mmap (M_MMAP_THRESHOLD), grow the heap by at least TOP_PAD more (M_TOP_PAD), and stay in the
heap when freed (M_TRIM_THRESHOLD).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ctrpipe.hostmem import MMAP_THRESHOLD, TOP_PAD

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
BLOCK = 16 << 20        # above glibc's default mmap threshold (128 KiB), below ours (32 MiB)
assert BLOCK < MMAP_THRESHOLD

PROBE = f"""
import ctypes, json
from ctrpipe.hostmem import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def info():
    m = libc.mallinfo2()
    return {{"arena": m.arena, "mmapped_blocks": m.hblks}}

applied = [keep_freed_memory(), keep_freed_memory()]
before = info()
block = libc.malloc({BLOCK})
during = info()
libc.free(block)
after = info()
print(json.dumps({{"applied": applied, "before": before, "during": during, "after": after}}))
"""


def _env(env_value: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CTRPIPE_MALLOC_TUNING", None)
    if env_value is not None:
        env["CTRPIPE_MALLOC_TUNING"] = env_value
    return env


def _probe(env_value: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=_env(env_value), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        return GLIBC and tuple(int(x) for x in platform.libc_ver()[1].split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


needs_glibc = pytest.mark.skipif(not _glibc_at_least(2, 33), reason="glibc >= 2.33 (mallopt, mallinfo2) only")


@needs_glibc
def test_tuning_is_applied_once_and_changes_what_malloc_does() -> None:
    r = _probe(None)
    assert r["applied"] == [True, True]
    before, during, after = r["before"], r["during"], r["after"]
    assert during["mmapped_blocks"] == before["mmapped_blocks"]        # from the heap, not its own mmap
    # the heap grew by the block plus the top pad, less the little its old free top already held
    assert during["arena"] - before["arena"] >= BLOCK + TOP_PAD - (1 << 20)
    assert after["arena"] == during["arena"]                            # freeing it did not trim the heap


@needs_glibc
def test_switched_off_leaves_glibc_defaults() -> None:
    """The probe tells the two apart: with the defaults the same block gets its own mmap."""
    r = _probe("0")
    assert r["applied"] == [False, False]
    assert r["during"]["mmapped_blocks"] == r["before"]["mmapped_blocks"] + 1
    assert r["during"]["arena"] - r["before"]["arena"] < BLOCK


def test_switched_off_by_the_environment() -> None:
    code = "from ctrpipe.hostmem import keep_freed_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], env=_env("0"), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


RELEASE_PROBE = f"""
import ctypes, json
from ctrpipe.hostmem import keep_freed_memory, release_free_heap

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

keep_freed_memory()
blocks = [libc.malloc({BLOCK}) for _ in range(8)]
for b in blocks:
    ctypes.memset(b, 1, {BLOCK})                 # written: resident
after_write = anon()
for b in blocks:
    libc.free(b)
after_free = anon()
released = release_free_heap()
print(json.dumps({{"written": after_write, "freed": after_free, "released": anon(), "ran": released}}))
"""


@needs_glibc
def test_release_free_heap_returns_what_the_tuned_heap_kept() -> None:
    """Training calls it before each evaluation: the freed blocks the tuning keeps resident go back to the OS."""
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=_env(None), capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout)
    assert r["ran"] is True
    assert r["written"] - r["freed"] < BLOCK                  # kept: freeing gave back (almost) nothing
    assert r["freed"] - r["released"] > 6 * BLOCK             # released: most of the 8 blocks' pages


@needs_glibc
def test_release_free_heap_leaves_an_untuned_heap_alone() -> None:
    """Without keep_freed_memory's tuning glibc already gives freed memory back: nothing to release."""
    probe = "from ctrpipe.hostmem import release_free_heap; print(release_free_heap())"
    out = subprocess.run([sys.executable, "-c", probe], env=_env(None), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


ARENA_PROBE = """
import ctypes, sys, threading
from ctrpipe.hostmem import share_main_arena

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
print(share_main_arena() if sys.argv[1] == "share" else None, flush=True)
held = []
threads = [threading.Thread(target=lambda: held.append(libc.malloc(1 << 20))) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc.malloc_stats()          # one 'Arena N:' block per arena, on stderr
"""


def _arenas(mode: str, env_value: str | None = None, **extra: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], env={**_env(env_value), **extra},
                         capture_output=True, text=True, check=True)
    return out.stdout.strip(), sum(line.startswith("Arena ") for line in out.stderr.splitlines())


@needs_glibc
def test_share_main_arena_puts_new_threads_on_the_main_heap() -> None:
    """The shard build's threads then reuse each other's freed chunk arrays; without it every thread that
    allocates gets an arena of its own, which keeps its own freed memory."""
    assert _arenas("share") == ("True", 1)
    default = _arenas("default")
    assert default[0] == "None" and default[1] > 1


@needs_glibc
def test_share_main_arena_leaves_a_user_setting_and_the_off_switch_alone() -> None:
    assert _arenas("share", MALLOC_ARENA_MAX="4")[0] == "False"
    assert _arenas("share", env_value="0")[0] == "False"


def test_peak_rss_is_this_processes_own_peak() -> None:
    """metrics.json's peak host memory was ru_maxrss, which Linux carries over from the process a child was
    forked from: `ctrpipe train` started from a 900 MB test runner reported 900 MB."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("VmHWM is Linux's")
    ballast = bytearray(400 << 20)                     # this process: at least 400 MB resident
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = ("import resource\nfrom ctrpipe.hostmem import peak_rss\n"
            "print(peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    own, inherited = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert own < 300 << 20, (own, inherited)         # ru_maxrss here: about the 400 MB of this process
    del ballast


def test_anon_peak_counts_what_the_run_holds_not_the_file_pages_it_maps(tmp_path: Path) -> None:
    """A training run reads its shard cache through memory maps: VmHWM counts the pages it touched (about
    the cache's size on a large cache), which the kernel reclaims; AnonPeak counts memory no file backs."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("RssAnon is Linux's")
    cache = tmp_path / "shard.npy"
    cache.write_bytes(b"\1" * (160 << 20))
    code = f"""
import mmap, time
import numpy as np
from ctrpipe.hostmem import AnonPeak, peak_rss
with AnonPeak(interval=0.01) as anon:
    start_hwm, start_anon = peak_rss(), anon.so_far()
    with open({str(cache)!r}, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        total = int(np.frombuffer(m, dtype=np.uint8)[::4096].sum())     # every page resident
        mapped_hwm, mapped_anon = peak_rss(), anon.so_far()
    held = np.ones(80 << 17)                                            # 80 MB of private memory for 0.2 s
    time.sleep(0.2)
    del held
print(start_hwm, start_anon, mapped_hwm, mapped_anon, anon.peak, total)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    start_hwm, start_anon, mapped_hwm, mapped_anon, peak = map(int, out[:5])
    assert mapped_hwm - start_hwm > 150 << 20                          # RSS counted the mapped file
    assert mapped_anon - start_anon < 20 << 20                          # the anonymous peak did not
    assert peak - start_anon > 75 << 20                                 # it saw the held array


def test_first_on_node_reads_torchrun_local_rank() -> None:
    """Errors every rank meets alike before the ranks join print on each machine's first process only; a
    LOCAL_RANK that is not a number above 0 prints too (the error may be about it)."""
    from ctrpipe.errors import first_on_node

    assert first_on_node({}) and first_on_node({"WORLD_SIZE": "1", "LOCAL_RANK": "3"})
    assert first_on_node({"WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    assert not first_on_node({"WORLD_SIZE": "4", "LOCAL_RANK": "2"})
    assert first_on_node({"WORLD_SIZE": "4", "LOCAL_RANK": "x"}) and first_on_node({"WORLD_SIZE": "4",
                                                                                    "LOCAL_RANK": "-1"})


def test_a_cgroup_limit_bounds_the_available_memory(tmp_path: Path) -> None:
    """A helper's sweep: under a 6 GB container limit `plan` said "fits" against the host's 24 GB free, and a
    run passed its memory check and was ended by the OOM killer with no word. The room a memory cgroup (and
    each one above it) leaves is read from its files, v2 and v1 layouts, reclaimable page cache not counted."""
    from ctrpipe.hostmem import cgroup_room

    gb = 1 << 30
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text(f"{6 * gb}\n")              # the job's limit, one level up
    (v2 / "job" / "memory.current").write_text(f"{2 * gb}\n")
    (v2 / "job" / "memory.stat").write_text(f"anon {gb}\nactive_file {gb // 2}\ninactive_file {gb // 2}\n"
                                           f"file_dirty {gb // 8}\nfile_writeback {gb // 8}\n")   # not reclaimable
    (v2 / "job" / "step" / "memory.max").write_text("max\n")
    (v2 / "job" / "step" / "memory.current").write_text(f"{gb}\n")
    (v2 / "cgroup").write_text("0::/job/step\n")
    assert cgroup_room(v2, v2 / "cgroup") == 6 * gb - (2 * gb - gb + gb // 4)
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{4 * gb}\n")
    (v1 / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text(f"{3 * gb}\n")
    (v1 / "memory" / "docker" / "abc" / "memory.stat").write_text(
        f"active_file 7\ntotal_active_file {gb // 4}\ntotal_inactive_file {gb // 4}\n")   # total_: the hierarchy's
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")   # no limit at the root
    (v1 / "cgroup").write_text("4:memory:/docker/abc\n3:cpu:/\n")
    assert cgroup_room(v1, v1 / "cgroup") == 4 * gb - (3 * gb - gb // 2)
    (v1 / "cgroup").write_text("4:memory:/\n")
    assert cgroup_room(v1, v1 / "cgroup") is None                    # no limit anywhere: the host's figure
    assert cgroup_room(v1, tmp_path / "missing") is None
