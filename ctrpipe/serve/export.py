"""Serving: `ctrpipe export --run RUN --format torchscript`: the run's checkpoints, sampling shift, calibration
and fold ensemble as one TorchScript module with a dynamic batch dimension, plus `model.json` describing its
inputs (one tensor per stored array group, in the loader's order) and the preprocessing a server must apply.

The module is traced (`torch.jit.trace`) on a few real rows of the training cache, taking one tuple of
tensors and returning (B, H) float64 probabilities. Fold ensembling supports the per-row methods
logit_mean / weighted / mean / geom_mean; median, trim_mean and rank_avg are refused (rank_avg needs the
whole set). Every model family traces: under tracing the layers' hand-written autograd Functions give way to
plain torch ops (models/layers/fused.py::eager_kernels); the error below catches any new one. ONNX is not
done yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ctrpipe.atomic import write_json_atomic
from ctrpipe.errors import ConfigError
from ctrpipe.infer.predict import find_checkpoints
from ctrpipe.loader.batch import Batch
from ctrpipe.loader.buffers import Layout
from ctrpipe.models.heads import as_output
from ctrpipe.serve.predictor import Predictor
from ctrpipe.train.checkpoint import Checkpoint, load_checkpoint

EXPORT_METHODS = ("logit_mean", "weighted", "mean", "geom_mean")
_EPS = 1e-7      # ensemble.EPS: geom_mean clips probabilities as combine() does


def input_fields(layout: Layout) -> list[tuple[str, int | None, str, tuple[int, ...], str]]:
    """(Batch field, tuple position or None, group, row shape, dtype) of each model input, in order."""
    out = []
    for name in ("numeric", "categorical", "multihot", "multihot_len", "multihot_weights", "sequence",
                 "sequence_len"):
        spec = getattr(layout, name)
        items = list(enumerate(spec)) if isinstance(spec, tuple) else [(None, spec)]
        out += [(name, i, a.group, a.row_shape, str(a.dtype)) for i, a in items if a is not None]
    return out


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
        self.register_buffer("cal_on", torch.tensor([not (c.method == "none" and c.keep_rate == 1.0)
                                                     for c in cals]))

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
            return torch.sigmoid((self.weights * z).sum(0))
        if self.method == "mean":
            return (self.weights * p).sum(0)
        return torch.exp((self.weights * torch.log(p.clamp(_EPS, 1.0 - _EPS))).sum(0))     # geom_mean


def example_inputs(p: Predictor, batch: Batch) -> tuple[Tensor, ...]:
    out = []
    for name, i, *_ in input_fields(p.layout):
        v = getattr(batch, name)
        out.append(v if i is None else v[i])
    return tuple(out)


def export_torchscript(run: Path, out: Path, rows: object = None) -> Path:
    """Trace the run into out/model.pt (+ out/model.json); `rows`: raw rows to trace on (default: the first
    rows of the training cache, read back from its shards)."""
    p = Predictor.load(run)
    if p.cfg.infer.method not in EXPORT_METHODS:
        raise ConfigError(f"infer.method={p.cfg.infer.method} cannot be exported (it needs more than one row)",
                          where="infer.method", fix=f"export with one of {', '.join(EXPORT_METHODS)}")
    batch = p.batch(rows) if rows is not None else cache_batch(p, 8)
    module = ServingModule(p).eval()
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module, (example_inputs(p, batch),), check_trace=False)
    except RuntimeError as exc:
        if "Could not export Python function call" not in str(exc):
            raise
        fn = str(exc).split("'")[1] if "'" in str(exc) else "?"
        raise ConfigError(f"model {p.models[0].net.__class__.__name__} uses the custom autograd function {fn}, "
                          "which TorchScript tracing cannot record", where=str(run),
                          fix="give that layer a plain-torch path under torch.jit.is_tracing() (as "
                              "models/layers/fused.py does), or serve with ctrpipe.Predictor") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    traced.save(str(out / "model.pt"))
    doc = describe(p)
    doc["embedding_tables"] = embedding_tables(p, [load_checkpoint(c) for c in find_checkpoints(Path(run))])
    write_json_atomic(out / "model.json", doc)
    return out / "model.pt"


def embedding_tables(p: Predictor, ckpts: list[Checkpoint]) -> dict[str, object]:
    """Size of each embedding table in model.pt and how many of its rows training changed (the rows the
    checkpoint stores); model.pt holds every row, see `note`."""
    tables = []
    for k, (m, ckpt) in enumerate(zip(p.models, ckpts, strict=True)):
        for name, t in ckpt.weights["tables"].items():
            w = m.net.get_parameter(name)
            tables.append({"checkpoint": k, "table": name, "rows": w.shape[0], "dim": w.shape[1],
                           "dtype": str(w.dtype).removeprefix("torch."), "bytes": w.numel() * w.element_size(),
                           "rows_touched_by_training": int(t["rows"].numel())})
    return {
        "tables": tables, "total_bytes": sum(int(t["bytes"]) for t in tables),   # type: ignore[call-overload]
        "note": "model.pt holds every row. Exporting only the rows training touched is not sound in general: "
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


def describe(p: Predictor) -> dict[str, object]:
    """model.json: inputs (name, dtype, shape with B dynamic), outputs, and the preprocessing metadata."""
    m = p.manifest
    return {
        "format": "torchscript", "call": "model(inputs: tuple of tensors in this order) -> (B, H) float64",
        "inputs": [{"field": f, "index": i, "group": g, "dtype": dt, "shape": ["B", *shape]}
                   for f, i, g, shape, dt in input_fields(p.layout)],
        "outputs": {"heads": list(p.heads), "dtype": "float64", "shape": ["B", len(p.heads)],
                    "meaning": "calibrated probability, folds combined by infer.method"},
        "ensemble": {"method": p.cfg.infer.method, "checkpoints": len(p.models),
                     "weights": list(p.weights) if p.weights is not None else None},
        "calibration": [dataclasses.asdict(c) for c in p.calibrations],
        "preprocessing": {"data": m.config, "columns": [dataclasses.asdict(c) for c in m.columns
                                                        if c.kind not in ("label", "id")],
                          "fitted": m.fitted, "training_cache": str(p.cache_dir.resolve()),
                          "note": "apply the shard build's transforms (ctrpipe.serve.Predictor.batch does)"},
    }
