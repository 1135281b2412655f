"""Serving: `ctrpipe export --run RUN --format torchscript|onnx`: the run's checkpoints, sampling shift,
calibration and fold ensemble as one model with a dynamic batch dimension, plus `model.json` describing its
inputs (one tensor per stored array group, in the loader's order, with its name in the ONNX graph), outputs,
the preprocessing a server must apply and the size of the embedding tables.

Both formats hold the same `ServingModule`: a tuple of input tensors -> (B, H) float64 probabilities. Fold
ensembling supports the per-row methods logit_mean / weighted / mean / geom_mean; median, trim_mean and
rank_avg are refused (rank_avg needs the whole set).

* torchscript -> model.pt: traced (`torch.jit.trace`) on a few real rows of the training cache.
* onnx -> model.onnx (+ model.onnx.data when the weights pass protobuf's 2 GB limit): the dynamo exporter,
  `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript's translation), with a symbolic batch
  dimension. Not the TorchScript-based exporter (dynamo=False): it has no ONNX form for embedding_bag with a
  padding index (the multi-hot and sequence inputs of the multi-task and sequence families) nor for
  linalg_vecdot (DeepFM), so it fails for 9 of the 17 families. The export is checked with onnxruntime against
  the eager module on the example rows at two batch sizes before anything is written. Needs the `onnx` extra
  (`pip install 'ctrpipe[onnx]'`: onnx, onnxscript, onnxruntime).

Every model family exports in both formats: under tracing and torch.export the layers' hand-written autograd
Functions give way to plain torch ops (models/layers/fused.py::eager_kernels), and under torch.export the
multi-hot / sequence bags are a gather and a weighted sum instead of an embedding bag, which onnxscript lowers
to a loop with one step per bag (models/layers/embedding.py); the errors below catch any new obstacle.

Files are written into a temporary folder inside --out and moved into place when complete, model.json last,
so a failed export leaves no model file that looks complete. model.json describes the latest export and, under
"exports", the other format's export of the same checkpoints when it is in the folder.

Embedding tables are exported whole. Exporting only the rows training touched is not sound (see
`embedding_tables`): model.json reports each table's size and how many of its rows training changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ctrpipe.atomic import folder_lock, write_json_atomic
from ctrpipe.config import RunConfig
from ctrpipe.device import predict_amp
from ctrpipe.errors import BusyError, ConfigError
from ctrpipe.infer.ensemble import EPS
from ctrpipe.infer.predict import find_checkpoints
from ctrpipe.infer.submission import shard_cache_holding
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.buffers import Layout
from ctrpipe.models.heads import as_output
from ctrpipe.serve.predictor import SUBMISSION_ONLY, Predictor, method_source
from ctrpipe.train.checkpoint import Checkpoint, load_checkpoint

EXPORT_METHODS = ("logit_mean", "weighted", "mean", "geom_mean")
FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}     # format -> model file in --out
ONNX_OUTPUT = "probabilities"
ONNX_TOL = 1e-5      # onnxruntime vs the eager module, absolute, on probabilities
_TMP_PREFIX = ".export-"       # the working folder inside --out, renamed from when complete


def input_fields(layout: Layout) -> list[tuple[str, int | None, str, tuple[int, ...], str]]:
    """(Batch field, tuple position or None, group, row shape, dtype) of each model input, in order."""
    out = []
    for name in ("numeric", "categorical", "multihot", "multihot_len", "multihot_weights", "sequence",
                 "sequence_len"):
        spec = getattr(layout, name)
        items = list(enumerate(spec)) if isinstance(spec, tuple) else [(None, spec)]
        out += [(name, i, a.group, a.row_shape, str(a.dtype)) for i, a in items if a is not None]
    return out


def input_names(layout: Layout) -> list[str]:
    """The inputs' names in the ONNX graph: the Batch field, with its index for per-group tuples."""
    return [name if i is None else f"{name}_{i}" for name, i, *_ in input_fields(layout)]


