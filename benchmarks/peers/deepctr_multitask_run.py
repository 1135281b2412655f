"""Peer runner: DeepCTR-Torch trains one multi-task model on the exported features; prints `RESULT {json}`.

Run by benchmarks/bench_multitask.py inside .bench/peers-venv. Uses the library's public API only: feature
columns (SparseFeat, VarLenSparseFeat with mean pooling, DenseFeat), a multi-task model class,
`compile("adam", [bce, bce])`, `fit`, `predict`. Every L2 term is 0 and dropout / batch norm are off, as on
the ctrpipe side; everything else (initialisation, summed loss, input packing) is the library's default.

Labels: the exported (clicked, converted) columns as they are, so the second task is conversion over every
row (= click and conversion: conversions only follow clicks); DeepCTR-Torch has no label masks. ESMM trains
on (ctr, ctcvr) = the same two columns, as its `task_names` say. Predictions: (N, 2) in that order.
"""

from __future__ import annotations

import argparse
import os

# deepctr_torch's import starts a thread that asks the package index for a newer release; a dead
# proxy makes it fail at once instead of sending one query per run (the benchmark sets this too).
os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")
os.environ.setdefault("HTTP_PROXY", "http://127.0.0.1:9")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import Export, Split, Timer, load_export, parse_args, report, set_threads  # noqa: E402

MODELS = ("shared_bottom", "mmoe", "ple", "esmm")


def sizes(ap: argparse.ArgumentParser) -> None:
    """The multi-task sizes (the shared --hidden is the bottom, each expert, or each ESMM tower)."""
    ap.add_argument("--tower", default="64", help="each task's tower (shared_bottom, mmoe, ple)")
    ap.add_argument("--n-experts", type=int, default=4, help="mmoe")
    ap.add_argument("--levels", type=int, default=2, help="ple extraction levels")
    ap.add_argument("--ple-experts", type=int, default=2, help="ple shared experts = experts per task, per level")


def build(name: str, args: argparse.Namespace, cols: list, task_names: tuple[str, str]):
    """The model and how it maps to the benchmark's names.

    shared_bottom: SharedBottom, bottom = --hidden, one tower per task.
    mmoe:          MMOE, --n-experts experts of --hidden, a linear gate per task (gate_dnn_hidden_units=()).
    ple:           PLE, --levels levels of --ple-experts shared + --ple-experts per-task experts, linear
                   gates. The library builds its shared experts with the per-task count, so the two counts
                   must be equal here.
    esmm:          ESMM: two towers of --hidden over the shared embeddings, p_ctcvr = p_ctr * p_cvr.
    """
    from deepctr_torch.models import ESMM, MMOE, PLE, SharedBottom

    hidden, tower = tuple(args.hidden), tuple(int(h) for h in args.tower.split(",") if h)
    common = dict(l2_reg_linear=0.0, l2_reg_embedding=0.0, l2_reg_dnn=0.0, dnn_dropout=0.0, dnn_use_bn=False,
                  seed=args.seed, device="cpu", task_types=("binary", "binary"), task_names=task_names)
    if name == "shared_bottom":
        return SharedBottom(cols, bottom_dnn_hidden_units=hidden, tower_dnn_hidden_units=tower, **common)
    if name == "mmoe":
        return MMOE(cols, num_experts=args.n_experts, expert_dnn_hidden_units=hidden, gate_dnn_hidden_units=(),
                    tower_dnn_hidden_units=tower, **common)
    if name == "ple":
        return PLE(cols, shared_expert_num=args.ple_experts, specific_expert_num=args.ple_experts,
                   num_levels=args.levels, expert_dnn_hidden_units=hidden, gate_dnn_hidden_units=(),
                   tower_dnn_hidden_units=tower, **common)
    if name == "esmm":
        return ESMM(cols, tower_dnn_hidden_units=hidden, **common)
    raise ValueError(name)


def feature_columns(data: Export, dim: int) -> list:
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    cols: list = [SparseFeat(f, vocabulary_size=b, embedding_dim=dim)
                  for f, b in zip(data.cat_fields, data.bins, strict=True)]
    for f, b in zip(data.bag_fields, data.bag_bins, strict=True):
        width = data.train.bags[f].shape[1]
        # mean over the non-zero ids of the row (id 0 = padding), as ctrpipe pools bags and sequences
        cols.append(VarLenSparseFeat(SparseFeat(f, vocabulary_size=b, embedding_dim=dim), maxlen=width,
                                     combiner="mean"))
    return cols + [DenseFeat(f, 1) for f in data.num_fields]


def inputs(data: Export, split: Split) -> dict[str, np.ndarray]:
    x = {f: split.cat[:, j] for j, f in enumerate(data.cat_fields)}
    x.update(split.bags)
    x.update({f: split.num[:, j] for j, f in enumerate(data.num_fields)})
    return x


def main() -> None:
    args = parse_args(MODELS, sizes)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import deepctr_torch

    data = load_export(args.data)
    if data.train.labels is None or data.train.labels.shape[1] != 2:
        raise SystemExit(f"{args.data}: the export needs exactly two labels (click, conversion)")
    task_names = ("ctr", "ctcvr") if args.model == "esmm" else tuple(data.label_names)
    model = build(args.model, args, feature_columns(data, args.embedding_dim), task_names)
    model.compile(torch.optim.Adam(model.parameters(), lr=args.lr),
                  ["binary_crossentropy", "binary_crossentropy"], metrics=[])
    n_params = sum(p.numel() for p in model.parameters())
    x_train, x_test = inputs(data, data.train), inputs(data, data.test)
    # fit() includes the library's own input packing (one concatenate of the columns); verbose=2 keeps tqdm
    # off and, with no metrics, nothing extra runs per batch
    with Timer() as t:
        model.fit(x_train, data.train.labels, batch_size=args.batch_size, epochs=args.epochs, verbose=2,
                  shuffle=True)
    pred = model.predict(x_test, batch_size=16384)                       # (N, 2) probabilities
    report("deepctr-torch", deepctr_torch.__version__, args, len(data.train.y), t.seconds, pred, n_params,
           notes=f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
