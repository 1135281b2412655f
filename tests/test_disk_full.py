"""A full disk in every writer, on a real filesystem: `ctrpipe` processes write onto a tiny tmpfs mounted in a
private user + mount namespace (`unshare -rm`; the mount vanishes with the process). Skipped where the kernel
or sandbox does not allow that namespace.

Each command must exit 1 with one red `error:` message (no traceback) naming the path, the free space and
what the step needs, leave nothing that looks complete, and finish when run again after space is freed.
What is on the tiny filesystem is copied out right after each command (`snap`), before the mount goes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "cfgs" / "criteo.yaml"
EXE = Path(sys.executable).with_name("ctrpipe")
DATA_SETS = ["--set", "data.hash_bins=1000", "--set", "data.folds.n_splits=0"]
SMALL_TRAIN = ["--set", "model.name=dnn", "--set", "model.hidden_units=[32]", "--set", "train.device=cpu",
               "--set", "loader.batch_size=256"]
ENV = {**os.environ, "COLUMNS": "400"}   # rich wraps at 80 columns without a terminal; keep messages whole


def _namespace_works() -> bool:
    """Probe once whether this process may mount a tmpfs in a user + mount namespace."""
    if sys.platform != "linux" or shutil.which("unshare") is None or not EXE.is_file():
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"ctrpipe-ns-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        res = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
                             capture_output=True, timeout=30)
        return res.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        probe.rmdir()


pytestmark = pytest.mark.skipif(not _namespace_works(), reason="cannot mount a tmpfs in a user namespace here")


@dataclass
class Step:
    rc: int
    out: str
    err: str
    snap: Path          # copy of the tiny filesystem right after the step


def on_tiny_fs(root: Path, size: str, steps: list[list[str] | str]) -> list[Step]:
    """Mount a `size` tmpfs at root/mnt, run `steps` in root, one namespace for all: a list is a ctrpipe
    command line, a string a shell command ($MNT is the mount). Returns one Step per ctrpipe command."""
    mnt, logs = root / "mnt", root / "logs"
    mnt.mkdir()
    logs.mkdir()
    lines = ["set -u", f"MNT={shlex.quote(str(mnt))}", f"mount -t tmpfs -o size={size} tmpfs \"$MNT\" || exit 99",
             f"cd {shlex.quote(str(root))}"]
    runs = 0
    for step in steps:
        if isinstance(step, str):
            lines.append(step)
            continue
        log = logs / str(runs)
        cmd = " ".join(shlex.quote(a) for a in [str(EXE), *step])
        lines += [f"{cmd} >{log}.out 2>{log}.err; echo $? >{log}.rc", f"cp -a \"$MNT\" {log}.snap"]
        runs += 1
    res = subprocess.run(["unshare", "-rm", "sh", "-c", "\n".join(lines)], capture_output=True, text=True,
                         env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return [Step(int((logs / f"{i}.rc").read_text()), (logs / f"{i}.out").read_text(),
                 (logs / f"{i}.err").read_text(), logs / f"{i}.snap") for i in range(runs)]


def ctrpipe(cwd: Path, *args: str) -> None:
    res = subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def assert_one_clean_error(step: Step, path: str, *phrases: str) -> str:
    """Exit 1, exactly one `error:` message and no traceback; the message starts with `path` (or a prefix
    of it) and holds `phrases`."""
    assert step.rc == 1, step.err
    assert "Traceback" not in step.err and step.err.count("error:") == 1, step.err
    msg = step.err[step.err.index("error:"):]
    assert msg.startswith(f"error: {path}") and "free on that filesystem" in msg, msg
    for phrase in phrases:
        assert phrase in msg, msg
    return msg


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def as_bytes(number: str, unit: str) -> float:
    return float(number) * {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Criteo text, train and test caches and a small trained run, all on the ordinary disk."""
    root = tmp_path_factory.mktemp("disk_full_world")
    ctrpipe(root, "synth", "--format", "criteo", "--rows", "2000", "--test-rows", "2000", "--out", "syn", "-q")
    ctrpipe(root, "shard", "--cfg", str(CFG), "--input", "syn/train.tsv", "--out", "S", "-q", *DATA_SETS)
    ctrpipe(root, "shard", "--cfg", str(CFG), "--input", "syn/test.tsv", "--test", "--stats-from", "S",
            "--out", "ST", "-q", *DATA_SETS)
    ctrpipe(root, "train", "--cfg", str(CFG), "--shards", "S", "--runs", "runs", "-q", *SMALL_TRAIN,
            "--set", "exp_name=small")
    return root


