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


def test_ctrl_c_while_a_stage_loads_gets_the_note(tmp_path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    """Each command imported its stage (torch, polars: a second or so) before `_run` took over Ctrl-C and
    SIGTERM: a stop then ended the command with no word. The stage is now imported inside `_run`."""
    import sys

    from ctrpipe.cli import _lazy

    (tmp_path / "slow_stage.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                                            "time.sleep(5)\n\ndef run():\n    return 'ran'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)     # as in a terminal
    try:
        stage = _lazy("slow_stage", "run")                                  # nothing imported yet
        assert "slow_stage" not in sys.modules
        with pytest.raises(typer.Exit) as exc:
            _run(lambda: stage(), interrupted_note="run it again")
        assert exc.value.exit_code == 130 and "interrupted" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.modules.pop("slow_stage", None)


def test_each_commands_set_example_is_a_key_it_takes() -> None:
    """`ctrpipe infer --help` showed --set data.hash_bins=1000000, which infer refuses (the checkpoint fixes it)
    and train and plan only note (a run keeps its cache's data section); each command's example is now a key
    that command changes."""
    import re

    from typer.testing import CliRunner

    from ctrpipe.cli import app
    from ctrpipe.infer.predict import OVERRIDABLE

    def example(command: str) -> str:
        text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output.split())
        found = re.search(r"repeatable: --set (\S+)=", text)
        assert found, text
        return found.group(1)

    assert example("shard").startswith("data.")
    for command in ("train", "plan"):
        assert not example(command).startswith("data."), command
    assert example("infer").startswith(OVERRIDABLE)


def test_a_read_only_output_folder_is_said_so() -> None:
    """A helper's sweep: `train --runs` on a read-only mount was told the path "must exist to be read ... if it
    is no path you gave, report it as a bug"."""
    import errno

    from ctrpipe.cli import _refused_path

    message = _refused_path(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/criteo_dnn/config.json.incomplete"))
    assert message is not None and "cannot write /mnt/ro/criteo_dnn/config.json: the file system there is read-only" \
        in message and "report it as a bug" not in message and "--runs" in message
