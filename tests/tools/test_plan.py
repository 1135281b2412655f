"""`ctrpipe plan`'s estimator on a tiny real cache: exact parameter counts, table terms that scale with the id
spaces, the live-bytes meter, the warning (with settings that fit) when the estimate exceeds the memory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ctrpipe.cli import app
from ctrpipe.config import load_config
from ctrpipe.errors import ConfigError
from ctrpipe.hostmem import MMAP_THRESHOLD, TRIM_THRESHOLD
from ctrpipe.models.layers.embedding import split_parameters
from ctrpipe.models.registry import build_model
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.tools.heap import ALLOC, FREE, FREE_CARRIED, AllocTrace, Heap, replay
from ctrpipe.tools.memtrack import Linear, LiveBytes
from ctrpipe.tools.plan import Line, MemoryPlan, Setting
from ctrpipe.tools.planner import estimate, parse_bytes

REPO = Path(__file__).resolve().parents[2]
SMALL = ["loader.batch_size=256", "loader.eval_batch_size=512", "train.min_steps=0", "model.embedding_dim=8"]
SMALL_MODEL = {"ft_transformer": ["model.n_blocks=1", "model.n_heads=2"]}


def small(model: str) -> list[str]:
    return [*SMALL, *SMALL_MODEL.get(model, ["model.hidden_units=[32]"])]
runner = CliRunner()


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same 3,000 synthetic Criteo rows sharded with 500 and with 1,000 hash bins per field."""
    from ctrpipe.shard.build import build_shards
    from ctrpipe.synth.run import run_synth

    root = tmp_path_factory.mktemp("plan")
    run_synth(fmt="criteo", rows=3000, test_rows=0, seed=0, out=root / "syn", quiet=True)
    out = {}
    for bins in (500, 1000):
        cfg = load_config(REPO / "cfgs" / "criteo.yaml", [f"data.hash_bins={bins}", "data.folds.n_splits=0"])
        build_shards(cfg, [root / "syn" / "train.tsv"], root / f"s{bins}", progress=False)
        out[bins] = root / f"s{bins}"
    return out


def plan_of(cache: Path, model: str = "dcnv2", *sets: str) -> MemoryPlan:
    cfg = load_config(REPO / "cfgs" / f"criteo_{model}.yaml", [*small(model), *sets])
    return estimate(cfg, cache, "cpu", memory=1 << 40)


def by_part(plan: MemoryPlan, part: str) -> int:
    return sum(line.nbytes for line in plan.lines if line.part == part)


@pytest.mark.parametrize("model", ["dnn", "dcnv2", "autoint", "ft_transformer"])
def test_parameter_counts_are_exact(caches: dict[int, Path], model: str) -> None:
    plan = plan_of(caches[500], model)
    cfg = load_config(REPO / "cfgs" / f"criteo_{model}.yaml", small(model))
    built = build_model(cfg.model.name, cfg.model.params, read_manifest(caches[500]).feature_spec())
    groups = split_parameters(built)
    assert plan.params == {"tables": sum(p.numel() for p in groups.embedding),
                           "dense": sum(p.numel() for p in groups.dense)}
    assert by_part(plan, "parameters") == 4 * (plan.params["tables"] + plan.params["dense"])   # fp32, no EMA
    assert plan.tables and all(t.rows * t.dim == plan.params["tables"] for t in plan.tables)
    assert 0 < plan.tables[0].touched_rows <= plan.tables[0].rows


def test_table_terms_scale_with_the_bins(caches: dict[int, Path]) -> None:
    small = plan_of(caches[500], "dcnv2", "train.embedding_optimizer=adam")
    large = plan_of(caches[1000], "dcnv2", "train.embedding_optimizer=adam")

    def tables(plan: MemoryPlan) -> int:
        return sum(line.nbytes for line in plan.lines if line.tables)

    assert small.tables[0].rows == 26 * 500 and large.tables[0].rows == 26 * 1000
    # weights, dense Adam moments (2x), the table's dense gradient and the changed-rows mask: 16 + 1 bytes
    # per float32 value and per row
    for plan, rows in ((small, 26 * 500), (large, 26 * 1000)):
        assert tables(plan) == rows * 8 * 4 * 4 + rows
    rest = [line.nbytes for line in small.lines if not line.tables and line.phase == "resident"]
    assert rest == [line.nbytes for line in large.lines if not line.tables and line.phase == "resident"]


