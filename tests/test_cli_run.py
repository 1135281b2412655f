"""cli._run, the boundary that turns a stage's failures into messages and exit codes, on stages that fail the
ways libraries do."""

from __future__ import annotations

import os
import signal
import time

import pytest
import typer

from ctrpipe.cli import _run


def _swallowing_stage() -> None:
    """As polars does when Ctrl-C arrives inside its call: the KeyboardInterrupt becomes another error."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)                          # the handler runs here
    except KeyboardInterrupt:
        raise TypeError("'<unprintable str object>' is not a Polars data type") from None


def _buggy_stage() -> None:
    raise TypeError("a bug")


def test_ctrl_c_that_a_library_turned_into_another_error_is_an_interruption(capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C during `shard --force` ended once in about 100 tries in polars' TypeError traceback."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)     # as in a terminal
    try:
        with pytest.raises(typer.Exit) as exc:
            _run(_swallowing_stage, interrupted_note="run it again")
        assert exc.value.exit_code == 130
        assert "interrupted" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler        # put back
        with pytest.raises(TypeError, match="a bug"):                               # no Ctrl-C: a bug
            _run(_buggy_stage)
    finally:
        signal.signal(signal.SIGINT, previous)


def _stage_whose_stop_lands_in_a_weakref_callback() -> str:
    """The signal's KeyboardInterrupt raised inside a garbage collector's weakref callback, where Python prints
    "Exception ignored in ..." and goes on: `report` then finished with exit 0."""
    import weakref

    class Node:
        pass

    node = Node()
    keep = weakref.ref(node, lambda _: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)))
    del node                                    # the callback runs (and its KeyboardInterrupt is dropped) here
    assert keep() is None
    return "done"


def test_a_stop_python_drops_still_ends_the_command(capsys: pytest.CaptureFixture) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(typer.Exit) as exc:
            _run(_stage_whose_stop_lands_in_a_weakref_callback, interrupted_note="run it again")
        assert exc.value.exit_code == 143
        assert "stopped by SIGTERM" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL                  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
