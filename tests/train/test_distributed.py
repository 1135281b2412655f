"""Data-parallel training (train/distributed.py) on CPU with gloo, in real processes.

Two ranks started with torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) run the real CLI on a real shard cache. They must give the weights and metrics of one process at
the same global batch (each rank B rows, the one process 2B), for DNN and DCN v2 with lazy_adam and with dense
Adam, keep bit-identical replicas (the runtime check runs every step), resume exactly, and stop with a clear
error -- never hang -- when a rank fails, dies or hangs. One session of two worker processes runs most jobs
(ddp_worker.py), so torch starts up once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from cli_helpers import sets
from train_setup import CRITEO_CFG, FAST, K_FOLDS, REPO, build_cache
from train_setup import packed_weights as weights
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.errors import TrainingError
from ctrpipe.loader.loader import ShardLoader
from ctrpipe.loader.view import RowView
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.train.checkpoint import load_checkpoint
from ctrpipe.train.distributed import checksum, rank_info

WORKER = Path(__file__).with_name("ddp_worker.py")
WORLD = 2
BATCH = 64                       # global: 32 rows per rank
# fp32: the comparisons with one process are to float rounding
DDP = [*FAST, f"loader.batch_size={BATCH}", "model.dropout=0.0", "train.warmup_steps=0", "train.amp=off",
       "train.distributed.check_every=1"]
CONFIGS = {  # name -> (model, embedding optimizer)
    "dnn-lazy_adam": ("dnn", "lazy_adam"), "dnn-adam": ("dnn", "adam"),
    "dcnv2-lazy_adam": ("dcnv2", "lazy_adam"), "dcnv2-adam": ("dcnv2", "adam"),
    # a masked head (the loss over positive rows only): ranks keep different numbers of rows, so its mean
    # must be taken over the global batch's kept rows (Objective.count_over_ranks)
    "dnn-masked": ("dnn", "lazy_adam"),
    # an odd global batch: the ranks' shares of every batch differ (31 and 32 rows), as they do for an
    # unshuffled ragged last batch, which one process trains; each rank's means are scaled by its share
    # (Objective.rows_share)
    "dnn-unshuffled-odd": ("dnn", "lazy_adam"),
    "dnn-masked-odd": ("dnn", "lazy_adam"),
}
STEPS = 7                        # ~480 training rows / 64
STOP_AT = 3                      # the interrupted run stops here


def config_sets(name: str) -> list[str]:
    model, opt = CONFIGS[name]
    extra = ["train.tasks.label.mask=label"] if "masked" in name else []
    if name.endswith("odd"):
        extra += [f"loader.batch_size={BATCH - 1}"]
    if "unshuffled" in name:
        extra += ["loader.shuffle=false"]
    return [*DDP, f"model.name={model}", f"train.embedding_optimizer={opt}", *extra]


def train_args(cache: Path, runs: Path, exp: str, extra: list[str], *flags: str) -> list[str]:
    return ["train", "--cfg", str(CRITEO_CFG), "--shards", str(cache), "--runs", str(runs), "-q",
            *sets([*extra, f"exp_name={exp}"]), *flags]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_ranks(jobs: list[dict[str, Any]], out: Path) -> list[subprocess.Popen[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, str(WORKER), str(out / "jobs.json"), str(r), str(WORLD), str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
            for r in range(WORLD)]


def run_ranks(jobs: list[dict[str, Any]], out: Path, timeout: float = 300) -> list[list[dict[str, Any]]]:
    """Run the jobs on WORLD ranks; per rank, per job {exit_code, output}."""
    procs = start_ranks(jobs, out)
    logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} worker failed:\n{log}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@dataclass
class Session:
    runs: Path
    results: dict[str, list[dict[str, Any]]]      # job name -> per rank {exit_code, output}

    def ok(self, name: str) -> None:
        for r, res in enumerate(self.results[name]):
            assert res["exit_code"] == 0, f"{name}, rank {r}:\n{res['output']}"


@pytest.fixture(scope="module")
def session(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Session:
    """Every two-rank job of this module, in one session of two worker processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    runs = tmp / "runs"
    base = config_sets("dnn-lazy_adam")
    # a one-process run stopped early: two ranks must refuse to resume it
    one = CliRunner().invoke(app, train_args(cache, runs, "one_stopped", [*base, "train.stop_after_steps=3"]))
    assert one.exit_code == 0, one.output
    named: list[tuple[str, dict[str, Any]]] = [
        (name, {"args": train_args(cache, runs, f"ddp_{name}", config_sets(name))}) for name in CONFIGS]
    named += [
        ("stop", {"args": train_args(cache, runs, "resumed", [*base, f"train.stop_after_steps={STOP_AT}"])}),
        ("resume", {"args": train_args(cache, runs, "resumed", base, "--resume")}),
        ("resume_finished", {"args": train_args(cache, runs, "resumed", base, "--resume")}),
        ("batch_norm", {"args": train_args(cache, runs, "ddp_bn", [*base, "model.batch_norm=true"])}),
        ("batch_of_one", {"args": train_args(cache, runs, "ddp_one", [*base, "loader.batch_size=1"])}),
        ("stopped", {"args": train_args(cache, runs, "ddp_stopped", [*base, "train.stop_after_steps=3"])}),
        ("resume_one", {"args": train_args(cache, runs, "one_stopped", base, "--resume")}),
        ("no_cache", {"args": train_args(cache, runs, "no_cache", base),
                      "rank_args": {"1": train_args(tmp / "absent", runs, "no_cache", base)}}),
        ("replicas", {"replicas": True}),
        ("kfold", {"args": train_args(cache, runs, "ddp_kfold", base, "--kfold", str(K_FOLDS))}),
    ]
    jobs = [{**job, "port": free_port()} for _, job in named]
    per_rank = run_ranks(jobs, tmp / "session")
    return Session(runs, {name: [per_rank[r][i] for r in range(WORLD)] for i, (name, _) in enumerate(named)})


