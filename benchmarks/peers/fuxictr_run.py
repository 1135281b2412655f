"""Peer runner: FuxiCTR trains one model on the exported features; prints `RESULT {json}`.

Run by benchmarks/bench_quality.py inside .bench/peers-venv. The fuxictr 2.3 wheel ships the layers and
`BaseModel` but not the model zoo, so DNN, DeepFM and DCNv2 are composed here from
`fuxictr.pytorch.layers` on `BaseModel` the way the zoo composes them (embedding of every field, numeric
fields included, then MLP / FM / CrossNetV2 heads). Data goes through the library's own path: a
`feature_map.json` loaded by `FeatureMap`, data files read by `RankDataLoader`, and `BaseModel.fit`
(which also clips gradients at norm 10, its default) and `predict`.
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import Split, Timer, load_export, parse_args, report, set_threads  # noqa: E402
from torch import nn  # noqa: E402

MODELS = ("dnn", "deepfm", "dcnv2")
LABEL = "label"


def model_classes():
    """Model classes are defined after the import so that the module loads without fuxictr."""
    from fuxictr.pytorch.layers import CrossNetV2, FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    def mlp(input_dim: int, hidden: list[int], output_dim: int | None) -> MLP_Block:
        """The zoo's MLP: ReLU, no dropout, no batch norm (one output logit, or the last hidden layer)."""
        return MLP_Block(input_dim=input_dim, output_dim=output_dim, hidden_units=hidden,
                         hidden_activations="ReLU", output_activation=None, dropout_rates=0.0, batch_norm=False)

    class _Ranker(BaseModel):
        def finish(self, lr: float) -> None:
            self.compile("adam", "binary_crossentropy", lr)
            self.reset_parameters()
            self.model_to_device()

    class DNN(_Ranker):
        def __init__(self, feature_map, embedding_dim: int, hidden: list[int], lr: float, **kw):
            super().__init__(feature_map, model_id="DNN", **kw)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.mlp = mlp(feature_map.sum_emb_out_dim(), hidden, 1)
            self.finish(lr)

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X, flatten_emb=True)            # (B, F*D)
            return {"y_pred": self.output_activation(self.mlp(emb))}

    class DeepFM(_Ranker):
        def __init__(self, feature_map, embedding_dim: int, hidden: list[int], lr: float, **kw):
            super().__init__(feature_map, model_id="DeepFM", **kw)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.fm = FactorizationMachine(feature_map)               # LR term + pairwise term
            self.mlp = mlp(feature_map.sum_emb_out_dim(), hidden, 1)
            self.finish(lr)

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X)                              # (B, F, D)
            logit = self.fm(X, emb) + self.mlp(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(logit)}

    class DCNv2(_Ranker):
        """The zoo's default structure: CrossNetV2 (full rank) in parallel with the MLP, then one linear."""

        def __init__(self, feature_map, embedding_dim: int, hidden: list[int], lr: float, cross_layers: int,
                     **kw):
            super().__init__(feature_map, model_id="DCNv2", **kw)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            dim = feature_map.sum_emb_out_dim()
            self.crossnet = CrossNetV2(dim, cross_layers)
            self.parallel_dnn = mlp(dim, hidden, None)
            self.fc = nn.Linear(dim + hidden[-1], 1)
            self.finish(lr)

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X, flatten_emb=True)
            out = torch.cat([self.crossnet(emb), self.parallel_dnn(emb)], dim=-1)
            return {"y_pred": self.output_activation(self.fc(out))}

    return {"dnn": DNN, "deepfm": DeepFM, "dcnv2": DCNv2}


def write_feature_map(data, folder: str) -> str:
    """The feature_map.json FuxiCTR's preprocessing would write for these columns."""
    features = [{f: {"source": "", "type": "numeric"}} for f in data.num_fields]
    features += [{f: {"source": "", "type": "categorical", "vocab_size": b, "padding_idx": None}}
                 for f, b in zip(data.cat_fields, data.bins, strict=True)]
    fmap = {"dataset_id": "synth", "num_fields": len(features), "total_features": sum(data.bins),
            "input_length": len(features), "labels": [LABEL], "features": features}
    path = os.path.join(folder, "feature_map.json")
    with open(path, "w") as f:
        json.dump(fmap, f, indent=1)
    return path


def write_split(data, split, path: str, fmt: str) -> str:
    """One data file in the layout FuxiCTR's loaders read: one named column per feature plus the label."""
    cols = {f: split.num[:, j] for j, f in enumerate(data.num_fields)}
    cols.update({f: split.cat[:, j] for j, f in enumerate(data.cat_fields)})
    cols[LABEL] = split.y
    if fmt == "npz":
        np.savez(path, **cols)
        return path + ".npz"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), path + ".parquet", row_group_size=1 << 20)
    return path + ".parquet"


def main() -> None:
    args = parse_args(MODELS)
    set_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")   # fuxictr logs its progress
    import fuxictr
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything

    seed_everything(seed=args.seed)
    fmt = os.environ.get("FUXICTR_DATA_FORMAT", "npz")   # npz: torch DataLoader; parquet: Ray Data
    data = load_export(args.data)
    work = str(args.work)
    os.makedirs(os.path.join(work, "synth"), exist_ok=True)
    feature_map = FeatureMap("synth", work)
    feature_map.load(write_feature_map(data, work), {"embedding_dim": args.embedding_dim})
    n_val = min(len(data.test.y), 4 * args.batch_size)   # fit() insists on validation data; keep it small
    valid = Split(data.test.cat[:n_val], data.test.num[:n_val], data.test.y[:n_val])
    paths = {name: write_split(data, s, os.path.join(work, name), fmt)
             for name, s in (("train", data.train), ("valid", valid), ("test", data.test))}
    loader_kw = dict(batch_size=args.batch_size, data_format=fmt)
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", train_data=paths["train"],
                                          valid_data=paths["valid"], shuffle=True, **loader_kw)
    test_gen = RankDataLoader(feature_map, stage="test", test_data=paths["test"], shuffle=False, **loader_kw)

    cls = model_classes()[args.model]
    extra = {"cross_layers": args.cross_layers} if args.model == "dcnv2" else {}
    model = cls(feature_map, args.embedding_dim, args.hidden, args.lr, gpu=-1, verbose=0, model_root=work,
                metrics=["AUC", "logloss"], early_stop_patience=2, reduce_lr_on_plateau=True,
                embedding_regularizer=None, net_regularizer=None, **extra)
    n_params = sum(p.numel() for p in model.parameters())
    # fit() = the training epoch + one evaluation on the small validation file + a checkpoint save/load
    with Timer() as t:
        model.fit(train_gen, epochs=args.epochs, validation_data=valid_gen)
    pred = model.predict(test_gen)
    if len(pred) != len(data.test.y):
        raise SystemExit(f"fuxictr predicted {len(pred)} rows for {len(data.test.y)} test rows")
    report("fuxictr", fuxictr.__version__, args, len(data.train.y), t.seconds, pred, n_params,
           notes=f"data_format={fmt}")


if __name__ == "__main__":
    main()
