"""`ctrpipe plan --cfg CFG --shards DIR`: gather what the memory plan needs (tools/plan.py), print it as a table.

Reads the manifest and a sample of the training rows, builds the model on the meta device (parameters
counted exactly, nothing allocated), measures a step on small batches, and compares the peak with the
device's free memory (or host RAM, or `--memory`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.table import Table

from ctrpipe.config import RunConfig, load_config
from ctrpipe.console import console
from ctrpipe.device import check_amp, model_family, predict_amp, resolve_amp
from ctrpipe.errors import ConfigError, SchemaError, human_bytes
from ctrpipe.features import FeatureSpec
from ctrpipe.hostmem import available_bytes
from ctrpipe.loader.loader import drops_ragged_batch
from ctrpipe.models.layers.embedding import split_parameters
from ctrpipe.models.registry import build_model, weight_bytes
from ctrpipe.shard.manifest import read_manifest
from ctrpipe.tools.memtrack import MEASURE_BINS, measure_step_memory, metric_bytes_per_row, small_spec
from ctrpipe.tools.plan import (
    PLAN_ERROR,
    Inputs,
    MemoryPlan,
    Setting,
    check_device,
    device_memory,
    disk_sizes,
    plan_lines,
    process_resident,
    suggestions,
    working_set,
)
from ctrpipe.tools.touched import SAMPLE_ROWS, read_sample, table_use

MEASURE_SIZES = (256, 1024)   # batch sizes a step is measured at (then scaled linearly)


def parse_bytes(text: str) -> int:
    """'16GB', '512MiB', '16G' (GiB, as `free -g` and `docker -m` read it), '1.5e9B' -> bytes. A unit is
    required: '--memory 1.5' was read as 1 byte, and the error then blamed the model's size."""
    units = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        float(num)
    except ValueError:
        num = ""                    # not a number ('abc', '5%'): no unit to suggest for it
    if num and not unit:
        raise ConfigError(f"memory size {text!r} has no unit", where="--memory",
                          fix=f"add one, e.g. --memory {num}GB (or {num}GiB, {num}MB); B for bytes")
    try:
        size = int(float(num) * units[unit])
        if size <= 0:
            raise ValueError(size)
        return size
    except (KeyError, ValueError, OverflowError):
        raise ConfigError(f"cannot read memory size {text!r}", where="--memory",
                          fix="use e.g. --memory 16GB, --memory 80GiB or --memory 16G") from None