# ----------------------------------------------------------------------------------------------- in process

def test_each_rank_reads_its_share_of_the_one_process_batches(cache: Path) -> None:
    """Every global batch is the ranks' shares put together in rank order: one process's batch, row for row."""
    one = ShardLoader(cache, RowView.train(), BATCH, shuffle=True, seed=3, drop_last=True)
    shares = [ShardLoader(cache, RowView.train(), BATCH, shuffle=True, seed=3, drop_last=True, rank=r,
                          world_size=WORLD) for r in range(WORLD)]
    for epoch in (0, 1):
        for loader in (one, *shares):
            loader.set_epoch(epoch)
        whole = [b.row_index.clone() for b in one]
        parts = [[b.row_index.clone() for b in loader] for loader in shares]
        assert len(whole) == len(parts[0]) == len(parts[1]) == len(one)
        for k, rows in enumerate(whole):
            assert [len(p[k]) for p in parts] == [BATCH // WORLD] * WORLD
            assert torch.equal(torch.cat([p[k] for p in parts]), rows)
        assert np.array_equal(shares[1].rank_rows().sum(axis=1), one.batch_rows())


def test_evaluation_shares_skip_empty_ones(cache: Path) -> None:
    """Unshuffled, ragged last batch: shares of every size, even none, still cover each row once."""
    n = ShardLoader(cache, RowView.val(), 1000, shuffle=False, seed=0).num_rows
    size = n - 1                                    # a last batch of 1 row: one share of it is empty
    shares = [ShardLoader(cache, RowView.val(), size, shuffle=False, seed=0, rank=r, world_size=WORLD)
              for r in range(WORLD)]
    rows = [torch.cat([b.row_index for b in loader]) for loader in shares]
    assert [len(r) for r in rows] == shares[0].rank_rows().sum(axis=0).tolist()
    assert sorted(torch.cat(rows).tolist()) == ShardLoader(cache, RowView.val(), 64, shuffle=False,
                                                           seed=0).row_indices().tolist()


def test_a_last_batch_with_fewer_rows_than_ranks_is_refused_with_a_fix_that_works(cache: Path) -> None:
    """One process trains an unshuffled ragged last batch; 3 ranks cannot share one of 2 rows (each steps on
    a row of every batch), and with fewer rows than ranks no batch size helps (review of the change)."""
    from ctrpipe.errors import ConfigError
    from ctrpipe.train.fit import check_rank_shares

    n = ShardLoader(cache, RowView.train(), 64, shuffle=False, seed=0).num_rows
    batch = next(b for b in range(64, n) if n % b == 2)
    loaders = [ShardLoader(cache, RowView.train(), batch, shuffle=False, seed=0, rank=r, world_size=3)
               for r in range(3)]
    shares = loaders[0].rank_rows()
    assert shares[-1].tolist() == [0, 1, 1]
    with pytest.raises(ConfigError, match="ends in a batch of 2 rows") as exc:
        check_rank_shares(shares, "train", shuffle=False)
    assert "last batch of at least 3" in exc.value.fix and "loader.shuffle=true" in exc.value.fix
    with pytest.raises(ConfigError) as exc:
        check_rank_shares(np.array([[0, 1, 1]]), "train", shuffle=True)
    assert exc.value.fix.startswith("train in at most 2 processes")
    check_rank_shares(ShardLoader(cache, RowView.train(), 64, shuffle=False, seed=0, world_size=3).rank_rows(),
                      "train", shuffle=False)                    # a tail of 28 rows: shared, no error
    # why: rank 0 would have no row of the last batch, so it would take one step fewer than the others
    assert [len(list(ld)) for ld in loaders] == [len(loaders[0]) - 1, len(loaders[0]), len(loaders[0])]


def test_rank_info_reads_torchrun_environment() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    info = rank_info(env)
    assert info is not None and (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert rank_info({}) is None and rank_info({"WORLD_SIZE": "1"}) is None
    with pytest.raises(TrainingError, match="RANK=None") as exc:
        rank_info({"WORLD_SIZE": "2"})
    assert "torchrun --nproc_per_node" in exc.value.fix
    with pytest.raises(TrainingError, match="MASTER_ADDR"):
        rank_info({"RANK": "0", "WORLD_SIZE": "2"})


def test_checksum_sees_one_bit() -> None:
    t = torch.randn(1000, 3)
    u = t.clone()
    u[999, 2] = torch.nextafter(u[999, 2], torch.tensor(9.0))
    assert checksum(t) == checksum(t.clone()) and checksum(t) != checksum(u)


# ----------------------------------------------------------------------------------------------- two ranks

@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_give_the_weights_and_metrics_of_one_process(session: Session, cache: Path, name: str) -> None:
    session.ok(name)
    res = CliRunner().invoke(app, train_args(cache, session.runs, f"one_{name}", config_sets(name)))
    assert res.exit_code == 0, res.output
    one, two = session.runs / f"one_{name}", session.runs / f"ddp_{name}"
    a, b = weights(one / "ckpt_last.pt"), weights(two / "ckpt_last.pt")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".rows"):
            assert torch.equal(a[key], b[key]), key          # the same rows changed
        else:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["world_size"] == 2 and m2["steps"] == m1["steps"] and m2["samples"] == m1["samples"]
    if not name.endswith("odd"):
        assert m1["steps"] == STEPS
    elif "unshuffled" in name:                   # the ragged last batch is trained
        assert m1["samples"] == read_manifest(cache).rows["train"] * m1["epochs"] and m1["steps"] > STEPS
    for metric in ("auc", "logloss", "ap"):
        if m1["val"][metric] is None:            # the masked head's rows are one class: no AUC
            assert m2["val"][metric] is None
        else:
            assert m2["val"][metric] == pytest.approx(m1["val"][metric], rel=1e-6, abs=1e-7), metric
    assert 0 < m2["exchange"]["row_bytes_per_step"] < m2["exchange"]["dense_bytes_per_step"]
    assert not (two / "rank1").exists()
    log = (two / "train_log.csv").read_text().splitlines()
    assert len(log) == len((one / "train_log.csv").read_text().splitlines())   # rank 0 alone logs


def test_two_rank_kfold_gives_the_folds_and_out_of_fold_metrics_of_one_process(session: Session,
                                                                               cache: Path) -> None:
    session.ok("kfold")
    res = CliRunner().invoke(app, train_args(cache, session.runs, "one_kfold", config_sets("dnn-lazy_adam"),
                                             "--kfold", str(K_FOLDS)))
    assert res.exit_code == 0, res.output
    one, two = session.runs / "one_kfold", session.runs / "ddp_kfold"
    for k in range(K_FOLDS):
        a, b = weights(one / f"ckpt_fold{k}.pt"), weights(two / f"ckpt_fold{k}.pt")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"fold {k} {key}")
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for part in ("val", "gold"):
        for metric in ("auc", "logloss"):
            assert m2[part][metric] == pytest.approx(m1[part][metric], rel=1e-6, abs=1e-7), (part, metric)