def test_shard_onto_full_disk_resumes_to_identical_cache(tmp_path: Path) -> None:
    ctrpipe(tmp_path, "synth", "--format", "criteo", "--rows", "20000", "--out", "syn", "-q")
    args = ["shard", "--cfg", str(CFG), "--input", str(tmp_path / "syn" / "train.tsv"), *DATA_SETS,
            "--set", "data.shard_rows=2000", "-q"]
    full, again = on_tiny_fs(tmp_path, "1m", [[*args, "--out", "mnt/K"], "mount -o remount,size=16m \"$MNT\"",
                                              [*args, "--out", "mnt/K"]])
    msg = assert_one_clean_error(full, "mnt/K", "the whole cache needs about",
                                 "run the same command again: the build resumes")
    # nothing that looks complete: no manifest, no shard outside the build folder, no half shard named final
    top = [p.name for p in (full.snap / "K").iterdir()]
    assert len(top) == 1 and top[0].startswith(".incomplete-"), top
    work = full.snap / "K" / top[0]
    assert not list(full.snap.rglob("manifest.json"))
    finished = sorted(p for p in work.iterdir() if re.fullmatch(r"shard_\d{5}", p.name))
    assert finished, files_under(work)     # 1 MB holds a few 2,000-row shards before the disk fills
    for shard in finished:
        assert {np.load(f, mmap_mode="r").shape[0] for f in shard.glob("*.npy")} == {2000}

    assert again.rc == 0, again.err
    # a shard finished just before progress.json could record it is rewritten, not trusted
    kept = re.search(r"resuming an interrupted build: (\d+) shards already written", again.err)
    assert kept and 1 <= int(kept.group(1)) <= len(finished), again.err
    ref = tmp_path / "ref"
    ctrpipe(tmp_path, *args, "--out", str(ref))
    resumed = again.snap / "K"
    npys = [f for f in files_under(ref) if f.endswith(".npy")]
    assert npys == [f for f in files_under(resumed) if f.endswith(".npy")]
    for f in npys:
        assert (ref / f).read_bytes() == (resumed / f).read_bytes(), f
    # the estimate is rough but of the right size
    number, unit = re.search(r"the whole cache needs about ([\d.]+) (bytes|kB|MB)", msg).groups()
    actual = sum((ref / f).stat().st_size for f in npys)
    assert 0.5 < as_bytes(number, unit) / actual < 2, (msg, actual)