def estimate(cfg: RunConfig, shards: Path, device: str, memory: int | None = None) -> MemoryPlan:
    """The memory plan of training `cfg` on the cache `shards` on `device` ("cpu" or "cuda")."""
    from ctrpipe.train.fit import check_batch_norm, check_training, with_cache_data
    from ctrpipe.train.plan import plan_steps

    device = check_device(device)
    process = process_resident()           # before the sample, the model and the measurements below
    manifest = read_manifest(shards)
    train_rows = manifest.rows.get("train", 0)
    if not train_rows or not manifest.label_names:
        from ctrpipe.train.fit import no_training_rows_fix

        raise SchemaError(f"shard cache {shards} has no labelled training rows", where=str(shards / "manifest.json"),
                          fix=no_training_rows_fix(manifest))
    cfg = with_cache_data(cfg, manifest, shards, quiet=False)     # as training does, with the same note
    model, tasks, _ = check_training(cfg, manifest, shards)
    # what train refuses past check_training, on the device planned for
    check_amp(cfg.train.amp, torch.device(device))
    check_batch_norm(cfg, model)
    n_folds = cfg.cv.n_splits
    fold_sizes = [int(n) for n in manifest.folds.get("sizes", [])] if n_folds else []
    # K-fold: the largest fold validates, the view without the smallest trains (the largest of each)
    val_rows = max(fold_sizes) if n_folds else manifest.rows.get("val", 0)
    train_rows = sum(fold_sizes) - min(fold_sizes) if n_folds else train_rows
    spec = manifest.feature_spec()
    available, what = (memory, "--memory") if memory else device_memory(device)
    _check_weights(cfg.model.name, model, available, what)
    n_tasks = len(tasks)
    b = cfg.loader.batch_size
    per_epoch = train_rows // b if drops_ragged_batch(train_rows, b, cfg.loader.shuffle) else -(-train_rows // b)
    steps = plan_steps(cfg.train, train_rows, b, per_epoch).total_steps
    rows_read = min(train_rows, steps * b)
    sizes = tuple(sorted({min(s, b, train_rows) for s in MEASURE_SIZES}))
    sample = read_sample(shards, cfg, max(min(rows_read, SAMPLE_ROWS), sizes[-1]))
    tables = tuple(table_use(model, spec, sample, rows_read))
    measure_on = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    _check_measurable(cfg, spec, measure_on)
    auto = cfg.train.amp == "auto"
    if auto:
        # what training on this machine would pick; planning a GPU from a machine without one assumes fp32,
        # the larger of the two footprints
        amp = resolve_amp("auto", measure_on, model_family(cfg.model.name, cfg.model.params)).precision \
            if measure_on.type == device else "off"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=amp))
    amps = [cfg.train.amp] + (["bf16"] if cfg.train.amp == "off" else [])
    # under auto, evaluation runs in fp32 whatever the steps use (device.predict_amp)
    step_memory = {a: measure_step_memory(cfg, spec, sample, sizes, measure_on, amp=a,
                                          eval_amp=predict_amp("auto") if auto and a == cfg.train.amp else a)
                   for a in amps}
    inp = Inputs(cfg=cfg, manifest=manifest, shards=shards, spec=spec, device=device, tables=tables,
                 dense=_dense_counts(model), step_memory=step_memory,
                 metric_bytes_per_row=metric_bytes_per_row(n_tasks), val_rows=val_rows, n_tasks=n_tasks,
                 train_rows=train_rows, n_folds=n_folds, cv_rows=sum(fold_sizes), process_bytes=process)
    setting = Setting(batch=b, eval_batch=cfg.loader.eval_batch_size, amp=cfg.train.amp,
                      embedding_optimizer=cfg.train.embedding_optimizer)
    groups = split_parameters(model)

    def make(st: Setting, tips: tuple[str, ...] = ()) -> MemoryPlan:
        return MemoryPlan(model=cfg.model.name, device=device, setting=st, lines=tuple(plan_lines(inp, st)),
                          tables=tables, params={"tables": sum(p.numel() for p in groups.embedding),
                                                 "dense": sum(p.numel() for p in groups.dense)},
                          disk=disk_sizes(inp, st), steps=steps, rows_read=rows_read, available=available,
                          available_what=what,
                          measured=f"measured on {measure_on.type} at batch {', '.join(map(str, sizes))}, "
                                   "scaled linearly", suggestions=tips, working=working_set(inp, st))

    plan = make(setting)
    if available is not None and not plan.fits:
        plan = make(setting, tuple(suggestions(inp, setting, available, lambda st: make(st).peak())))
    return plan


def _check_weights(name: str, model: torch.nn.Module, available: int | None, what: str) -> None:
    """No setting (batch, precision, optimizer) fits a model whose weights alone outgrow the memory: say so
    before measuring steps, which would allocate them."""
    weights = weight_bytes(model)
    if available is not None and weights > available:
        raise ConfigError(f"the weights of model {name!r} alone are {human_bytes(weights)}, more than the "
                          f"{human_bytes(available)} of {what}: no batch size or precision fits",
                          where="model", fix="lower the model section's sizes (embedding dims, hidden units, ranks, "
                                             "heads)")


MEASURE_COPIES = 4      # weights, gradients and Adam's two moments of the measuring model, on the CPU


def _check_measurable(cfg: RunConfig, spec: FeatureSpec, measure_on: torch.device) -> None:
    """Refuse to measure steps of a model that would not fit in this machine's RAM: the measuring model (its
    tables cut to MEASURE_BINS rows, its dense part whole) is built on the host, and on a CPU trains there with
    gradients and optimiser state. Planning a large GPU model on a machine without one was ended by the kernel's
    OOM killer, or by a traceback."""
    available = available_bytes()
    if available is None:
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        small = build_model(cfg.model.name, cfg.model.params, small_spec(spec),
                            sparse=cfg.train.sparse_embeddings)
    need = weight_bytes(small) * (MEASURE_COPIES if measure_on.type == "cpu" else 1)
    if need > available:
        where = "on this machine's CPU" if measure_on.type == "cpu" else "in this machine's RAM before the GPU"
        raise ConfigError(f"measuring a step of model {cfg.model.name!r} needs about {human_bytes(need)} "
                          f"{where} (its dense part whole, its tables cut to {MEASURE_BINS:,} rows, with "
                          f"gradients and optimiser state), more than the {human_bytes(available)} available",
                          where="model", fix="lower the model section's sizes (embedding dims, hidden units, ranks, "
                                             "heads), or plan on a machine with more memory (the GPU machine)")


