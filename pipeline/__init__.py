"""zsl-pipeline: batch zero-shot labeling and text retrieval of images at scale.

The library is layers; each package imports only packages listed above it (``tests/test_layers.py``):

* :mod:`pipeline.core`      — fs and atomic writes, parquet, config, units, schema, manifests, resume, features, timing
* :mod:`pipeline.inputs`    — input layouts behind one registry; image decoding; corpus and demo data
* :mod:`pipeline.encoders`  — image and text encoders; the ONNX Runtime text path
* :mod:`pipeline.semantics` — class tables, class sets, text / attribute / word-vector semantics
* :mod:`pipeline.zsl`       — ZSL models and bridges, calibration, metrics, transductive scoring, the HTML report
* :mod:`pipeline.index`     — choose, plan, build, store, search, tune FAISS indexes; the searcher
* :mod:`pipeline.cluster`   — all Ray code
* :mod:`pipeline.stages`    — one module per ``zsl`` command, side by side
"""