class ServingModule(nn.Module):
    """inputs (tuple, `input_fields` order) -> (B, H) float64 calibrated, fold-combined probabilities."""

    def __init__(self, p: Predictor) -> None:
        super().__init__()
        self.nets = nn.ModuleList([m.net for m in p.models])
        self.fields = input_fields(p.layout)
        self.layout = p.layout
        self.method = p.cfg.infer.method
        k = len(p.models)
        w = np.asarray(p.weights if p.weights is not None else np.full(k, 1.0 / k), dtype=np.float64)
        self.register_buffer("weights", torch.tensor(w / w.sum()).reshape(k, 1, 1))             # (K, 1, 1)
        self.register_buffer("shift", torch.tensor([m.shift for m in p.models], dtype=torch.float32))  # (K, H)
        cals = p.calibrations
        self.register_buffer("temperature", torch.tensor([c.temperature for c in cals], dtype=torch.float64))
        self.register_buffer("cal_shift", torch.tensor([c.shift for c in cals], dtype=torch.float64))
        self.register_buffer("cal_on", torch.tensor([not (c.method == "none" and c.shift == 0.0) for c in cals]))

    def _batch(self, inputs: tuple[Tensor, ...]) -> Batch:
        vals: dict[str, object] = {}
        for (name, i, *_), t in zip(self.fields, inputs, strict=True):
            if i is None:
                vals[name] = t
            else:
                vals.setdefault(name, {})[i] = t       # type: ignore[index]
        for name in ("multihot", "multihot_len", "sequence", "sequence_len", "multihot_weights"):
            spec = getattr(self.layout, name)
            got = vals.get(name, {})
            vals[name] = tuple(got.get(i) for i in range(len(spec)))   # type: ignore[union-attr]
        rows = inputs[0].new_zeros(inputs[0].shape[0], dtype=torch.int64)   # dynamic B under tracing
        return Batch(numeric=vals.get("numeric"), categorical=vals.get("categorical"), labels=None,  # type: ignore[arg-type]
                     row_index=rows, **{k: v for k, v in vals.items()  # type: ignore[arg-type]
                                        if k not in ("numeric", "categorical")})

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor:
        batch = self._batch(inputs)
        z = torch.stack([as_output(net(batch)).logits.float().reshape(-1, self.shift.shape[1])
                         for net in self.nets]) + self.shift[:, None, :]                        # (K, B, H)
        # Calibration.apply: float64 arithmetic, back to float32; then sigmoid and combine in float64
        cal = (z.double() / self.temperature + self.cal_shift).float()
        z = torch.where(self.cal_on, cal, z).double()
        p = torch.sigmoid(z)
        if self.method in ("logit_mean", "weighted"):
            # ensemble.logit: each model's logit of its probability clipped to [EPS, 1 - EPS], as combine() takes
            # it (a fold's logit of 18 counts as 16.1 there)
            pc = p.clamp(EPS, 1.0 - EPS)
            return torch.sigmoid((self.weights * (torch.log(pc) - torch.log1p(-pc))).sum(0))
        if self.method == "mean":
            return (self.weights * p).sum(0)
        return torch.exp((self.weights * torch.log(p.clamp(EPS, 1.0 - EPS))).sum(0))     # geom_mean


def example_inputs(p: Predictor, batch: Batch) -> tuple[Tensor, ...]:
    out = []
    for name, i, *_ in input_fields(p.layout):
        v = getattr(batch, name)
        out.append(v if i is None else v[i])
    return tuple(out)