def test_optimizer_state_follows_the_embedding_optimizer(caches: dict[int, Path]) -> None:
    state = {opt: by_part(plan_of(caches[1000], "dnn", f"train.embedding_optimizer={opt}"), "optimizer")
             for opt in ("sgd", "adagrad", "adam")}
    table = 26 * 1000 * 8 * 4
    assert state["adagrad"] - state["sgd"] == table
    assert state["adam"] - state["sgd"] == 2 * table


def test_step_memory_grows_with_the_batch(caches: dict[int, Path]) -> None:
    small, large = plan_of(caches[500], "autoint"), plan_of(caches[500], "autoint", "loader.batch_size=1024")
    assert small.phase_bytes("step", "device") < large.phase_bytes("step", "device")
    assert any("forward attention" in line.item for line in small.lines)


def test_live_bytes_counts_storages_once_and_sees_them_freed() -> None:
    with LiveBytes() as live:
        a = torch.empty(1000)                      # 4,000 bytes
        view = a[10:20].view(2, 5)                 # a view: no new storage
        b = a * 2                                  # 4,000 more
        assert live.now == 8000 and view.shape == (2, 5)
        del a
        assert live.now == 8000                    # the view keeps a's storage alive
        del view
        assert live.now == 4000
        del b
    assert live.now == 0 and live.peak == 8000


def test_live_bytes_records_the_allocation_sequence() -> None:
    with LiveBytes() as live:
        old = torch.empty(10)                     # made before the trace: its free is not an event
        live.start_trace("step")
        a = torch.empty(100)
        b = torch.empty(50)
        del a, old
        events, sizes = live.stop_trace()
        live.start_trace("step")
        c = torch.empty(25)
        del b                                     # made by the previous "step" trace
        assert live.stop_trace() == (((ALLOC, 0), (FREE_CARRIED, 1)), (100,)) and c.numel() == 25
    assert events == ((ALLOC, 0), (ALLOC, 1), (FREE, 0)) and sizes == (400, 200)


def test_alloc_trace_scales_each_allocation_with_the_batch() -> None:
    events = ((ALLOC, 0), (ALLOC, 1), (FREE, 0))
    trace = AllocTrace.fit([(256, events, (256 * 8, 4096)), (1024, events, (1024 * 8, 4096))])
    assert trace.at(4096) == [4096 * 8, 4096]
    odd = AllocTrace.fit([(256, ((ALLOC, 0), (FREE, 0)), (100,)), (1024, events[:2], (400, 800))])   # differ
    assert odd.events == events[:2] and odd.at(2048) == [800, 1600]