def test_resumed_two_rank_run_equals_the_uninterrupted_one(session: Session) -> None:
    session.ok("stop")
    session.ok("resume")
    assert f"stopped at step {STOP_AT}" in session.results["stop"][0]["output"]
    resumed, whole = session.runs / "resumed", session.runs / "ddp_dnn-lazy_adam"
    a, b = weights(whole / "ckpt_last.pt"), weights(resumed / "ckpt_last.pt")
    for key in a:                                  # the same processes, the same order of sums: exact
        assert torch.equal(a[key], b[key]), key
    ts = load_checkpoint(resumed / "ckpt_last.pt").train_state
    assert ts is not None and ts.world_size == 2 and {"torch", "torch.rank1"} <= set(ts.rng)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    assert m2["val"] == m1["val"]
    # the log too: no row at the stop (step 3, between rows), and the row after the resume averages the steps
    # since the last row, as each rank's sums were kept in the checkpoint (helper's distributed sweep)
    logs = [pl.read_csv(d / "train_log.csv").drop("samples_per_s") for d in (whole, resumed)]
    assert logs[0].equals(logs[1]), (logs[0], logs[1])


def test_resume_with_another_number_of_processes_is_refused(session: Session, cache: Path) -> None:
    out = session.results["resume_one"][0]
    assert out["exit_code"] == 1
    assert "trained by 1 process(es) and this command runs 2" in out["output"]
    assert "without torchrun" in out["output"]
    session.ok("stopped")
    res = CliRunner().invoke(app, train_args(cache, session.runs, "ddp_stopped", config_sets("dnn-lazy_adam"),
                                             "--resume"))
    assert res.exit_code == 1
    assert "trained by 2 process(es) and this command runs 1" in res.output
    assert "torchrun --nproc_per_node 2 -m ctrpipe.cli train ... --resume" in res.output