def export_model(run: Path, out: Path, fmt: str = "torchscript", rows: object = None, cache: Path | None = None,
                 overrides: Sequence[str] = ()) -> Path:
    """Export the run into out/model.pt or out/model.onnx (+ out/model.json); returns the model file.

    `rows`: raw rows to trace on (default: the first rows of the training cache, read back from its shards).
    `cache` and `overrides` as `Predictor.load` takes them (the cache's new place; infer.* settings).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not supported", where="--format",
                          fix=f"use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()          # before the minutes of loading and exporting
    for text in overrides:      # Predictor.load refuses these too, with a fix for predict
        key = text.split("=", 1)[0].strip()
        if key in SUBMISSION_ONLY:
            raise ConfigError(f"--set {text}: {key} shapes `ctrpipe infer`'s submission; an export outputs every "
                              "head", where="--set",
                              fix=f"drop --set {key}: take the head's column of the output (model.json's "
                                  "outputs.heads gives their order)")
    run, out = Path(run), Path(out)

    def refuse(cfg: RunConfig) -> None:
        # median, trim_mean and rank_avg: `ctrpipe predict` serves the per-row ones, but the exported module
        # averages only. Checked before Predictor.load's checks of their settings (trim_mean's ratio), whose
        # fixes would name methods export refuses
        if cfg.infer.method not in EXPORT_METHODS:
            raise ConfigError(f"infer.method={cfg.infer.method} cannot be exported: the exported model combines "
                              f"its folds with {', '.join(EXPORT_METHODS)} only", where=method_source(overrides),
                              fix=f"export with one of {', '.join(EXPORT_METHODS)}, e.g. --set "
                                  "infer.method=logit_mean")

    p = Predictor.load(run, cache=cache, overrides=overrides, refuse=refuse, quiet=False)
    o, c = out.resolve(), p.cache_dir.resolve()
    if o == c or c in o.parents:        # as infer and predict refuse: the cache's folder is the build's
        raise ConfigError(f"--out {out} is inside the training cache {p.cache_dir}, which serving reads",
                          where=f"--out {out}", fix=f"export outside the cache's folder, e.g. --out {run / 'export'}")
    if (other := shard_cache_holding(o)) is not None:      # any cache's folder is its build's
        raise ConfigError(f"--out {out} is inside the shard cache {other}, whose folder belongs to `ctrpipe shard`",
                          where=f"--out {out}", fix=f"export outside the cache's folder, e.g. --out {run / 'export'}")
    batch = p.batch(rows) if rows is not None else cache_batch(p, 8)
    module = ServingModule(p).eval()
    inputs = example_inputs(p, batch)
    out.mkdir(parents=True, exist_ok=True)
    # one export at a time per folder: a second one (the other format, into the same folder) removed the
    # first's working folder as a killed export's and failed it with an error blaming the model
    busy = BusyError(f"another `ctrpipe export` is writing into {out} right now", where=str(out),
                     fix="run this export when it has finished (both formats may share the folder), or pass "
                         "another --out")
    with folder_lock(out, lambda: busy):
        return _export_into(p, run, out, fmt, module, inputs)


def _export_into(p: Predictor, run: Path, out: Path, fmt: str, module: ServingModule,
                 inputs: tuple[Tensor, ...]) -> Path:
    for stale in out.glob(f"{_TMP_PREFIX}*"):      # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=_TMP_PREFIX) as tmp_dir:
        tmp = Path(tmp_dir)
        if fmt == "torchscript":
            _torchscript(p, run, module, inputs, tmp / FORMATS[fmt])
        else:
            _onnx(p, run, module, inputs, tmp / FORMATS[fmt])
        files = sorted(f.name for f in tmp.iterdir())
        doc = describe(p, fmt)
        doc["files"] = files
        doc["embedding_tables"] = embedding_tables(p, [load_checkpoint(c) for c in find_checkpoints(run)])
        doc["source"] = _source(run)
        doc["exports"] = {fmt: {"file": FORMATS[fmt], "files": files, "call": CALLS[fmt]}}
        # the other format's export of the same checkpoints, ensemble and calibration, when it is in the
        # folder, stays listed: one model.json describes both (everything but the model file and its call is
        # the same); an export with other infer settings replaces it
        prev = _read_json(out / "model.json")
        same = prev is not None and _shared(prev) == _shared(doc)
        outdated: list[str] = []         # the other format's files of an export this one does not match
        for other, entry in dict((prev or {}).get("exports") or {}).items():
            if other == fmt or not isinstance(entry, dict):
                continue
            if same and all((out / n).is_file() for n in entry.get("files", ())):
                doc["exports"][other] = entry
            else:       # another run's (or other settings') model beside this one would read as its twin
                outdated += [n for n in entry.get("files", ()) if isinstance(n, str) and n not in files and
                             Path(n).name == n]
        write_json_atomic(tmp / "model.json", doc)
        # the model's files first, model.json last; then a weights file of an earlier export that this one
        # does not have goes (read by nothing now; removed before, it would leave the old graph without it)
        for name in files:
            os.replace(tmp / name, out / name)
        os.replace(tmp / "model.json", out / "model.json")
        stale_data = out / f"{FORMATS[fmt]}.data"
        if stale_data.name not in files:
            stale_data.unlink(missing_ok=True)
        for name in outdated:
            (out / name).unlink(missing_ok=True)
    return out / FORMATS[fmt]


def _source(run: Path) -> dict[str, object]:
    """The run folder and its checkpoints (name, size, modification time): what an export was made from."""
    return {"run": str(run.resolve()),
            "checkpoints": [[c.name, c.stat().st_size, c.stat().st_mtime_ns] for c in find_checkpoints(run)]}


_PER_FORMAT = ("format", "file", "call", "files", "exports")


def _shared(doc: dict[str, Any]) -> dict[str, Any]:
    """What model.json says of both formats' exports: all but the model file and how to call it."""
    return json.loads(json.dumps({k: v for k, v in doc.items() if k not in _PER_FORMAT}))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _torchscript(p: Predictor, run: Path, module: ServingModule, inputs: tuple[Tensor, ...], dest: Path) -> None:
    # saved without gradients: a caller's `model(inputs).numpy()` (model.json's call) refused an output that
    # required grad
    for param in module.parameters():
        param.requires_grad_(False)
    try:
        with torch.no_grad(), _quiet():     # TracerWarnings: the parity tests check what they warn about
            traced = torch.jit.trace(module, (inputs,), check_trace=False)
    except RuntimeError as exc:
        if "Could not export Python function call" not in str(exc):
            raise
        fn = str(exc).split("'")[1] if "'" in str(exc) else "?"
        raise ConfigError(f"model {p.models[0].net.__class__.__name__} uses the custom autograd function {fn}, "
                          "which TorchScript tracing cannot record", where=str(run),
                          fix="give that layer a plain-torch path under torch.jit.is_tracing() (as "
                              "models/layers/fused.py does), or serve with ctrpipe.Predictor") from None
    traced.save(str(dest))