def test_heap_keeps_freed_blocks_and_returns_mmaps() -> None:
    mib = 1 << 20
    small, big = MMAP_THRESHOLD // 2, 3 * MMAP_THRESHOLD
    # a phase of blocks under the threshold grows the heap; freed, it stays resident and is reused
    events = ((ALLOC, 0), (ALLOC, 1), (FREE, 0), (FREE, 1))
    heap = replay([(AllocTrace(events, ((0.0, small), (0.0, small))), 1)] * 3)
    assert heap.written == heap.peak >= 2 * small and heap.written < 2 * small + mib and heap.mmapped == 0
    # a block over the threshold that no free chunk holds is an mmap, returned when freed...
    heap.malloc(big)
    assert heap.mmapped > big - mib and heap.rss > heap.written
    # ...while one the free heap can hold is carved from it, adding nothing
    fresh = Heap()
    start, n = fresh.malloc(big // 4 - 1000)              # under the threshold: heap
    fresh.free(start, n)
    assert fresh.malloc(big // 4 - 2000)[0] == 0 and fresh.mmapped == 0
    assert Heap().trim_threshold == TRIM_THRESHOLD and Heap().mmap_threshold == MMAP_THRESHOLD


def test_heap_trim_releases_free_pages_until_they_are_written_again() -> None:
    mib = 1 << 20
    heap = Heap()
    a, b = heap.malloc(8 * mib), heap.malloc(4 * mib)
    heap.free(*a)                                         # a hole below b: freed, still resident
    assert heap.written >= 12 * mib
    heap.trim()                                           # malloc_trim(0): only b stays resident
    assert b[1] == heap.written < 4 * mib + 4096 and heap.in_use == b[1]
    c = heap.malloc(2 * mib)                              # carved from the released hole: written again
    assert c[0] == a[0] and heap.written == b[1] + c[1]
    heap.free(*c)                                         # freed again, it stays resident
    assert heap.written == b[1] + c[1]
    # a replay's (None, _) phase is a trim: a run of blocks freed before it leaves nothing resident
    events = ((ALLOC, 0), (FREE, 0))
    trace = AllocTrace(events, ((0.0, 16.0 * mib),))
    assert replay([(trace, 1), (None, 0)]).written == 0
    assert replay([(trace, 1)]).written >= 16 * mib


def test_working_set_between_live_bytes_and_their_sum(caches: dict[int, Path]) -> None:
    plan = plan_of(caches[500], "autoint")
    assert plan.working is not None
    step, forward = plan.phase_bytes("step", "device"), next(
        line.nbytes for line in plan.lines if line.item.startswith("no-grad forward"))
    assert max(step, forward) * 0.9 <= plan.working <= (step + forward) * 1.2


def test_evaluation_is_measured_in_the_precision_it_runs(caches: dict[int, Path]) -> None:
    """train.amp=auto trains in bf16 where that is faster but predicts in fp32: the evaluation forward is
    measured in fp32 then, and its fp32 activations are about twice the bf16 ones."""
    from ctrpipe.tools.memtrack import measure_step_memory
    from ctrpipe.tools.touched import read_sample

    cfg = load_config(REPO / "cfgs" / "criteo_ft_transformer.yaml", small("ft_transformer"))
    spec = read_manifest(caches[500]).feature_spec()
    sample = read_sample(caches[500], cfg, 1024)
    cpu = torch.device("cpu")
    both = measure_step_memory(cfg, spec, sample, (256, 1024), cpu, amp="bf16")
    fp32_eval = measure_step_memory(cfg, spec, sample, (256, 1024), cpu, amp="bf16", eval_amp="off")
    assert fp32_eval.step.at(4096) == pytest.approx(both.step.at(4096), rel=0.05)
    assert fp32_eval.eval.at(4096) > 1.5 * both.eval.at(4096)


def test_linear_fit() -> None:
    f = Linear.fit([(256, 1000 + 256 * 10), (1024, 1000 + 1024 * 10)])
    assert f.at(4096) == 1000 + 4096 * 10


def test_peak_rule_and_parse_bytes() -> None:
    lines = (Line("p", "a", 100), Line("a", "s", 50, phase="step"), Line("e", "e", 70, phase="eval", where="host"),
             Line("c", "c", 30, phase="checkpoint", where="host"))
    plan = MemoryPlan("m", "cpu", Setting(1, 1, "off", "adam"), lines, (), {}, {}, 1, 1, 1000, "", "")
    assert plan.peak() == 100 + 70 + 30
    replayed = (*lines, Line("e", "forward", 40, phase="eval", replayed=True))
    plan = MemoryPlan("m", "cpu", Setting(1, 1, "off", "adam"), replayed, (), {}, {}, 1, 1, 1000, "", "",
                      working=90)
    assert plan.peak() == 100 + 90 + 70 + 30       # working set + the eval lines it does not cover
    assert parse_bytes("16GB") == 16 * 10**9 and parse_bytes("2 GiB") == 2 * 2**30
    assert parse_bytes("16G") == parse_bytes("16gib") == 16 * 2**30 and parse_bytes("1.5e9B") == 1.5e9
    for bad in ("-5GB", "0B", "infGB", "nanGB", "5XB", "abc", "5%"):   # a negative or endless size was taken
        # as given; 'abc' was told to add a unit: --memory ABCGB
        with pytest.raises(ConfigError, match="cannot read memory size"):
            parse_bytes(bad)
    for bare in ("1.5", "2048", "0"):           # '1.5' was 1 byte, and the error blamed the model's size
        with pytest.raises(ConfigError, match="has no unit") as err:
            parse_bytes(bare)
        assert f"--memory {bare}GB" in err.value.fix


def test_cli_warns_with_settings_that_fit(caches: dict[int, Path]) -> None:
    peak = plan_of(caches[1000], "dnn").peak()
    args = ["plan", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(caches[1000]),
            "--device", "cpu", *[x for s in small("dnn") for x in ("--set", s)]]
    ok = runner.invoke(app, [*args, "--memory", f"{peak * 2}B"], env={"COLUMNS": "250"})
    assert ok.exit_code == 0, ok.output
    assert "fits:" in ok.output and "peak" in ok.output and "ckpt_last.pt" in ok.output
    assert "narrowly" not in ok.output
    narrow = runner.invoke(app, [*args, "--memory", f"{int(peak * 1.1)}B"], env={"COLUMNS": "250"})
    assert narrow.exit_code == 0 and "fits, narrowly:" in narrow.output, narrow.output   # within the plan's error
    base = by_part(plan_of(caches[1000], "dnn"), "process")       # no setting shrinks the process itself
    tight = runner.invoke(app, [*args, "--memory", f"{int(base + (peak - base) * 0.8)}B"], env={"COLUMNS": "250"})
    assert tight.exit_code == 1, tight.output
    assert "warning: does not fit" in tight.output
    assert "--set loader.batch_size=" in tight.output or "data.hash_bins=" in tight.output


def test_plan_notes_a_config_whose_data_section_differs_from_the_cache(caches: dict[int, Path]) -> None:
    """Training notes (and records) the cache's data section where the config's differs; plan planned with the
    cache's silently, so a config naming one label planned two heads without a word."""
    res = runner.invoke(app, ["plan", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(caches[1000]),
                              "--device", "cpu", "--memory", "1TB", *[x for s in small("dnn") for x in ("--set", s)],
                              "--set", "data.hash_bins=777"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "differs from the config's in" in text and "data.hash_bins (1000, config 777)" in text


def test_every_suggested_setting_loads_as_written(caches: dict[int, Path], tmp_path: Path) -> None:
    """A bin count was printed with thousands separators (--set data.hash_bins=10,000), which --set refuses."""
    from ctrpipe.shard.build import build_shards

    raw = caches[500].parent / "syn" / "train.tsv"
    cfg = load_config(REPO / "cfgs" / "criteo.yaml", ["data.hash_bins=40000", "data.folds.n_splits=0"])
    build_shards(cfg, [raw], tmp_path / "wide", progress=False)
    run = load_config(REPO / "cfgs" / "criteo_dnn.yaml", small("dnn"))
    plan = estimate(run, tmp_path / "wide", "cpu", memory=1 << 40)
    base = by_part(plan, "process")
    tips = estimate(run, tmp_path / "wide", "cpu", memory=int(base + (plan.peak() - base) * 0.6)).suggestions
    sets = [t for tip in tips for t in re.findall(r"--set (\S+)", tip)]
    assert any(t.startswith("data.hash_bins=") and int(t.split("=")[1]) >= 1000 for t in sets), tips
    for one in sets:
        load_config(REPO / "cfgs" / "criteo_dnn.yaml", [one])


@pytest.mark.parametrize("cfg_name", ["parquet_din.yaml", "parquet_dare.yaml", "dare_qnn.yaml"])
def test_history_readers_plan_every_table(tmp_path: Path, cfg_name: str) -> None:
    """Shared id spaces (the history reads the candidate's rows) and DARE's attention table are all planned:
    the tables' sizes add up to the model's table parameters, touched rows within each table."""
    from ctrpipe.shard.build import build_shards
    from ctrpipe.synth.run import run_synth

    run_synth(fmt="parquet", rows=1500, test_rows=0, seed=0, out=tmp_path / "syn", quiet=True)
    keys = ["data.folds.n_splits=0", "data.categorical.min_count=1", *SMALL,
            *(["model.hidden_units=[32]"] if cfg_name != "dare_qnn.yaml" else [])]
    cfg = load_config(REPO / "cfgs" / cfg_name, keys)
    build_shards(cfg, [tmp_path / "syn" / "train.parquet"], tmp_path / "cache", progress=False)
    plan = estimate(cfg, tmp_path / "cache", "cpu", memory=1 << 40)
    built = build_model(cfg.model.name, cfg.model.params, read_manifest(tmp_path / "cache").feature_spec())
    groups = split_parameters(built)
    assert sum(t.rows * t.dim for t in plan.tables) == plan.params["tables"] == \
        sum(p.numel() for p in groups.embedding)
    assert all(0 < t.touched_rows <= t.rows for t in plan.tables)


def test_a_step_holds_no_more_rows_than_the_training_view(caches: dict[int, Path]) -> None:
    """A batch larger than the training view trains on the view's rows: the step's memory was sized for
    the whole batch (~1.7x on a 2,388-row view at batch 4,096), a false 'does not fit' (helper's plan sweep)."""
    train_rows = read_manifest(caches[500]).rows["train"]
    big, exact = plan_of(caches[500], "dnn", "loader.batch_size=65536"), \
        plan_of(caches[500], "dnn", f"loader.batch_size={train_rows}")
    assert big.phase_bytes("step", "device") == exact.phase_bytes("step", "device")
    assert any(f"(batch {train_rows:,}," in line.item for line in big.lines)


def test_evaluation_buffers_hold_only_the_validation_rows_on_cpu(caches: dict[int, Path]) -> None:
    """CPU host buffers are np.empty: a validation set shorter than the buffer sets makes only its rows
    resident; counting every buffer row overestimated a short validation set's peak."""
    plan = plan_of(caches[500], "dnn")
    val_rows = read_manifest(caches[500]).rows["val"]
    train = next(line for line in plan.lines if line.part == "loader")
    sets = int(train.item.split()[0])
    row_bytes = train.nbytes // (sets * 256)
    held = next(line for line in plan.lines if "evaluation batch buffers" in line.item)
    assert 0 < val_rows < sets * 512
    assert held.nbytes == val_rows * row_bytes and f"({val_rows:,} rows written)" in held.item


def test_the_loaders_row_index_is_counted(caches: dict[int, Path]) -> None:
    """The view's int32 index, a gather shuffle's int64 permutation and balanced batches' row lists grow with
    the rows; the plan counted only the batch buffers."""
    train_rows = read_manifest(caches[500]).rows["train"]

    def index(*sets: str) -> int:
        plan = plan_of(caches[500], "dnn", *sets)
        return next(line.nbytes for line in plan.lines if line.item.startswith("row index of the training view"))

    assert index("loader.shuffle_strategy=block") == 4 * train_rows
    assert index("loader.shuffle_strategy=gather") == 12 * train_rows
    assert index("loader.balance_pos_fraction=0.3") == 20 * train_rows


def test_kfold_plans_match_the_cache_folds_and_count_every_folds_files(caches: dict[int, Path],
                                                                       tmp_path: Path) -> None:
    """cv.n_splits the cache lacks is refused as training refuses it; a K-fold plan counts K checkpoints, K
    last states and the out-of-fold predictions, and validates on the largest fold."""
    from ctrpipe.errors import ManifestMismatchError
    from ctrpipe.shard.build import build_shards

    with pytest.raises(ManifestMismatchError, match="K=3 needs a cache with 3 folds"):
        plan_of(caches[500], "dnn", "cv.n_splits=3")
    raw = next(caches[500].parent.glob("syn/train.tsv"))
    cfg = load_config(REPO / "cfgs" / "criteo.yaml", ["data.hash_bins=500", "data.folds.n_splits=3"])
    folded = build_shards(cfg, [raw], tmp_path / "k3", progress=False).manifest
    with pytest.raises(ManifestMismatchError, match="--kfold 3"):
        plan_of(tmp_path / "k3", "dnn", "cv.n_splits=4")
    single, kfold = plan_of(tmp_path / "k3", "dnn"), plan_of(tmp_path / "k3", "dnn", "cv.n_splits=3")
    # checkpoints hold the touched table rows: a fold's view (2/3 of the rows) touches fewer than train (9/10)
    best, last = kfold.disk["ckpt_fold*.pt x3"], kfold.disk["fold*/ckpt_last.pt x3"]
    assert best % 3 == 0 and 2 * single.disk["ckpt_best.pt"] < best <= 3 * single.disk["ckpt_best.pt"]
    assert best < last <= 3 * single.disk["ckpt_last.pt"]
    sizes = folded.folds["sizes"]
    assert kfold.disk["oof.npz"] == sum(sizes) * (8 + 8)
    assert any(f"predictions of {max(sizes):,} validation rows" in line.item for line in kfold.lines)


def test_the_peak_covers_what_a_training_process_holds(caches: dict[int, Path], tmp_path: Path) -> None:
    """The plan left out the process itself (Python, torch and the libraries: hundreds of MB), so it said a run
    fit in memory it did not. Plan and train each in a fresh process, as the commands run."""
    import json
    import subprocess
    import sys

    sets = [x for s in small("dnn") for x in ("--set", s)]
    cfg = str(REPO / "cfgs" / "criteo_dnn.yaml")
    code = ("import sys\nfrom pathlib import Path\nfrom ctrpipe.config import load_config\n"
            "from ctrpipe.tools.planner import estimate\n"
            f"cfg = load_config(Path({cfg!r}), {small('dnn')!r})\n"
            f"print(estimate(cfg, Path({str(caches[1000])!r}), 'cpu', memory=1 << 40).peak())\n")
    planned = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=REPO).stdout.split()[-1])
    subprocess.run([sys.executable, "-m", "ctrpipe.cli", "train", "--cfg", cfg, "--shards", str(caches[1000]),
                    "--runs", str(tmp_path), "-q", *sets, "--set", "train.device=cpu"], check=True, cwd=REPO,
                   capture_output=True)
    used = json.loads((tmp_path / "criteo_dnn" / "metrics.json").read_text())["peak_host_memory_bytes"]
    assert 0.7 * used < planned < 2.0 * used, (planned, used)


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_plan_counts_the_steps_the_loader_serves(caches: dict[int, Path], shuffle: bool) -> None:
    """Unshuffled training keeps its ragged last batch: the plan counted one step fewer per epoch."""
    from ctrpipe.loader.config import LoaderConfig
    from ctrpipe.loader.loader import ShardLoader
    from ctrpipe.loader.view import RowView

    flag = f"loader.shuffle={str(shuffle).lower()}"
    cfg = load_config(REPO / "cfgs" / "criteo_dnn.yaml", [*small("dnn"), flag])
    loader = ShardLoader.from_config(caches[1000], RowView.train(), LoaderConfig(batch_size=256, shuffle=shuffle),
                                     seed=0)
    assert loader.num_rows % 256 > 1
    assert plan_of(caches[1000], "dnn", flag).steps == len(loader) * cfg.train.epochs


def test_weights_that_outgrow_the_memory_are_refused_before_measuring(caches: dict[int, Path]) -> None:
    """No batch size or precision fits weights larger than the memory; measuring steps would allocate them
    (a raw allocator traceback for a model beyond the host's memory)."""
    cfg = load_config(REPO / "cfgs" / "criteo_dnn.yaml", [*SMALL, "model.hidden_units=[4096]"])
    with pytest.raises(ConfigError, match=r"weights of model 'dnn' alone are .* of --memory") as err:
        estimate(cfg, caches[1000], "cpu", memory=1 << 20)
    assert err.value.where == "model"
    huge = load_config(REPO / "cfgs" / "criteo_dnn.yaml", [*SMALL, "model.hidden_units=[1000000, 1000000]"])
    with pytest.raises(ConfigError, match=r"alone are 4.0 TB, more than .* available host RAM"):
        estimate(huge, caches[1000], "cpu")


def test_a_model_too_large_to_measure_here_is_refused_before_measuring(caches: dict[int, Path],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Measuring builds the model's dense part whole on the host and trains it there with gradients and Adam's
    moments: weights of half the available RAM passed the weights check, and planning them for a GPU on a
    machine without one was ended by the OOM killer (helper's sweep). The machine's memory is set here to twice
    a small model's weights: enough for its weights, not for measuring it."""
    from ctrpipe.models.registry import build_model
    from ctrpipe.shard.manifest import read_manifest
    from ctrpipe.tools import planner
    from ctrpipe.tools.memtrack import small_spec

    cfg = load_config(REPO / "cfgs" / "criteo_dnn.yaml", [*SMALL, "model.hidden_units=[2048, 2048]"])
    with torch.device("meta"):
        weights = planner.weight_bytes(build_model("dnn", cfg.model.params,
                                                   small_spec(read_manifest(caches[1000]).feature_spec())))
    monkeypatch.setattr(planner, "available_bytes", lambda: 2 * weights)
    with pytest.raises(ConfigError, match=r"measuring a step of model 'dnn' needs about .* on this machine's CPU"):
        estimate(cfg, caches[1000], "cpu", memory=1 << 40)
    spec = read_manifest(caches[1000]).feature_spec()
    planner._check_measurable(cfg, spec, torch.device("cuda"))          # one copy on the host: fits
    monkeypatch.setattr(planner, "available_bytes", lambda: weights // 2)
    with pytest.raises(ConfigError, match=r"in this machine's RAM before the GPU") as err:
        planner._check_measurable(cfg, spec, torch.device("cuda"))
    assert err.value.where == "model"


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU memory is known there")
def test_a_gpu_plan_without_a_gpu_or_memory_exits_3(caches: dict[int, Path]) -> None:
    """It exited 0, which a script reads as 'fits' (2 is click's usage error)."""
    args = ["plan", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(caches[1000]),
            "--device", "cuda", *[x for s in small("dnn") for x in ("--set", s)]]
    got = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert got.exit_code == 3 and "GPU memory unknown" in got.output, got.output
    assert runner.invoke(app, [*args, "--memory", "1TB"], env={"COLUMNS": "250"}).exit_code == 0


def test_the_plan_refuses_what_train_refuses(caches: dict[int, Path]) -> None:
    """An unknown early-stopping metric: train refuses it before any work, so the plan does not say "fits"."""
    args = ["plan", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(caches[1000]),
            *[x for s in [*small("dnn"), "train.early_stopping.metric=accuracy"] for x in ("--set", s)]]
    res = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert res.exit_code == 1, res.output
    assert "unknown metric 'accuracy'" in res.output and "train.early_stopping.metric" in res.output
    assert "fits" not in res.output


@pytest.mark.parametrize(("sets", "said"), [
    # (a helper's sweep) batch norm on batches of one row: the plan ended in torch's traceback
    (["loader.batch_size=1", "model.batch_norm=true"], "gives batches of one row, and the model's batch norm"),
    # fp16 on a CPU: the plan said "fits", exit 0
    (["train.amp=fp16"], "train.amp=fp16 needs a CUDA device"),
    # --kfold with another cv.n_splits, as train refuses it
    (["cv.n_splits=3", "--kfold", "2"], "--kfold 2 and --set cv.n_splits=3"),
])
def test_the_plan_refuses_the_settings_train_refuses_past_its_config(caches: dict[int, Path], sets: list[str],
                                                                      said: str) -> None:
    opts = [x for s in sets for x in ((s,) if s.startswith("--") or s.isdigit() else ("--set", s))]
    res = runner.invoke(app, ["plan", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(caches[1000]),
                              "--device", "cpu", *[x for s in small("dnn") for x in ("--set", s)], *opts],
                        env={"COLUMNS": "250"})
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and said in text and "Traceback" not in text and "fits" not in text, text


def test_the_plan_takes_trains_kfold(caches: dict[int, Path]) -> None:
    """`plan` had no --kfold, so a train command copied into plan was refused; it plans the folds' runs."""
    res = runner.invoke(app, ["plan", "--cfg", str(REPO / "cfgs" / "criteo_dnn.yaml"), "--shards", str(caches[1000]),
                              "--device", "cpu", "--memory", "1TB", "--kfold", "2",
                              *[x for s in small("dnn") for x in ("--set", s)]], env={"COLUMNS": "250"})
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "K-fold training with K=2 needs a cache with 2 folds" in text, text


def test_a_suggestion_that_fits_only_within_the_plans_error_says_so(caches: dict[int, Path]) -> None:
    """(a helper's sweep) a suggested batch size "would fit" at 843 MB of 900, which the plan of it called narrow
    and which did not fit when trained: a suggestion fits with the margin the verdict keeps, or says it does not."""
    from ctrpipe.tools.plan import PLAN_ERROR

    def peak(b: int) -> int:
        return plan_of(caches[1000], "dnn", f"loader.batch_size={b}", f"loader.eval_batch_size={b}").peak()

    memory = peak(1024)
    assert peak(2048) > memory and peak(64) * PLAN_ERROR > memory      # nothing smaller fits with the margin
    cfg = load_config(REPO / "cfgs" / "criteo_dnn.yaml", [*small("dnn"), "loader.batch_size=2048",
                                                           "loader.eval_batch_size=2048"])
    tips = estimate(cfg, caches[1000], "cpu", memory=memory).suggestions
    batch = [t for t in tips if t.startswith("--set loader.batch_size=")]
    assert batch and batch[0].startswith("--set loader.batch_size=1024 ") and \
        batch[0].endswith("(narrowly: within the plan's error)"), tips
