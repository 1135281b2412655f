"""hostmem.keep_freed_memory: glibc malloc tuning (shard build, CPU training), applied once, can be switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from ctrpipe.hostmem import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("CTRPIPE_MALLOC_TUNING", None)
    if env_value is not None:
        env["CTRPIPE_MALLOC_TUNING"] = env_value
    # a fresh process: the setting is process-wide and cannot be undone
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux only")
def test_applied_once_on_linux() -> None:
    assert _run(None) in ("True True", "False False")   # False only on a libc without mallopt (musl)


def test_switched_off_by_the_environment() -> None:
    assert _run("0") == "False False"