class _Positional(nn.Module):
    """The ServingModule with one positional argument per input: an ONNX graph's inputs are flat and named."""

    def __init__(self, module: ServingModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.module(inputs)


def _require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}, which is not installed", where="--format onnx",
                          fix="pip install 'ctrpipe[onnx]' (or: pip install -e '.[onnx]' in a checkout), "
                              "or export with --format torchscript")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines, warnings and log records (e.g. 'torchvision is not installed') would
    bury the command's own output; errors still propagate."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _onnx(p: Predictor, run: Path, module: ServingModule, inputs: tuple[Tensor, ...], dest: Path) -> None:
    """torch.onnx.export(dynamo=True) with a symbolic batch size, then an onnxruntime check against the
    eager module (at the example's batch size and one row fewer) before the caller moves the file into place."""
    names = input_names(p.layout)
    batch_dim = torch.export.Dim("B", min=1)
    net = p.models[0].net.__class__.__name__
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(_Positional(module), inputs, dynamo=True, input_names=names,
                                        output_names=[ONNX_OUTPUT], optimize=True, verbose=False,
                                        dynamic_shapes=(tuple({0: batch_dim} for _ in inputs),))
            assert program is not None
            # weights inline unless protobuf's 2 GB limit needs them in model.onnx.data
            program.save(str(dest), external_data=None)
    except Exception as exc:       # torch.export and the ONNX translation raise many types; name the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model {net} cannot be exported to ONNX: {type(exc).__name__}: {first[:300]}",
                          where=str(run), fix="export with --format torchscript, or serve with "
                                              "ctrpipe.Predictor; a layer that runs Python per batch (a "
                                              "custom autograd Function, a loop over rows) needs a plain-torch "
                                              "path under torch.compiler.is_exporting()") from exc
    _check_onnx(dest, module, inputs, names, net, run)