def test_resuming_a_finished_run_on_two_ranks_changes_nothing(session: Session) -> None:
    """Only rank 0 sees the run directory: it tells the other rank that the run had finished."""
    session.ok("resume_finished")
    assert json.loads((session.runs / "resumed" / "metrics.json").read_text())["resumed"] is True


def test_batch_norm_on_cpu_ranks_is_refused_naming_the_models_own_setting(session: Session) -> None:
    out = session.results["batch_norm"][0]
    assert out["exit_code"] == 1 and "SyncBatchNorm" in out["output"] and "model.batch_norm=false" in out["output"]
    assert not (session.runs / "ddp_bn").exists()            # so the fixed command is no "already holds a run"


def test_a_batch_smaller_than_the_processes_is_refused(session: Session) -> None:
    """Every rank stops; the error every rank meets alike is printed once (by the node's first rank)."""
    rank0, rank1 = session.results["batch_of_one"]
    assert rank0["exit_code"] == rank1["exit_code"] == 1
    assert "2 processes need a row each" in rank0["output"], rank0["output"]
    assert "loader.batch_size of at least 2" in rank0["output"]
    assert "error" not in rank1["output"], rank1["output"]


def test_batch_norm_settings_are_found_in_every_model_section() -> None:
    """The refusal told DARE + QNN-alpha users to set model.batch_norm, a key their model does not have."""
    from ctrpipe.config import load_config, to_dict
    from ctrpipe.train.distributed import batch_norm_settings

    def found(cfg: str, *overrides: str) -> dict[str, str]:
        return batch_norm_settings(to_dict(load_config(REPO / "cfgs" / cfg, list(overrides)))["model"])
    assert found("dare_qnn.yaml") == {"model.qnn_alpha.norm": "layer"}
    assert found("criteo_dnn.yaml") == {} and found("criteo_dnn.yaml", "model.batch_norm=true") == {
        "model.batch_norm": "false"}
    assert found("parquet_esmm.yaml", "model.backbone_params.batch_norm=true") == {
        "model.backbone_params.batch_norm": "false"}
    assert found("criteo_qnn_alpha.yaml") == {} and found("criteo_qnn_alpha.yaml", "model.norm=batch") == {
        "model.norm": "layer"}


