"""Stage 4: the model zoo. Models take a `FeatureSpec` and their config, map a `Batch` to logits (B, T).

Conventions every model follows (the trainer and inference rely on them):
- built as `Model(spec, cfg, sparse=False)` through `registry.build_model`; `forward(batch)` returns float32
  logits (B, spec.n_tasks), no sigmoid, no loss;
- `model.head` is a `layers.output.OutputHead` whose bias starts at logit(label rate);
- embedding tables are exactly the `nn.Embedding` / `nn.EmbeddingBag` submodules (sparse grads when
  `sparse=True`): `layers.embedding.split_parameters(model)` splits them from the dense parameters.
"""
