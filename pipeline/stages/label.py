"""Label stage: feature shards -> top-k classes per image, shard by shard, resumably; and add-classes.

Each feature shard ``features/shard-N.parquet`` gives ``OUT/labels/shard-N.parquet`` (atomic), read
and written row group by row group, so memory does not grow with the shard or the dataset. With
``address`` (a Ray cluster) the shards are labelled by a Ray Data actor pool whose workers read
the feature shards and write the labels shards themselves, under the same names and guarantees.
Runs under the resume protocol: the identity is the model (manifest and weights), the class set,
the features and the settings; a rerun with the same ones labels only the missing shards
(including shards the feature directory gained since), one with others is refused unless
``overwrite``. Everything that could stop the job (feature dimension, model/class-set mismatch)
is checked before anything is written.

``run_add_classes`` extends a class set in place (embedded as the original classes were), after
checking that the model can score the enlarged set, and optionally relabels one labels directory.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import pyarrow as pa

from pipeline.cluster.shard_jobs import map_shards
from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.semantics.classset import ClassSet, add_classes, load_class_set
from pipeline.core.config import AddClassesConfig, LabelConfig
from pipeline.core.features import feature_shards, features_identity, iter_shard_batches, open_features, \
    split_feature_shards
from pipeline.zsl.models import load_model
from pipeline.zsl.models.scoring import check_model_classes, class_scores, model_fingerprint, seen_mask
from pipeline.core.vectors import topk
from pipeline.core.resume import OutputDir
from pipeline.core.schema import LABELS_SCHEMA
from pipeline.core.manifests import ClassesManifest, LabelsManifest, read_manifest
from pipeline.core.timing import timed

LOG = logging.getLogger(__name__)

__all__ = ["run_label", "run_add_classes", "label_table"]


def _lists(flat: pa.Array, shape: tuple[int, int]) -> pa.ListArray:
    """(n*k,) values -> n lists of k, built in one go (no per-row Python objects)."""
    n, k = shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat)


def label_table(meta: pa.Table, idx: np.ndarray, vals: np.ndarray, names: np.ndarray | pa.Array,
                unseen: np.ndarray) -> pa.Table:
    """The labels table of one shard: ``meta`` (image_id, uri, label) + top-k class indices and scores.

    Class names are taken from ``names`` by index in Arrow (no Python string per row).
    """
    import pyarrow.compute as pc

    names = names if isinstance(names, pa.Array) else pa.array(list(names), pa.string())
    k = idx.shape[1] if idx.ndim == 2 else 0
    flat = pa.array(idx.reshape(-1), pa.int32())
    has = len(idx) > 0 and k > 0
    return pa.table({
        "image_id": meta.column("image_id"),
        "uri": meta.column("uri"),
        "label": meta.column("label"),
        "top1": pc.take(names, pa.array(idx[:, 0], pa.int32())) if has else pa.array([], pa.string()),
        "top1_score": pa.array(vals[:, 0] if has else [], pa.float32()),
        "top1_is_unseen": pa.array(unseen[idx[:, 0]] if has else [], pa.bool_()),
        "topk": _lists(pc.take(names, flat), idx.shape),
        "topk_scores": _lists(pa.array(vals.reshape(-1).astype(np.float32), pa.float32()), idx.shape),
    }, schema=LABELS_SCHEMA)


def run_label(cfg: LabelConfig, *, progress: bool = True) -> LabelsManifest:
    """Label every feature shard of ``cfg.features`` that ``cfg.output`` lacks; return the manifest.

    With ``overwrite``, a finished output made with another model or class set is relabelled in place from
    the stored features, shard by shard, and a **label diff** is written first for each shard
    (``diffs/NNNN/shard-N.parquet``: image_id, uri, old_label, new_label, old_score, new_score of the rows
    whose top-1 moved; ``summary.json``: the moves per (old, new) pair): a kill part-way and a rerun give
    the same labels and the same diff. A feature shard that cannot be read fails alone: the others are
    labelled, the manifest lists it (``failed_shards``), and the next run retries it. A run with nothing to
    do changes no file."""
    with timed() as took:
        fman = open_features(cfg.features)
        model, mman = load_model(cfg.model, feature_dim=fman.dim, feature_model=fman.model_id)
        classes = load_class_set(cfg.classes)
        check_model_classes(model, mman, classes, f"{cfg.model} with {cfg.classes}")
        all_shards = feature_shards(cfg.features)
        shards, bad = split_feature_shards(all_shards, fman.dim)
        if all_shards and not shards:
            first = next(iter(bad.items()))
            raise ValueError(f"{first[0]}: {first[1]} (and every other feature shard is unusable too)")
        identity = {"model": model_fingerprint(cfg.model, mman), "classes": classes.manifest.fingerprint,
                    "features": features_identity(cfg.features, fman), "top_k": cfg.top_k,
                    "calibrated": cfg.calibrated}
        with OutputDir(cfg.output, job="label", identity=identity, overwrite=cfg.overwrite, owned=("labels", "diffs"),
                       replace_in_place=True) as out:
            labels_dir = out.join("labels")
            replacing, diff_dir, todo = _todo(out, shards)
            finished = out.finished(LabelsManifest)
            if not todo and not bad and finished is not None and finished.n_shards == len(all_shards) \
                    and not finished.failed_shards:
                LOG.info("%s: every feature shard is labelled; nothing to do", cfg.output)
                return finished.model_copy(update={"n_labeled_this_run": 0})  # no file is rewritten
            LOG.info("%s %d feature shards (%d already done) against %d classes", "relabelling" if diff_dir else
                     "labeling", len(todo), len(shards) - len(todo), len(classes.names))
            for f, why in bad.items():
                LOG.error("%s: skipped: %s (the next run retries it)", f, why)
            if todo or bad:
                out.begin()
            results = _label_shards(cfg, model, mman, classes, todo, fman.dim, labels_dir, progress,
                                    diff_dir=diff_dir, on_done=_progress_saver(out) if diff_dir else None)
            failed = {**{f.rsplit("/", 1)[-1]: why for f, why in bad.items()},
                      **{r["shard"].rsplit("/", 1)[-1]: r["error"] for r in results if r.get("error")}}
            last_diff = finished.last_diff if finished is not None and replacing is None else None
            if diff_dir is not None:
                last_diff = replacing["diff"]
                _write_diff_summary(diff_dir, replacing["identity"], identity)
                out.set_state({})  # the replacement is complete
            manifest = LabelsManifest(
                identity=identity, model_dir=cfg.model, features_dir=cfg.features, classes_dir=cfg.classes,
                classes=list(classes.names), gamma=mman.gamma if cfg.calibrated else 0.0, n_shards=len(all_shards),
                n_images=zpq.dir_num_rows(labels_dir) if shards else 0,
                n_labeled_this_run=sum(r["rows"] for r in results), config=cfg.model_dump(mode="json"),
                seconds_last_run=round(took.elapsed(), 2), failed_shards=failed, last_diff=last_diff)
            out.finish(manifest)
            return manifest


def _todo(out: OutputDir, shards: list[str]) -> tuple[dict | None, str | None, list[str]]:
    """``(replacing, diff dir, shards to label)``: a relabel in place (``replacing``: what run.json says is
    being replaced) diffs every shard not relabelled yet; otherwise the shards without labels are to do."""
    replacing = out.previous_state.get("replacing")
    if replacing is None:
        done = zpq.parquet_names(out.join("labels"))
        return None, None, [s for s in shards if s.rsplit("/", 1)[-1] not in done]
    diff_dir = out.join(replacing.setdefault("diff", _next_diff(out.uri)))
    out.set_state({"replacing": replacing})
    done_now = set(replacing.get("done", []))
    return replacing, diff_dir, [s for s in shards if s.rsplit("/", 1)[-1] not in done_now]


#: columns of a label diff shard
DIFF_COLUMNS = ("image_id", "uri", "old_label", "new_label", "old_score", "new_score")


def _next_diff(uri: str) -> str:
    """``diffs/NNNN``: the next free diff folder of a labels output."""
    root = zio.join(uri, "diffs")
    fs, path = zio.filesystem(root)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] if fs.exists(path) else []
    taken = [int(n) for n in names if n.isdigit()]
    return f"diffs/{max(taken, default=0) + 1:04d}"


def _progress_saver(out: OutputDir):
    """Records each relabelled shard in run.json (so a rerun after a kill goes on from there)."""
    def saved(shard_name: str) -> None:
        state = dict(out.previous_state)
        rep = dict(state["replacing"])
        rep["done"] = sorted(set(rep.get("done", [])) | {shard_name})
        out.set_state({**state, "replacing": rep})
    return saved


def label_diff(old: pa.Table, new: pa.Table) -> pa.Table:
    """The rows of ``new`` (a label shard) whose top-1 differs from ``old`` (the same shard's earlier labels,
    matched by image id): :data:`DIFF_COLUMNS`. Rows only in ``new`` are not listed (they had no label)."""
    import pyarrow.compute as pc

    old = old.select(["image_id", "top1", "top1_score"]).rename_columns(["image_id", "old_label", "old_score"])
    joined = new.select(["image_id", "uri", "top1", "top1_score"]).join(old, "image_id", join_type="inner")
    moved = joined.filter(pc.fill_null(pc.not_equal(joined.column("top1"), joined.column("old_label")), True))
    out = pa.table({"image_id": moved.column("image_id"), "uri": moved.column("uri"),
                    "old_label": moved.column("old_label"), "new_label": moved.column("top1"),
                    "old_score": moved.column("old_score"), "new_score": moved.column("top1_score")})
    return out.sort_by("image_id")


def _write_diff_summary(diff_dir: str, old_identity: dict, new_identity: dict) -> dict:
    """``summary.json`` of a finished diff: rows compared and moved, moves per (old, new) pair, what changed."""
    from collections import Counter

    from pipeline.core.resume import describe_diff

    pairs: Counter = Counter()
    moved = 0
    for f in sorted(zpq.iter_parquet_files(diff_dir)):
        t = zpq.read_parquet(f, columns=["old_label", "new_label"])
        moved += t.num_rows
        pairs.update(zip(t.column("old_label").to_pylist(), t.column("new_label").to_pylist()))
    compared = sum(n for f in zio.list_files(diff_dir, suffixes=(".json",), recursive=False)
                   if f.rsplit("/", 1)[-1].startswith("compared-") for n in zio.read_json(f).values())
    summary = {"moved": moved, "compared": compared,
               "changed": describe_diff(old_identity, new_identity),
               "pairs": [{"old": a, "new": b, "n": n} for (a, b), n in pairs.most_common()]}
    zio.write_json_atomic(zio.join(diff_dir, "summary.json"), summary)
    return summary


class _ShardLabeler:
    """Labels one feature shard into ``labels_dir`` (same name), streaming row group by row group; with
    ``diff_dir``, first writes the shard's label diff against the label shard it replaces. A shard that
    fails is reported (``error``), never raised: it alone is left out."""

    def __init__(self, cfg: LabelConfig, dim: int, labels_dir: str, loaded=None, diff_dir: str | None = None) -> None:
        if loaded is None:
            model, mman = load_model(cfg.model, feature_dim=dim)
            loaded = (model, mman, load_class_set(cfg.classes))
        self.model, self.mman, self.classes = loaded
        self.cfg, self.dim, self.labels_dir, self.diff_dir = cfg, dim, labels_dir, diff_dir
        self.names = pa.array(list(self.classes.names), pa.string())
        self.unseen = ~seen_mask(self.mman, self.classes.names)

    def __call__(self, uri: str) -> dict:
        name = uri.rsplit("/", 1)[-1]
        try:
            if self.diff_dir is None:
                return {"shard": uri, "rows": self._write(uri, name)}
            return {"shard": uri, "rows": self._relabel(uri, name)}
        except (OSError, ValueError, pa.lib.ArrowException) as exc:  # an unreadable shard fails alone (retried next run)
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            LOG.error("%s: not labelled: %s", uri, why)
            return {"shard": uri, "rows": 0, "error": why}

    def _tables(self, uri: str):
        for meta, X in iter_shard_batches(uri, self.dim, ("image_id", "uri", "label"), self.cfg.batch_size):
            s = class_scores(self.model, self.mman, X, self.classes, calibrated=self.cfg.calibrated)
            idx, vals = topk(s, self.cfg.top_k)
            yield label_table(meta, idx, vals, self.names, self.unseen)

    def _write(self, uri: str, name: str) -> int:
        n = 0
        with zpq.atomic_parquet_writer(zio.join(self.labels_dir, name), LABELS_SCHEMA) as w:
            for t in self._tables(uri):
                w.write_table(t)
                n += t.num_rows
        return n

    def _relabel(self, uri: str, name: str) -> int:
        """Diff first (unless a killed run wrote it already: then the old labels may be gone), then labels."""
        diff_file, label_file = zio.join(self.diff_dir, name), zio.join(self.labels_dir, name)
        if zio.exists(diff_file):
            return self._write(uri, name)
        new = pa.concat_tables(list(self._tables(uri)) or [LABELS_SCHEMA.empty_table()])
        old = zpq.read_parquet(label_file, columns=["image_id", "top1", "top1_score"]) if zio.exists(label_file) \
            else None
        diff = label_diff(old, new) if old is not None else pa.table(
            {c: pa.array([], t) for c, t in zip(DIFF_COLUMNS, (pa.string(),) * 4 + (pa.float32(),) * 2)})
        _count_compared(self.diff_dir, name, min(old.num_rows, new.num_rows) if old is not None else 0)
        zpq.write_parquet_atomic(diff_file, diff)  # the diff is the mark: from here on the old labels may go
        zpq.write_parquet_atomic(label_file, new)
        return new.num_rows


def _count_compared(diff_dir: str, name: str, n: int) -> None:
    path = zio.join(diff_dir, f"compared-{name}.json")
    zio.write_json_atomic(path, {name: n})


def _labeler(cfg_json: dict, dim: int, labels_dir: str, diff_dir: str | None = None) -> _ShardLabeler:
    """Picklable factory of a labeler (a Ray worker loads model and classes itself)."""
    return _ShardLabeler(LabelConfig(**cfg_json), dim, labels_dir, diff_dir=diff_dir)


def _label_shards(cfg: LabelConfig, model, mman, classes: ClassSet, todo: list[str], dim: int, labels_dir: str,
                  progress: bool, *, diff_dir: str | None = None, on_done=None) -> list[dict]:
    """Label the ``todo`` shards (here with the model already loaded, or on the Ray cluster at
    ``cfg.address``); each shard's result (``rows``, and ``error`` for a shard that failed).
    ``on_done(name)``: called for each shard labelled, as it is done here (after the job on a cluster)."""
    def done(r: dict) -> None:
        if on_done is not None and not r.get("error"):
            on_done(r["shard"].rsplit("/", 1)[-1])

    return map_shards(todo, partial(_labeler, cfg.model_dump(mode="json"), dim, labels_dir, diff_dir),
                      address=cfg.address, what="label shards", num_workers=cfg.num_workers, progress=progress,
                      local=partial(_ShardLabeler, cfg, dim, labels_dir, loaded=(model, mman, classes),
                                    diff_dir=diff_dir), on_result=done)


def run_add_classes(cfg: AddClassesConfig, *, text_encoder=None,
                    progress: bool = True) -> tuple[ClassesManifest, list[str], LabelsManifest | None]:
    """Add the classes of ``cfg.input`` to the class set ``cfg.classes`` (in place) and, with
    ``cfg.relabel``, relabel that labels directory (and nothing else) against the enlarged set.

    The model must be able to score the enlarged set; that is checked before anything is written.
    Returns the class set's manifest, the added names and the relabelled directory's manifest.
    """
    model, mman = load_model(cfg.model)
    relabel_cfg = None
    if cfg.relabel:
        prev = read_manifest(cfg.relabel, LabelsManifest)
        settings = {k: v for k, v in prev.config.items() if k in LabelConfig.model_fields}
        # the labels are rewritten where the user says, from the features they were made from
        relabel_cfg = LabelConfig(**{**settings, "features": prev.features_dir, "model": cfg.model,
                                     "classes": cfg.classes, "output": cfg.relabel, "overwrite": True})
    def model_can_score(enlarged: ClassSet) -> None:  # before anything is written
        check_model_classes(model, mman, enlarged, f"{cfg.model} cannot score the enlarged class set")

    classes, added = add_classes(cfg.classes, cfg.input, text_encoder=text_encoder, check=model_can_score)
    labels = run_label(relabel_cfg, progress=progress) if relabel_cfg is not None else None
    return classes.manifest, added, labels