def test_force_rebuild_onto_a_disk_without_room_for_both_caches(tmp_path: Path) -> None:
    """--force keeps the old cache until the new one is complete: where both do not fit, the error says so
    (and how big the old one is), and the old cache is still whole."""
    ctrpipe(tmp_path, "synth", "--format", "criteo", "--rows", "12000", "--out", "syn", "-q")
    args = ["shard", "--cfg", str(CFG), "--input", str(tmp_path / "syn" / "train.tsv"), *DATA_SETS, "-q",
            "--out", "mnt/K"]
    first, force = on_tiny_fs(tmp_path, "3m", [args, [*args, "--set", "data.shard_rows=3000", "--force"]])
    assert first.rc == 0, first.err
    msg = assert_one_clean_error(force, "mnt/K", "the cache this --force build replaces", "delete mnt/K first")
    assert re.search(r"replaces \([\d.]+ (kB|MB)\)", msg), msg
    manifest = json.loads((force.snap / "K" / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == 12000
    for shard in manifest["shards"]:
        for info in shard["files"].values():
            assert (force.snap / "K" / info["file"]).is_file()


def test_train_checkpoint_onto_full_disk_resumes(world: Path, tmp_path: Path) -> None:
    # a dense 1024x1024 layer makes every checkpoint (fp32 or fp16, compact or not) larger than the 2 MB
    # filesystem, while config, log and fingerprint files fit: the first checkpoint write is what fails
    args = ["train", "--cfg", str(CFG), "--shards", str(world / "S"), "--runs", "mnt/runs", "-q",
            *SMALL_TRAIN, "--set", "model.hidden_units=[1024,1024]", "--set", "exp_name=big"]
    full, again = on_tiny_fs(tmp_path, "2m", [args, "mount -o remount,size=128m \"$MNT\"", [*args, "--resume"]])
    msg = assert_one_clean_error(full, "mnt/runs/big/ckpt_", "--resume")
    assert re.search(r"mnt/runs/big/ckpt_\w+\.pt: ", msg), msg
    run = full.snap / "runs" / "big"
    left = files_under(run)
    assert not [f for f in left if f.endswith(".incomplete")], left
    assert "metrics.json" not in left                    # the run does not look finished
    for ckpt in run.glob("*.pt"):                        # whatever checkpoint is there is whole
        with zipfile.ZipFile(ckpt) as z:
            assert z.testzip() is None

    assert again.rc == 0, again.err
    assert (again.snap / "runs" / "big" / "metrics.json").is_file()
    assert (again.snap / "runs" / "big" / "ckpt_best.pt").is_file()


def test_infer_submission_onto_full_disk(world: Path, tmp_path: Path) -> None:
    # 1 MB minus a filler leaves ~8 kB: the header fits, the 2,000 rows (~40 kB) do not
    args = ["infer", "--run", str(world / "runs" / "small"), "--shards", str(world / "ST"),
            "--out", "mnt/sub/submission.csv", "-q"]
    full, again = on_tiny_fs(tmp_path, "1m", ["head -c 1040384 /dev/zero > \"$MNT/filler\"", args,
                                              "rm \"$MNT/filler\"", args])
    msg = assert_one_clean_error(full, "mnt/sub/submission.csv", "the file needs",
                                 "run the same command again: the step is redone")
    number, unit = re.search(r"the file needs (?:about|at least) ([\d.]+) (bytes|kB|MB)", msg).groups()
    assert as_bytes(number, unit) > 20_000, msg           # 2,000 rows of "id,probability"
    assert files_under(full.snap / "sub") == [], files_under(full.snap / "sub")

    assert again.rc == 0, again.err
    sub = pl.read_csv(again.snap / "sub" / "submission.csv")
    assert sub.height == 2000
    assert files_under(again.snap / "sub") == ["submission.csv", "submission.csv.json"]


def test_blend_onto_full_disk(tmp_path: Path) -> None:
    n = 20_000
    rng = np.random.default_rng(0)
    ids = np.arange(60_000_000, 60_000_000 + n)
    for name in ("a.csv", "b.csv"):
        pl.DataFrame({"Id": rng.permutation(ids), "Predicted": rng.random(n)}).write_csv(tmp_path / name)
    args = ["blend", "submissions", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out", "mnt/blend.csv",
            "-q"]
    # scratch records take 32 bytes a row per file: 1.3 MB for these two files, more than the 1 MB there
    full, again = on_tiny_fs(tmp_path, "1m", [args, "mount -o remount,size=16m \"$MNT\"", args])
    msg = assert_one_clean_error(full, "mnt/blend.csv", "the blend needs about",
                                 "run the same command again: the blend is redone")
    number, unit = re.search(r"the blend needs about ([\d.]+) (bytes|kB|MB)", msg).groups()
    assert 1e6 < as_bytes(number, unit) < 4e6, msg
    assert files_under(full.snap) == []                   # no scratch, no temp output, no blend.csv

    assert again.rc == 0, again.err
    out = pl.read_csv(again.snap / "blend.csv")
    assert out.height == n and out.columns == ["Id", "Predicted"]


def test_atomic_writes_and_run_log_on_full_disk(tmp_path: Path) -> None:
    """Library level, in a child process on the tiny filesystem: an atomic JSON write keeps the old file
    and no temp file; train_log.csv is cut back to its last whole row; the TensorBoard writer's failure (on
    its background thread) surfaces as one DiskFullError naming tb/, and the events before it stay readable."""
    script = """
import json, sys
from pathlib import Path
from ctrpipe.atomic import write_json_atomic
from ctrpipe.errors import DiskFullError
from ctrpipe.train.rundir import RunLog

mnt = Path(sys.argv[1])
write_json_atomic(mnt / "m.json", {"old": True})
log = RunLog(mnt / "run", append=False, tensorboard=False)   # the CSV writer alone
tb_log = RunLog(mnt / "tb_run", append=False)
with open(mnt / "filler", "wb", buffering=0) as fh:   # take every free block
    try:
        while True:
            fh.write(b"\\0" * 4096)
    except OSError:
        pass
result = {}
try:
    write_json_atomic(mnt / "m.json", {"new": "x" * 200_000})
except DiskFullError as exc:
    result["json"] = exc.render()
for step in range(1, 100_000):
    try:
        log.train(step, 0, 1e-3, 0.5, 1000.0)
    except DiskFullError as exc:
        result["log"] = exc.render()
        break
log.close()
for step in range(1, 100_000):
    try:
        tb_log.diagnostics(step, {"train/gate.e0": 0.5})
    except DiskFullError as exc:
        result["tb"] = exc.render()
        break
try:
    tb_log.close()
except DiskFullError:
    pass
print(json.dumps(result))
"""
    (tmp_path / "probe.py").write_text(script)
    # log rows fill the last page of train_log.csv; the row that crosses into a new page is written in
    # part before the disk refuses the rest, which is what RunLog must cut back
    steps = [f"{shlex.quote(sys.executable)} {tmp_path / 'probe.py'} \"$MNT\" > {tmp_path / 'probe.out'} "
             f"2> {tmp_path / 'probe.err'}; echo $? > {tmp_path / 'probe.rc'}; cp -a \"$MNT\" {tmp_path / 'snap'}"]
    on_tiny_fs(tmp_path, "1m", steps)
    assert (tmp_path / "probe.rc").read_text().strip() == "0", (tmp_path / "probe.err").read_text()
    result = json.loads((tmp_path / "probe.out").read_text())
    assert "m.json: No space left on device" in result["json"]
    assert "this file needs about 200.0 kB" in result["json"]
    assert "train_log.csv: No space left on device" in result["log"]
    snap = tmp_path / "snap"
    assert json.loads((snap / "m.json").read_text()) == {"old": True}
    assert not list(snap.rglob("*.incomplete"))
    text = (snap / "run" / "train_log.csv").read_text()
    assert text.endswith("\n")
    rows = pl.read_csv(snap / "run" / "train_log.csv")
    assert rows["step"].to_list() == list(range(1, rows.height + 1))
    assert re.search(r"tb_run/tb: No space left on device \(.* free on that filesystem", result["tb"]), result["tb"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(snap / "tb_run" / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/gate.e0")]
    assert steps and steps == list(range(1, len(steps) + 1))
