"""Peer runner: DeepCTR-Torch trains one model on the exported features; prints `RESULT {json}`.

Run by benchmarks/bench_quality.py inside .bench/peers-venv. Uses the library's public API only:
feature columns (SparseFeat / DenseFeat), a model class, `compile("adam", ...)`, `fit`, `predict`.
Every L2 term is set to 0 and dropout/batch norm are off, as on the ctrpipe side; everything else
(initialisation, loss reduction, input layout) is the library's default.
"""

from __future__ import annotations

import os

# deepctr_torch's import starts a thread that asks the package index for a newer release; a dead
# proxy makes it fail at once instead of sending one query per run (the benchmark sets this too).
os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")
os.environ.setdefault("HTTP_PROXY", "http://127.0.0.1:9")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import Timer, load_export, parse_args, report, set_threads  # noqa: E402

MODELS = ("dnn", "deepfm", "dcnv2", "dcnmix", "autoint")


def build(name: str, args, sparse_cols: list, dense_cols: list):
    """The model and how it maps to the benchmark's names.

    dnn:    WDL with an empty wide part (the library has no plain DNN class) = embeddings + numerics -> MLP.
    deepfm: DeepFM (linear + FM + MLP).
    dcnv2:  DCN with cross_parameterization='matrix' (DCN-V2's full-rank cross), parallel with the MLP,
            no wide part: the same structure as ctrpipe's and FuxiCTR's DCNv2.
    dcnmix: DCNMix (low-rank mixture of experts cross, rank 32, 4 experts), no wide part.
    autoint: AutoInt+ (3 interacting layers of 2 heads, each embedding_dim / 2 wide, residual; the MLP in
            parallel), no wide part. The library attends over the categorical fields only and feeds the
            numerics to the MLP alone.
    """
    from deepctr_torch.models import DCN, WDL, AutoInt, DCNMix, DeepFM

    cols = sparse_cols + dense_cols
    hidden = tuple(args.hidden)
    common = dict(dnn_hidden_units=hidden, l2_reg_linear=0.0, l2_reg_embedding=0.0, l2_reg_dnn=0.0,
                  dnn_dropout=0.0, dnn_use_bn=False, seed=args.seed, task="binary", device="cpu")
    if name == "dnn":
        return WDL([], cols, **common)
    if name == "deepfm":
        return DeepFM(cols, cols, **common)
    if name == "dcnv2":
        return DCN([], cols, cross_num=args.cross_layers, cross_parameterization="matrix", l2_reg_cross=0.0,
                   **common)
    if name == "autoint":
        # the one model without l2_reg_linear (it has no wide part of its own to regularise here anyway)
        kwargs = {k: v for k, v in common.items() if k != "l2_reg_linear"}
        return AutoInt([], cols, att_layer_num=3, att_head_num=2, att_res=True, **kwargs)
    if name == "dcnmix":
        return DCNMix([], cols, cross_num=args.cross_layers, low_rank=32, num_experts=4, l2_reg_cross=0.0,
                      **common)
    raise ValueError(name)


def main() -> None:
    args = parse_args(MODELS)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import deepctr_torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat

    data = load_export(args.data)
    sparse_cols = [SparseFeat(f, vocabulary_size=b, embedding_dim=args.embedding_dim)
                   for f, b in zip(data.cat_fields, data.bins, strict=True)]
    dense_cols = [DenseFeat(f, 1) for f in data.num_fields]

    def inputs(split) -> dict[str, np.ndarray]:
        x = {f: split.cat[:, j] for j, f in enumerate(data.cat_fields)}
        x.update({f: split.num[:, j] for j, f in enumerate(data.num_fields)})
        return x

    x_train, x_test = inputs(data.train), inputs(data.test)
    model = build(args.model, args, sparse_cols, dense_cols)
    model.compile(torch.optim.Adam(model.parameters(), lr=args.lr), "binary_crossentropy", metrics=[])
    n_params = sum(p.numel() for p in model.parameters())
    # fit() includes the library's own input packing (one concatenate of the columns); verbose=2 keeps
    # tqdm off and, with no metrics, nothing extra runs per batch
    with Timer() as t:
        model.fit(x_train, data.train.y, batch_size=args.batch_size, epochs=args.epochs, verbose=2,
                  shuffle=True)
    pred = model.predict(x_test, batch_size=16384)
    report("deepctr-torch", deepctr_torch.__version__, args, len(data.train.y), t.seconds, pred, n_params)


if __name__ == "__main__":
    main()
