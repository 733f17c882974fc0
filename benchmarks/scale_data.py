"""The scale benchmark's data and ground truth: a seeded synthetic "world" (class centres, class text
embeddings, an ESZSL model trained on it), N-row feature directories drawn from it with their projected
vectors, and the exact k-NN ground truth and recall@k every index is measured against.

Exact search and recall are the library's own (:func:`pipeline.index.knn.exact_knn` and
:func:`~pipeline.index.knn.recall_at_k`, the ones the index tuner uses), called from
:func:`ground_truth` and :func:`measure_recall` only.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from benchmarks.bench import FEATURE_MODEL, TEXT_DIM, synthetic_features
from pipeline.core.timing import timed

DIM = 1280
RECALL_KS = (1, 10, 100)


class World:
    """The synthetic world every N draws from: class centres, text embeddings, the model."""

    def __init__(self, work: Path, *, n_classes: int, n_seen: int, latent_rank: int, noise: float,
                 train_per_class: int, shard_rows: int, seed: int) -> None:
        from pipeline.core.vectors import l2n

        with timed() as clock:
            self.seed, self.noise, self.shard_rows = seed, noise, shard_rows
            rng = np.random.default_rng([seed, 0])
            self.names = [f"class_{i:04d}" for i in range(n_classes)]
            Z = rng.standard_normal((n_classes, latent_rank)).astype(np.float32)
            B = rng.standard_normal((latent_rank, DIM)).astype(np.float32) / math.sqrt(latent_rank)
            self.centers = (np.maximum(Z @ B, 0.0) * 0.6).astype(np.float32)
            A = rng.standard_normal((latent_rank, TEXT_DIM)).astype(np.float32)
            text = l2n(Z @ A + 0.3 * rng.standard_normal((n_classes, TEXT_DIM)).astype(np.float32))
            self.classes_dir, self.model_dir = str(work / "classes"), str(work / "model")
            self._write_classes(text)
            self._train(work, rng, n_seen=n_seen, train_per_class=train_per_class)
            self._load_model(work)
        self.prep_seconds = clock.seconds

    def _write_classes(self, text) -> None:
        from pipeline.semantics.classset import write_class_set

        write_class_set(self.classes_dir, self.names, [None] * len(self.names), text, None, {
            "source": "synthetic (benchmarks.bench_scale)", "text_model": "minilm", "text_model_name": "minilm",
            "pretrained": None, "templates": ["a photo of a {name}."], "text_dim": TEXT_DIM, "attribute_names": [],
            "attribute_normalization": "l2", "attribute_stats": None, "missing_attributes": "error",
            "missing_value": -1.0})

    def _train(self, work: Path, rng, *, n_seen: int, train_per_class: int) -> None:
        """ESZSL (text semantics) on ``train_per_class`` rows of each of the first ``n_seen`` classes."""
        from pipeline.core.config import TrainConfig
        from pipeline.stages.train import run_train

        seen = self.names[:n_seen]
        y_train = np.repeat(np.arange(n_seen), train_per_class)
        train_dir = work / "features-train"
        self.write_features(train_dir, y_train, rng, id_prefix="train")
        self.train_manifest = run_train(TrainConfig(features=str(train_dir), classes=self.classes_dir,
                                                    seen=tuple(seen), method="eszsl", semantics="text",
                                                    output=self.model_dir))
        shutil.rmtree(train_dir, ignore_errors=True)

    def _load_model(self, work: Path) -> None:
        """The trained model, and its ``V`` and class semantics ``S`` saved for the bare labeling script."""
        from pipeline.semantics.classset import load_class_set
        from pipeline.zsl.models import load_model
        from pipeline.zsl.models.scoring import class_semantics

        self.model, self.mman = load_model(self.model_dir, feature_dim=DIM, feature_model=FEATURE_MODEL)
        if self.mman.semantics != "text":
            raise RuntimeError(f"the model has semantics {self.mman.semantics!r}; text search needs 'text'")
        self.S = np.ascontiguousarray(class_semantics(self.mman, load_class_set(self.classes_dir)), np.float32)
        self.V = np.ascontiguousarray(self.model.V, np.float32)
        self.v_path, self.s_path = str(work / "bare_V.npy"), str(work / "bare_S.npy")
        np.save(self.v_path, self.V)
        np.save(self.s_path, self.S)

    def rows(self, rng, n: int):
        """``n`` fresh feature rows of the world's distribution and their class indices."""
        y = rng.integers(0, len(self.names), n)
        return synthetic_features(rng, self.centers, y, noise=self.noise), y

    def write_features(self, out: Path, y, rng, *, id_prefix: str, on_shard=None, uri_of=None,
                       config: dict | None = None) -> int:
        """A feature directory of ``len(y)`` rows of classes ``y`` (drawn from ``rng`` shard by shard);
        ``uri_of(row)`` the uri of a row (default ``synthetic://<image id>``), ``config`` the manifest's
        extraction config (e.g. the ``encoder`` the features pose as, for image queries)."""
        import pyarrow as pa

        from pipeline.core import fs as zio
        from pipeline.core import parquet as zpq
        from pipeline.core.features import shard_name
        from pipeline.core.schema import features_schema
        from pipeline.core.manifests import FeaturesManifest, write_manifest

        n = len(y)
        names = np.asarray(self.names, dtype=object)
        n_shards = max(1, -(-n // self.shard_rows))
        for sid in range(n_shards):
            s, e = sid * self.shard_rows, min(n, (sid + 1) * self.shard_rows)
            X = synthetic_features(rng, self.centers, y[s:e], noise=self.noise)
            ids = [f"{id_prefix}/{i:09d}.png" for i in range(s, e)]
            uris = [f"synthetic://{i}" for i in ids] if uri_of is None else [uri_of(i) for i in range(s, e)]
            table = pa.table({
                "image_id": ids, "uri": uris, "label": names[y[s:e]].tolist(),
                "caption": pa.nulls(e - s, pa.string()), "width": pa.nulls(e - s, pa.int32()),
                "height": pa.nulls(e - s, pa.int32()), "url": pa.nulls(e - s, pa.string()),
                "key": pa.nulls(e - s, pa.string()), "meta": pa.nulls(e - s, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), DIM),
            }, schema=features_schema(DIM))
            zpq.write_parquet_atomic(zio.join(str(out), "features", shard_name(sid)), table)
            del table, ids, uris
            if on_shard is not None:
                on_shard(sid, X)
            del X
        write_manifest(str(out), FeaturesManifest(
            model_id=FEATURE_MODEL, dim=DIM, n_images=int(n), n_errors=0, n_shards=n_shards,
            config=dict(config or {}),
            notes={"source": "synthetic (benchmarks.bench_scale)", "input": f"synthetic:{id_prefix}",
                   "seed": self.seed}))
        return n_shards

    def project(self, X):
        return np.ascontiguousarray(self.model.search_images(X), dtype=np.float32)


def make_scale_data(world: World, work: Path, n_rows: int, **features) -> dict:
    """Feature shards of ``n_rows`` rows + their projected vectors as ``emb/part-NNN.npy``; ``features``
    are :meth:`World.write_features`' ``uri_of`` and ``config``."""
    from pipeline.core.features import check_feature_shards, feature_shards, open_features

    feats, emb = work / "features", work / "emb"
    emb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([world.seed, 1, n_rows])
    y = rng.integers(0, len(world.names), n_rows)
    proj_s = [0.0]

    def on_shard(sid: int, X) -> None:  # the values just written, exactly as read back (float32)
        with timed() as t:
            np.save(emb / f"part-{sid:06d}.npy", world.project(X))
        proj_s[0] += t.seconds

    with timed() as total:
        n_shards = world.write_features(feats, y, rng, id_prefix=f"n{n_rows}", on_shard=on_shard,
                                         **features)
    man = open_features(str(feats))
    files = feature_shards(str(feats))
    check_feature_shards(files, man.dim)
    if man.n_images != n_rows or len(files) != n_shards:
        raise RuntimeError(f"{feats}: manifest says {man.n_images} rows / {len(files)} shards, expected "
                           f"{n_rows} / {n_shards}")
    return {"features_dir": str(feats), "emb_dir": str(emb), "n_shards": n_shards, "shard_files": files,
            "emb_files": sorted(str(p) for p in emb.glob("part-*.npy")),
            "write_seconds": round(total.seconds - proj_s[0], 2), "project_seconds": round(proj_s[0], 2),
            "feature_bytes_on_disk": _dir_bytes(feats), "emb_bytes_on_disk": _dir_bytes(emb)}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ground_truth(Q, data: dict) -> tuple[np.ndarray, float]:
    """Exact top-``max(RECALL_KS)`` ids of the queries ``Q`` over ``data``'s projected vectors, and the seconds
    the exact search took."""
    from pipeline.index.knn import exact_knn

    n_db = 0

    def batches():
        nonlocal n_db
        for f in data["emb_files"]:
            Z = np.load(f)
            n_db += len(Z)
            yield Z

    with timed() as t:
        _, gt_ids = exact_knn(batches(), np.asarray(Q, np.float32), max(RECALL_KS), block=50_000)
    if n_db != data["n_rows"]:
        raise RuntimeError(f"{n_db} projected vectors for {data['n_rows']} rows")
    return gt_ids, t.seconds


def measure_recall(index, Q, gt_ids) -> dict:
    """Recall@1/10/100 of one batched search of all queries against the exact ids ``gt_ids``."""
    from pipeline.index.knn import recall_at_k

    k = min(max(RECALL_KS), int(index.ntotal))
    _, ids = index.search(Q, k)
    return {f"recall_at_{r}": float(recall_at_k(ids[:, :r], gt_ids[:, :r])) for r in RECALL_KS if r <= k}