def _dense_counts(model: torch.nn.Module) -> dict[str, int]:
    """Dense parameter count per top-level module (tables excluded)."""
    table_ids = {id(p) for p in split_parameters(model).embedding}
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) not in table_ids:
            top = name.split(".")[0]
            out[top] = out.get(top, 0) + p.numel()
    return out


def run_plan(cfg_path: Path | None, overrides: Sequence[str], shards: Path, device: str | None,
             memory: str | None, kfold: int = 0) -> MemoryPlan:
    """The `ctrpipe plan` command: estimate, then print the table (stderr). `kfold`: train's --kfold."""
    from ctrpipe.train.fit import with_kfold

    cfg = with_kfold(load_config(cfg_path, overrides), kfold)
    if device is None:
        device = "cuda" if cfg.train.device.startswith("cuda") or (
            cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"
    plan = estimate(cfg, Path(shards), device, parse_bytes(memory) if memory else None)
    render(plan)
    return plan


def render(plan: MemoryPlan) -> None:
    st = plan.setting
    cuda = plan.device == "cuda"
    table = Table(title=f"ctrpipe plan: {plan.model} on {plan.device}, batch {st.batch:,}, amp {st.amp}, "
                        f"embedding_optimizer {st.embedding_optimizer}")
    for col in ("part", "what", "phase"):
        table.add_column(col)
    table.add_column("GPU" if cuda else "memory", justify="right")
    if cuda:
        table.add_column("host", justify="right")
    for line in plan.lines:
        size = human_bytes(line.nbytes)
        cells = [line.part, line.item, line.phase]
        if cuda:
            cells += [size, ""] if line.where == "device" else ["", size]
        else:
            cells.append(size)
        table.add_row(*cells, style="dim" if line.note == "part of the step peak" else None)
    peak = [human_bytes(plan.peak("device"))] + ([human_bytes(plan.peak("host"))] if cuda else [])
    if plan.working is not None:
        table.add_row("working set", "steps + evaluation forwards replayed through glibc malloc (heap kept, "
                      "mmaps freed)", "step, eval", human_bytes(plan.working))
    rule = ("resident + max(step, eval, checkpoint)" if cuda else "resident + max(step, eval) + checkpoint"
            if plan.working is None else "resident + working set + rest of eval + checkpoint")
    table.add_row("[bold]peak[/]", rule, "", *peak)
    console.print(table)
    console.print(f"parameters: {plan.params['tables']:,} in tables, {plan.params['dense']:,} dense; "
                  f"{plan.steps:,} steps read {plan.rows_read:,} distinct rows; activations {plan.measured}")
    console.print("on disk: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in plan.disk.items()))
    if plan.available is None:
        console.print(f"[yellow]{plan.available_what}[/]")
        return
    verdict = f"peak {human_bytes(plan.peak())} vs {human_bytes(plan.available)} {plan.available_what}"
    if plan.fits and plan.peak() * PLAN_ERROR <= plan.available:
        console.print(f"[green]fits:[/] {verdict}")
        return
    if plan.fits:       # a script still reads exit 0; the person reading is told the margin is thin
        console.print(f"[yellow]fits, narrowly:[/] {verdict}: the plan is within 20% of measured peaks either "
                      f"way (benchmarks/RESULTS.md), so leave {human_bytes(plan.peak() * PLAN_ERROR)} or lower a "
                      "setting (loader.batch_size, for one) to be sure")
        return
    console.print(f"[bold yellow]warning: does not fit:[/] {verdict}. Settings that would make it fit:")
    for tip in plan.suggestions or ("none of batch size, bf16, lazy_adam or fewer bins is enough alone",):
        console.print(f"  {tip}")

