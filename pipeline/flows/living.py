"""``zsl run PIPELINE.yaml``: one scheduled command keeps features, classes, model, labels and index current.

Each run walks the stages in order and does only what is new, each stage through the one resume
protocol of its own output directory under ``root``:

1. **extract** new input (files, tars, row groups not in the recorded shard plan) into ``features/``;
2. **classes**: the class table embedded again into ``classes/`` only when it changed;
3. **captions** of new feature shards embedded (when the spec has ``captions``);
4. **train** again into ``model/`` only when the train settings or the *seen-class data* changed: a
   fingerprint of the seen classes' semantics and of the seen-class rows (image id and label, in image
   id order, so the shard order does not matter) is kept in ``state.json``; a new unseen class or new
   images of unseen classes keep the model;
5. **label** the new feature shards into ``labels/``; when the model or the classes changed, every shard
   is relabelled from the stored features (no image is read) and the label diff says which images moved;
6. **index** the new shards into ``index/`` (rebuilt only when it must: the stage says why).

Two runs of one pipeline never interleave: an ``flock`` on ``root/.zsl-run.lock`` (a second run waits up to
``wait_s``, then exits with :data:`EXIT_LOCKED`). Every run writes ``runs/<run id>/record.json`` (rewritten
after each stage, so a killed run leaves what it did) and ``report.html`` (:mod:`pipeline.flows.record`).

Exit codes a scheduler can act on: :data:`EXIT_OK` (0, done), :data:`EXIT_BAD_INPUT` (2, bad spec or input,
nothing changed), :data:`EXIT_PARTIAL` (3, done, with failed items listed in the record: they are retried
by the next run), :data:`EXIT_FAILED` (1, a stage failed part-way; rerun to resume),
:data:`EXIT_LOCKED` (75, another run of this pipeline holds the lock; try later).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.core.config import ConfigError, RunConfig
from pipeline.core.manifests import ClassesManifest, IndexManifest, LabelsManifest
from pipeline.core.timing import peak_rss_bytes, reset_peak_rss, timed
from pipeline.flows.record import RunRecord, StageRecord, run_ids, write_run

LOG = logging.getLogger(__name__)

__all__ = ["run_pipeline", "Paths", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_PARTIAL", "EXIT_LOCKED",
           "train_key"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_LOCKED = 0, 1, 2, 3, 75
STATE_FILE = "state.json"
#: what a stage may raise for bad input or settings, before it changes anything
BAD_INPUT = (ConfigError, ValueError, FileNotFoundError, PermissionError)


@dataclass(frozen=True)
class Paths:
    """Where a pipeline keeps each output under its ``root``."""

    root: str

    def __getattr__(self, name: str) -> str:
        if name in ("features", "classes", "model", "labels", "index", "runs"):
            return zio.join(self.root, name)
        raise AttributeError(name)


def _exists(uri: str) -> bool:
    return zio.exists(zio.join(uri, "manifest.json"))


def _manifest(uri: str, cls):
    from pipeline.core.manifests import read_manifest

    try:
        return read_manifest(uri, cls) if _exists(uri) else None
    except Exception:  # noqa: BLE001 - an unreadable manifest is an unfinished output: the stage redoes it
        return None


def _seen_names(seen: Any) -> list[str]:
    """The train section's ``seen``: a list, or a file (lines, or JSON: a list or a dict with 'seen')."""
    if not isinstance(seen, str):
        return list(seen)
    if not zio.exists(seen):
        raise FileNotFoundError(f"train.seen: {seen} not found (give a list of class names or a file of them)")
    try:
        return zio.read_names(seen, "seen")
    except ValueError as exc:
        raise ValueError(f"train.seen: {exc}") from None