def _check_onnx(path: Path, module: ServingModule, inputs: tuple[Tensor, ...], names: list[str], net: str,
                run: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = inputs[0].shape[0]
    for b in sorted({n, max(1, n - 1)}):
        x = tuple(t[:b] for t in inputs)
        with torch.no_grad():
            want = module(x).numpy()
        got = session.run([ONNX_OUTPUT], {k: t.numpy() for k, t in zip(names, x, strict=True)})[0]
        err = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        if not err <= ONNX_TOL:
            raise ConfigError(f"the ONNX export of model {net} does not reproduce it: onnxruntime's "
                              f"probabilities differ by {err:.3g} (shape {got.shape} vs {want.shape}) on {b} rows",
                              where=str(run), fix="export with --format torchscript, or serve with "
                                                  "ctrpipe.Predictor")


def embedding_tables(p: Predictor, ckpts: list[Checkpoint]) -> dict[str, object]:
    """Size of each embedding table of the exported model and how many of its rows training changed (the rows
    the checkpoint stores); the exported model holds every row, see `note`."""
    tables = []
    for k, (m, ckpt) in enumerate(zip(p.models, ckpts, strict=True)):
        for name, t in ckpt.weights["tables"].items():
            w = m.net.get_parameter(name)
            tables.append({"checkpoint": k, "table": name, "rows": w.shape[0], "dim": w.shape[1],
                           "dtype": str(w.dtype).removeprefix("torch."), "bytes": w.numel() * w.element_size(),
                           "rows_touched_by_training": int(t["rows"].numel())})
    return {
        "tables": tables, "total_bytes": sum(int(t["bytes"]) for t in tables),   # type: ignore[call-overload]
        "note": "The exported model holds every row. Exporting only the rows training touched is not sound in general: "
                "an id never seen in training (a new hashed value, or a hash bin no training row fell into) "
                "still looks up its row at serving time, and that row holds the random vector initialisation "
                "drew from the run's seed, which the model's output depends on. Dropping untouched rows would "
                "need those ids remapped (e.g. to a shared row), which changes their predictions.",
    }


def cache_batch(p: Predictor, n: int) -> Batch:
    """The first n rows of the training cache as the loader serves them (trace example and parity checks)."""
    from ctrpipe.loader.loader import ShardLoader
    from ctrpipe.loader.view import RowView

    loader = ShardLoader(p.cache_dir, RowView(splits=("train", "val")), n, shuffle=False, seed=0,
                         device=torch.device("cpu"), with_labels=False)
    return next(iter(loader))


CALLS = {"torchscript": "model(inputs: tuple of tensors in this order) -> (B, H) float64",
         "onnx": f"session.run(['{ONNX_OUTPUT}'], {{input name: array}}) -> [(B, H) float64]"}


def precision_note(p: Predictor) -> str:
    """Why the export's probabilities differ from `ctrpipe infer` / `predict` on a run that predicts in bf16 or
    fp16 ("" when it predicts in fp32): the exported module computes in fp32, whatever the run predicts in."""
    amp = predict_amp(p.cfg.train.amp)
    if amp == "off":
        return ""
    return (f"the run predicts in {amp} (train.amp={p.cfg.train.amp}); the export computes in fp32, so its "
            "probabilities differ from `ctrpipe infer` / `predict` (by ~1e-3 on a typical row; to compare them, "
            "predict with --set train.amp=off)")


def describe(p: Predictor, fmt: str = "torchscript") -> dict[str, object]:
    """model.json: inputs (name, dtype, shape with B dynamic), outputs, and the preprocessing metadata."""
    m = p.manifest
    return {
        "format": fmt, "file": FORMATS[fmt], "call": CALLS[fmt],
        "inputs": [{"name": n, "field": f, "index": i, "group": g, "dtype": dt, "shape": ["B", *shape]}
                   for n, (f, i, g, shape, dt) in zip(input_names(p.layout), input_fields(p.layout), strict=True)],
        "outputs": {"name": ONNX_OUTPUT, "heads": list(p.heads), "dtype": "float64", "shape": ["B", len(p.heads)],
                    "meaning": "calibrated probability, folds combined by infer.method"},
        "precision": {"computes_in": "fp32", "run_predicts_in": "fp32" if predict_amp(p.cfg.train.amp) == "off"
                      else predict_amp(p.cfg.train.amp), "note": precision_note(p)},
        "ensemble": {"method": p.cfg.infer.method, "checkpoints": len(p.models),
                     "weights": list(p.weights) if p.weights is not None else None},
        "calibration": [dataclasses.asdict(c) for c in p.calibrations],
        "preprocessing": {"data": m.config, "columns": [dataclasses.asdict(c) for c in m.columns
                                                        if c.kind not in ("label", "id")],
                          "fitted": m.fitted, "training_cache": str(p.cache_dir.resolve()),
                          "note": "apply the shard build's transforms (ctrpipe.serve.Predictor.batch does)"},
    }