def test_a_rank_without_the_cache_stops_every_rank(session: Session) -> None:
    rank0, rank1 = session.results["no_cache"]
    assert rank0["exit_code"] == rank1["exit_code"] == 1
    assert "absent" in rank1["output"]
    assert "rank 1 failed preparing the run" in rank0["output"] and "absent" in rank0["output"]


def test_replica_check_finds_one_changed_bit(session: Session) -> None:
    for res in session.results["replicas"]:
        assert res["exit_code"] == 1, res["output"]
        assert "copies differ between ranks: 1.weight on rank(s) [1]" in res["output"]


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_run_with_an_error(cache: Path, tmp_path: Path, how: str) -> None:
    """Rank 1 is killed (or stopped) once training runs: rank 0 reports it, at once or after the timeout."""
    runs = tmp_path / "runs"
    long = [*config_sets("dnn-lazy_adam"), "train.min_steps=100000", "train.distributed.timeout_s=4"]
    procs = start_ranks([{"port": free_port(), "args": train_args(cache, runs, "long", long)}], tmp_path / "w")
    log = runs / "long" / "train_log.csv"
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, "training never started"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        t0 = time.monotonic()
        procs[0].wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    out = json.loads((tmp_path / "w" / "rank0.json").read_text())[0]
    assert out["exit_code"] == 1, out["output"]
    assert "rank 0 of 2, step" in out["output"] and "another rank stopped, hangs, or cannot be reached" in \
        out["output"]
    assert "--resume" in out["output"]
    if how == "hangs":
        assert "Timed out" in out["output"] and waited >= 3


def torchrun(args: list[str], nproc: int = WORLD) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(exe), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
                           "-m", "ctrpipe.cli", *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_an_error_every_rank_meets_is_printed_once(cache: Path, tmp_path: Path) -> None:
    """A bad --set fails on every rank before they join: torchrun's output shows it once, not once a rank."""
    res = torchrun(train_args(cache, tmp_path, "bad", [*config_sets("dnn-lazy_adam"), "train.epochs=x"]))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and out.count("bad value 'x' for 'train.epochs'") == 1, out


def test_kfold_checks_every_folds_batches_before_the_first_fold_trains(synth_dir: Path, tmp_path: Path) -> None:
    """Three ranks, unshuffled, a batch size that leaves a later fold (not the first) a last batch of 2 rows:
    the job stops before fold 1 trains (it trained it first, then stopped at the later fold), the error printed
    once, and the refused run leaves no folder behind (the fixed command is not "already holds a run")."""
    folds = 4                                      # unequal folds: 449 to 451 training rows each
    cache = build_cache(tmp_path / "cache", synth_dir, ["data.hash_bins=64", f"data.folds.n_splits={folds}"],
                        gold=False)
    rows = [ShardLoader(cache, RowView.fold_train(k), 64, shuffle=False, seed=0).num_rows for k in range(folds)]
    batch = next(b for b in range(8, 200) if rows[0] % b not in (1, 2) and any(n % b == 2 for n in rows[1:]))
    refused = next(k for k in range(1, folds) if rows[k] % batch == 2)
    runs = tmp_path / "runs"
    res = torchrun(train_args(cache, runs, "kf", [*config_sets("dnn-lazy_adam"), f"loader.batch_size={batch}",
                                                  "loader.shuffle=false"], "--kfold", str(folds)), nproc=3)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    view = f"the training view (fold {refused} ({refused + 1} of {folds}))"
    assert out.count(f"{view} ends in a batch of 2 rows") == 1, out
    assert not (runs / "kf").exists()


def test_torchrun_runs_the_cli(cache: Path, tmp_path: Path) -> None:
    """The command the README gives, under torchrun itself."""
    res = torchrun(train_args(cache, tmp_path, "torchrun", config_sets("dnn-lazy_adam")))
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((tmp_path / "torchrun" / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    # the job's memory is both processes' (it was rank 0's alone)
    ranks = summary["peak_memory_by_rank"]
    assert len(ranks) == 2 and all(r["host_anon"] > 50 * 2**20 and r["device"] is None for r in ranks)
    assert summary["peak_host_anon_bytes"] == sum(r["host_anon"] for r in ranks)
    assert summary["peak_host_memory_bytes"] == sum(r["host"] for r in ranks)