def train_key(settings: dict, features: str, classes: str) -> dict:
    """What a trained model depends on, as fingerprints: the train settings, the seen classes' semantics and
    the seen-class rows (image id, label) in image-id order (the shard order does not matter)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.semantics.classset import load_class_set

    seen = list(settings["seen"])
    cs = load_class_set(classes)
    sem = cs.semantics(settings.get("semantics", "text"), settings.get("semantic_weights") or {})
    ids = cs.index_of(seen, "seen class")
    table = zpq.read_parquet_dir(zio.join(features, "features"), columns=["image_id", "label"])
    mask = pc.is_in(table.column("label"), value_set=pa.array(seen, pa.string()))
    rows = table.filter(pc.fill_null(mask, False))
    order = np.argsort(np.asarray(rows.column("image_id").to_pylist(), dtype=object), kind="stable")
    rows = rows.take(order)
    return {"settings": zio.fingerprint(settings),
            # rounded: a text encoder's batch (the table grew) moves the last float bits of an embedding
            "seen_semantics": zio.fingerprint(np.round(np.asarray(sem[ids], np.float64), 4).tobytes().hex()),
            "seen_rows": zio.fingerprint([rows.column("image_id").to_pylist(), rows.column("label").to_pylist()]),
            "n_seen_rows": rows.num_rows}


class _Runner:
    """One run: the stages in order, each recorded (see the module docstring)."""

    def __init__(self, cfg: RunConfig, *, spec: str | None, progress: bool) -> None:
        self.cfg, self.paths, self.progress = cfg, Paths(cfg.root), progress
        self.record = RunRecord.start(cfg, spec=spec)
        self.changed = False  # did any stage change an output yet (for the exit code of a later bad input)

    # -- bookkeeping ----------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[StageRecord], None]) -> None:
        rec = StageRecord(name=name)
        self.record.stages.append(rec)
        LOG.info("== %s", name)
        reset_peak_rss()
        with timed() as took:
            try:
                fn(rec)
            except BaseException as exc:
                rec.status = "failed"
                rec.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
                rec.seconds, rec.peak_rss_mb = round(took.elapsed(), 2), round(peak_rss_bytes() / 2**20, 1)
                raise
        rec.seconds, rec.peak_rss_mb = round(took.seconds, 2), round(peak_rss_bytes() / 2**20, 1)
        if rec.status == "done":
            self.changed = True
        LOG.info("%s: %s (%.1f s)", name, rec.did or rec.status, rec.seconds)
        write_run(self.paths.runs, self.record, final=False)

    def state(self) -> dict:
        uri = zio.join(self.cfg.root, STATE_FILE)
        return zio.read_json(uri) if zio.exists(uri) else {}

    def save_state(self, state: dict) -> None:
        zio.write_json_atomic(zio.join(self.cfg.root, STATE_FILE), state)

    # -- stages -----------------------------------------------------------------------------------
    def extract(self, rec: StageRecord) -> None:
        from pipeline.stages.extract import run_extract

        p, cfg = self.paths, self.cfg
        before = set(zpq.parquet_names(zio.join(p.features, "features")))
        errs_before = set(zpq.parquet_names(zio.join(p.features, "errors")))
        inputs = list(cfg.inputs)
        ecfg = cfg.stage_config("extract", input=inputs[0] if len(inputs) == 1 else tuple(inputs), output=p.features,
                                overwrite=False, address=cfg.address)
        man = run_extract(ecfg, progress=self.progress)
        new = sorted(set(zpq.parquet_names(zio.join(p.features, "features"))) - before)
        new_errs = sorted(set(zpq.parquet_names(zio.join(p.features, "errors"))) - errs_before)
        rec.counts = {"shards": man.n_shards, "images": man.n_images, "errors": man.n_errors, "new_shards": len(new)}
        rec.counts.update(vanished=man.n_vanished, changed=man.n_changed)
        rec.failed = _error_rows(zio.join(p.features, "errors"), new_errs)
        if new:
            n_new = sum(zpq.parquet_num_rows(zio.join(p.features, "features", n)) for n in new)
            rec.found, rec.did = f"{len(new)} new shard(s)", f"extracted {n_new} images in {len(new)} shard(s)"
            rec.counts["new_images"] = n_new
        else:
            rec.status, rec.found, rec.did = "nothing new", "no new input", "nothing to extract"
        if rec.counts.get("vanished") or rec.counts.get("changed"):
            rec.notes.append(f"{rec.counts.get('vanished', 0)} input item(s) vanished and "
                             f"{rec.counts.get('changed', 0)} changed since they were extracted: their rows are kept as "
                             "extracted, not re-read (listed in features/input_changes.parquet)")

    def classes(self, rec: StageRecord) -> None:
        from pipeline.semantics.classset import load_class_set
        from pipeline.stages.classes import run_classes

        p = self.paths
        old = _manifest(p.classes, ClassesManifest)
        old_names = list(load_class_set(p.classes).names) if old else []
        man = run_classes(self.cfg.stage_config("classes", output=p.classes, overwrite=True))
        names = list(load_class_set(p.classes).names)
        added = [n for n in names if n not in set(old_names)]
        removed = [n for n in old_names if n not in set(names)]
        rec.counts = {"classes": man.n_classes, "added": len(added), "removed": len(removed)}
        rec.details = {"added": added, "removed": removed}
        if old is not None and old.fingerprint == man.fingerprint and old.model_dump() == man.model_dump():
            rec.status, rec.found, rec.did = "nothing new", "class table unchanged", "class set kept"
        else:
            rec.found = "first run" if old is None else "the class table changed"
            rec.did = f"embedded {man.n_classes} classes" + (f" (added: {', '.join(added[:10])})" if added else "") + \
                (f" (removed: {', '.join(removed[:10])})" if removed else "")

    def captions(self, rec: StageRecord) -> None:
        if self.cfg.captions is None:
            rec.status, rec.did = "skipped", "no captions section in the spec"
            return
        from pipeline.core.features import CAPTIONS_DIR
        from pipeline.stages.embed_text import run_embed_text

        shard_dir = zio.join(self.paths.features, CAPTIONS_DIR, "shards")
        before = set(zpq.parquet_names(shard_dir))
        man = run_embed_text(self.cfg.stage_config("captions", features=self.paths.features, overwrite=False),
                             progress=self.progress)
        new = set(zpq.parquet_names(shard_dir)) - before
        rec.counts = {"shards": man.n_shards, "captions": man.n_captions, "new_shards": len(new)}
        if new:
            rec.found, rec.did = f"{len(new)} feature shard(s) without caption embeddings", \
                f"embedded the captions of {len(new)} shard(s)"
        else:
            rec.status, rec.found, rec.did = "nothing new", "no new captions", "nothing to embed"

    def train(self, rec: StageRecord) -> None:
        p, cfg = self.paths, self.cfg
        if cfg.train is None:
            rec.status, rec.did = "skipped", f"the spec names an existing model: {cfg.model}"
            return
        from pipeline.stages.train import run_train

        settings = cfg.train.model_dump(mode="json")
        settings["seen"] = _seen_names(settings["seen"])
        key = train_key(settings, p.features, p.classes)
        state = self.state()
        old = state.get("train_key")
        if old is not None and _exists(p.model) and {k: v for k, v in old.items() if k != "n_seen_rows"} == \
                {k: v for k, v in key.items() if k != "n_seen_rows"}:
            rec.status, rec.found, rec.did = "nothing new", "train settings and seen-class data unchanged", "model kept"
            return
        why = ("first run" if old is None or not _exists(p.model) else
               "the train settings changed" if old.get("settings") != key["settings"] else
               "the seen classes' semantics changed" if old.get("seen_semantics") != key["seen_semantics"] else
               f"the seen-class data changed ({old.get('n_seen_rows')} -> {key['n_seen_rows']} images)")
        tcfg = cfg.stage_config("train", **{k: v for k, v in settings.items() if k != "seen"}, seen=settings["seen"],
                                features=p.features, classes=p.classes, output=p.model, overwrite=True)
        man = run_train(tcfg)
        self.save_state({**state, "train_key": key})
        rec.found = why
        rec.did = f"trained {man.method} on {man.n_train} images of {len(man.seen)} seen classes"
        rec.counts = {"train_images": man.n_train or 0, "seen_classes": len(man.seen)}

    def model_dir(self) -> str:
        return self.paths.model if self.cfg.train is not None else str(self.cfg.model)

    def label(self, rec: StageRecord) -> None:
        from pipeline.stages.label import run_label

        p, cfg = self.paths, self.cfg
        old = _manifest(p.labels, LabelsManifest)
        lcfg = cfg.stage_config("label", model=self.model_dir(), features=p.features, classes=p.classes,
                                output=p.labels, overwrite=True, address=cfg.address)
        man = run_label(lcfg, progress=self.progress)
        failed = man.failed_shards
        rec.failed = [{"item": k, "reason": v} for k, v in failed.items()]
        rec.counts = {"shards": man.n_shards, "images": man.n_images, "labelled_now": man.n_labeled_this_run,
                      "failed_shards": len(failed)}
        relabel = man.last_diff is not None and (old is None or old.last_diff != man.last_diff)
        if relabel:
            rec.details["diff"] = _diff_summary(p.labels, man)
            rec.found = f"relabel from stored features ({rec.details['diff'].get('changed') or 'model or classes changed'})"
            rec.did = f"relabelled {man.n_labeled_this_run} images"
            moved = rec.details["diff"].get("moved") if rec.details["diff"] else None
            if moved is not None:
                rec.did += f"; {moved} changed label"
        elif man.n_labeled_this_run or failed:
            rec.found = "first run" if old is None else "new feature shards"
            rec.did = f"labelled {man.n_labeled_this_run} images"
        else:
            rec.status, rec.found, rec.did = "nothing new", "no new feature shards", "nothing to label"

    def index(self, rec: StageRecord) -> None:
        p, cfg = self.paths, self.cfg
        if cfg.index is None:
            rec.status, rec.did = "skipped", "no index section in the spec"
            return
        from pipeline.stages.index import run_index

        old = _manifest(p.index, IndexManifest)
        icfg = cfg.stage_config("index", features=p.features, model=self.model_dir(), output=p.index,
                                overwrite=True, address=cfg.address)
        man = run_index(icfg, progress=self.progress)
        rec.failed = [{"item": k, "reason": v} for k, v in man.failed_shards.items()]
        rec.counts = {"vectors": man.ntotal, "failed_shards": len(man.failed_shards)}
        if old is not None and old.model_dump() == man.model_dump():
            rec.status, rec.found, rec.did = "nothing new", "no new feature shards", "index kept"
        else:
            rec.found = man.last_reason or ("first run" if old is None else "new feature shards")
            rec.did = f"{man.last_run_summary()} ({man.factory})"
            if old is not None:
                rec.counts["added"] = man.ntotal - old.ntotal


def _error_rows(err_dir: str, names: list[str], limit: int = 200) -> list[dict]:
    """The failed items of the error shards ``names`` (image id, stage, reason), at most ``limit``."""
    out: list[dict] = []
    for n in names:
        t = zpq.read_parquet(zio.join(err_dir, n), columns=["image_id", "stage", "reason"])
        out += [{"item": i, "stage": st, "reason": r} for i, st, r in
                zip(*(t.column(c).to_pylist() for c in ("image_id", "stage", "reason")))]
        if len(out) >= limit:
            return out[:limit]
    return out


def _diff_summary(labels_dir: str, man: LabelsManifest) -> dict:
    """The label diff the relabel wrote (its summary JSON and where it is), or {} when it wrote none."""
    if not man.last_diff:
        return {}
    uri = zio.join(labels_dir, man.last_diff)
    summary = zio.join(uri, "summary.json")
    return {**(zio.read_json(summary) if zio.exists(summary) else {}), "dir": uri}


def run_pipeline(cfg: RunConfig, *, spec: str | None = None, progress: bool = True,
                 wait_s: float = 0.0) -> RunRecord:
    """Run the pipeline once (see the module docstring); the run's record, with its ``exit_code``."""
    runner = _Runner(cfg, spec=spec, progress=progress)
    rec = runner.record
    try:
        with zio.output_lock(cfg.root, name=".zsl-run.lock", wait_s=wait_s, what=f"`zsl run` of {cfg.name}"):
            rec.previous = _last_run(runner.paths.runs)
            write_run(runner.paths.runs, rec, final=False)
            _preflight(cfg)
            for name in ("extract", "classes", "captions", "train", "label", "index"):
                runner.stage(name, getattr(runner, name))
    except zio.OutputLocked as exc:
        rec.finish("locked", EXIT_LOCKED, str(exc))
        LOG.error("%s", exc)
        return rec  # the run that holds the lock owns runs/; nothing is written
    except BAD_INPUT as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        code = EXIT_FAILED if runner.changed else EXIT_BAD_INPUT
        rec.finish("bad input" if code == EXIT_BAD_INPUT else "failed", code, msg)
    except Exception as exc:  # noqa: BLE001 - recorded, then the run ends with EXIT_FAILED
        LOG.exception("zsl run %s failed", cfg.name)
        rec.finish("failed", EXIT_FAILED, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    else:
        failed = sum(len(s.failed) for s in rec.stages)
        rec.finish("done with failed items" if failed else "done", EXIT_PARTIAL if failed else EXIT_OK,
                   f"{failed} failed item(s): see the stages" if failed else "")
    if zio.exists(cfg.root):
        write_run(runner.paths.runs, rec, final=True, keep=cfg.keep_runs)
    return rec


def _preflight(cfg: RunConfig) -> None:
    """What can be checked before any stage changes anything: the class table reads, the seen classes are
    in it, the named model is a finished `zsl train` output (bad input: exit 2 with nothing changed)."""
    from pipeline.semantics.class_table import read_class_table

    c = cfg.classes
    if not zio.exists(c.input):
        raise FileNotFoundError(f"classes.input: {c.input} not found")
    table = read_class_table(c.input, name_column=c.name_column, description_column=c.description_column,
                             missing_value=c.missing_value)
    if cfg.train is not None:
        seen = _seen_names(cfg.train.seen)
        missing = [n for n in seen if n not in set(table.names)]
        if missing:
            raise ValueError(f"train.seen: {', '.join(missing[:5])} not in the class table {c.input}")
    elif not _exists(str(cfg.model)):
        raise FileNotFoundError(f"model: {cfg.model} is not a finished `zsl train` output (no manifest.json)")


def _last_run(runs_dir: str) -> str | None:
    """The id of the latest run recorded under ``runs_dir`` (None: the first run)."""
    ids = run_ids(runs_dir)
    return ids[-1] if ids else None
