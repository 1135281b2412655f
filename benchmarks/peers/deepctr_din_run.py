"""Peer runner: DeepCTR-Torch's DIN trains on the exported features of a sequence cache; prints `RESULT {json}`.

Run by benchmarks/bench_sequence.py inside .bench/peers-venv. Uses the library's public API only: feature
columns (SparseFeat, VarLenSparseFeat, DenseFeat), `DIN(..., history_feature_list=[<candidate>])`,
`compile(Adam, "binary_crossentropy")`, `fit`, `predict`.

Inputs are the ids ctrpipe's cache holds (bench_quality.export_features, bags=True):
* every categorical field as a SparseFeat, the candidate (`--query`, e.g. item_id) among them;
* the history (`--history`, e.g. seq; left-aligned, 0 = padding on the right) as `hist_<candidate>`, a
  VarLenSparseFeat looked up in the candidate's own table (`embedding_name=<candidate>`), as ctrpipe's shared
  id space does, with its length column (the count of non-zero ids) for the library's attention mask;
* every other bag (multi-hot tags) as a mean-pooled VarLenSparseFeat (id 0 = padding, masked);
* the numeric columns as DenseFeat.
Every L2 term is 0, dropout and batch norm are off, attention scores are not normalised (as ctrpipe's DIN,
`attention_softmax: false`); the activation unit's activation is `--att-activation` (default prelu, as
ctrpipe's; the library's own default is Dice). Everything else (initialisation, input packing) is the
library's default.
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

MODELS = ("din",)


def options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--history", default="seq", help="exported bag field holding the behaviour history")
    ap.add_argument("--query", default="item_id", help="categorical field the history shares its ids with")
    ap.add_argument("--att-hidden", default="36", help="the activation unit's hidden layers")
    ap.add_argument("--att-activation", default="prelu", help="prelu (ctrpipe's) or dice (the library's default)")


def feature_columns(data: Export, args: argparse.Namespace) -> list:
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    if args.query not in data.cat_fields or args.history not in data.bag_fields:
        raise SystemExit(f"{args.data}: needs categorical {args.query!r} and bag {args.history!r}")
    dim = args.embedding_dim
    bins = dict(zip(data.cat_fields, data.bins, strict=True))
    cols: list = [SparseFeat(f, vocabulary_size=b, embedding_dim=dim) for f, b in bins.items()]
    for f, b in zip(data.bag_fields, data.bag_bins, strict=True):
        width = data.train.bags[f].shape[1]
        if f == args.history:
            if b != bins[args.query]:
                raise SystemExit(f"history {f!r} has {b} ids, candidate {args.query!r} {bins[args.query]}: "
                                 "not one id space")
            # the candidate's table (embedding_name), masked by length: the library's DIN input
            cols.append(VarLenSparseFeat(SparseFeat(f"hist_{args.query}", vocabulary_size=b, embedding_dim=dim,
                                                    embedding_name=args.query),
                                         maxlen=width, length_name=f"{f}_length"))
        else:
            cols.append(VarLenSparseFeat(SparseFeat(f, vocabulary_size=b, embedding_dim=dim), maxlen=width,
                                         combiner="mean"))
    return cols + [DenseFeat(f, 1) for f in data.num_fields]


def inputs(data: Export, split: Split, args: argparse.Namespace) -> dict[str, np.ndarray]:
    x = {f: split.cat[:, j] for j, f in enumerate(data.cat_fields)}
    for f, ids in split.bags.items():
        if f == args.history:
            x[f"hist_{args.query}"] = ids
            x[f"{f}_length"] = (ids > 0).sum(axis=1).astype(np.int64)   # left-aligned: valid = the first n
        else:
            x[f] = ids
    x.update({f: split.num[:, j] for j, f in enumerate(data.num_fields)})
    return x


def main() -> None:
    args = parse_args(MODELS, options)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    import deepctr_torch
    from deepctr_torch.models import DIN

    data = load_export(args.data)
    att_hidden = tuple(int(h) for h in args.att_hidden.split(",") if h)
    model = DIN(feature_columns(data, args), [args.query], dnn_use_bn=False, dnn_hidden_units=tuple(args.hidden),
                att_hidden_size=att_hidden, att_activation=args.att_activation, att_weight_normalization=False,
                l2_reg_dnn=0.0, l2_reg_embedding=0.0, dnn_dropout=0.0, seed=args.seed, task="binary",
                device="cpu")
    model.compile(torch.optim.Adam(model.parameters(), lr=args.lr), "binary_crossentropy", metrics=[])
    n_params = sum(p.numel() for p in model.parameters())
    x_train, x_test = inputs(data, data.train, args), inputs(data, data.test, args)
    # fit() includes the library's own input packing (one concatenate of the columns); verbose=2 keeps tqdm
    # off and, with no metrics, nothing extra runs per batch
    with Timer() as t:
        model.fit(x_train, data.train.y, batch_size=args.batch_size, epochs=args.epochs, verbose=2, shuffle=True)
    pred = model.predict(x_test, batch_size=16384)
    report("deepctr-torch", deepctr_torch.__version__, args, len(data.train.y), t.seconds, pred, n_params,
           notes=f"torch {torch.__version__}, attention {args.att_activation} {list(att_hidden)}")


if __name__ == "__main__":
    main()
