"""`make eval`: every ZSL method, side by side, on real data that installs offline.

Regenerates ``benchmarks/results/EVAL.md`` and ``benchmarks/results/eval_results.json`` (nothing typed by hand):

1. **animal-mnist** images (real silhouettes) with EfficientNet-Lite0 features, semantics from
   (a) the AwA2 attribute rows of its animals, (b) class names/descriptions through MiniLM.
2. **OpenMoji** emoji art (real drawings, augmented renders) with class names as text semantics
   (MiniLM prompt ensembles, GloVe word vectors).
4. **Caption bridges** for the image sets: ridge / ASIF / contrastive bridges fitted on Open Clip Art
   drawings and their captions (Debian packages), alone and combined with class-trained methods
   (weight and γ chosen on held-out seen classes); corpus images that are also in an evaluated
   set (near-identical features) are dropped and counted.
3. **AwA1/AwA2/CUB/aPY/SUN class-level tables** (``conf/class_semantics``; no images
   ship with them): simulated features over the real class geometry, with the real splits.

Usage (from the repository root): ``python -m benchmarks.eval_suite [--quick] [--out benchmarks/results]
[--work runs/eval]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.core.timing import timed

LOG = logging.getLogger("zsl.eval")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# (method, semantics, params) per setting; attribute-only methods only where attributes exist.
TEXT_RUNS = [("clip", "text", {}), ("devise", "text", {}), ("ale", "text", {}), ("sje", "text", {}),
             ("eszsl", "text", {}), ("sae", "text", {"direction": "f2s"}), ("sae", "text", {"direction": "s2f"}),
             ("relation", "text", {}), ("eszsl", "glove", {}), ("devise", "text+glove", {}),
             ("ensemble", "text", {"members": ["devise", "eszsl"]})]
ATTR_RUNS = [("dap", "attributes", {}), ("eszsl", "attributes", {}), ("sae", "attributes", {"direction": "f2s"}),
             ("sae", "attributes", {"direction": "s2f"}), ("ale", "attributes", {}), ("sje", "attributes", {}),
             ("devise", "attributes", {}), ("relation", "attributes", {}),
             ("ensemble", "attributes", {"members": ["eszsl", "sae"]})]


def _train_eval(name: str, work: Path, feats_train: str, feats_test: str, classes: str, seen, unseen,
                runs, *, tune: bool, transductive: bool) -> dict:
    from pipeline.core.config import build_config
    from pipeline.stages.evaluate import run_evaluate_all
    from pipeline.stages.train import run_train

    models, skipped = [], []
    for method, semantics, extra in runs:
        params = {k: v for k, v in extra.items() if k != "members"}
        tag = f"{method}-{semantics}-{'-'.join(f'{k}{v}' for k, v in sorted(params.items()))}".rstrip("-")
        out = str(work / "models" / tag)
        cfg = build_config("train", dict(features=feats_train, classes=classes, seen=list(seen), method=method,
                                         semantics=semantics, params=params, members=extra.get("members", ()),
                                         tune=tune and method != "ensemble", output=out))
        # Train afresh every time: a model dir left by an earlier run would count as finished (its
        # identity names the feature directory, not how many images it held then).
        shutil.rmtree(out, ignore_errors=True)
        try:
            with timed() as t:
                run_train(cfg)
        except ValueError as exc:  # e.g. a method that cannot use these semantics
            LOG.warning("%s: %s skipped: %s", name, tag, exc)
            skipped.append({"run": tag, "reason": str(exc)})
            continue
        LOG.info("%s: trained %s in %.1fs", name, tag, t.seconds)
        models.append(out)
    ecfg = build_config("evaluate", dict(models=models, features=feats_test, classes=classes, unseen=list(unseen),
                                         transductive=transductive))
    out = run_evaluate_all(ecfg)
    for row, r in zip(out["table"], out["results"]):
        p = r.get("params") or {}
        if "direction" in p:
            row["method"] = f"sae-{p['direction']}"
    out["skipped"] = skipped
    return out


def _animal_features(work: Path, per_class: int) -> None:
    """animal-mnist images -> train/test features and the demo class set under ``work`` (resumable)."""
    from pipeline.core.config import build_config
    from pipeline.inputs.demo_data import write_demo_data
    from pipeline.stages.classes import run_classes
    from pipeline.stages.extract import run_extract

    write_demo_data(str(work / "data"), per_class=per_class)
    for split in ("train", "test"):
        run_extract(build_config("extract", dict(input=str(work / "data" / split), output=str(work / f"f_{split}"),
                                                 shard_size=200, overwrite=True)), progress=False)
    run_classes(build_config("classes", dict(input=str(ROOT / "conf" / "demo" / "classes.yaml"),
                                             output=str(work / "classes_demo"), overwrite=True)))


def animal_mnist(work: Path, shared: Path | None, per_class: int, tune: bool) -> list[dict]:
    from benchmarks.datasets import awa2_class_table
    from pipeline.core.config import build_config
    from pipeline.stages.classes import run_classes

    _animal_features(work, per_class)
    split = json.loads((ROOT / "conf" / "demo" / "split.json").read_text())
    sections = []
    res = _train_eval("animal-mnist/demo-table", work / "demo", str(work / "f_train"), str(work / "f_test"),
                      str(work / "classes_demo"), split["seen"], split["unseen"], TEXT_RUNS + ATTR_RUNS,
                      tune=tune, transductive=True)
    sections.append({"dataset": "animal-mnist", "semantics_source": "conf/demo/classes.yaml (descriptions, "
                     "25 hand-written attributes)", "images": "real (28x28 silhouettes), EfficientNet-Lite0",
                     "seen": split["seen"], "unseen": split["unseen"], **res})
    if shared and (shared / "awa2").is_dir():
        awa2_class_table(str(shared / "awa2"), str(work / "awa2_animals.csv"))
        run_classes(build_config("classes", dict(input=str(work / "awa2_animals.csv"),
                                                 output=str(work / "classes_awa2"),
                                                 missing_attributes="column_mean", overwrite=True)))
        seen = [c for c in split["seen"] if c != "bird"]
        res = _train_eval("animal-mnist/awa2", work / "awa2", str(work / "f_train"), str(work / "f_test"),
                          str(work / "classes_awa2"), seen, split["unseen"], ATTR_RUNS + TEXT_RUNS[:5],
                          tune=tune, transductive=True)
        sections.append({"dataset": "animal-mnist + AwA2 attributes", "semantics_source":
                         "AwA2 class_attributes.csv rows (85 attributes; bird has no AwA2 row and is left out)",
                         "images": "real (28x28 silhouettes), EfficientNet-Lite0", "seen": seen,
                         "unseen": split["unseen"], **res})
    return sections


def _emoji_features(work: Path, per_class: int, n_unseen: int = 10) -> tuple[list[str], list[str]]:
    """OpenMoji renders -> train/test features, class set and the seeded split under ``work``."""
    from benchmarks.datasets import EMOJI_CLASSES, write_emoji_images
    from pipeline.core import fs as zio
    from pipeline.core.config import build_config
    from pipeline.stages.classes import run_classes
    from pipeline.stages.extract import run_extract

    write_emoji_images(str(work / "train"), per_class=per_class, seed=1)
    write_emoji_images(str(work / "test"), per_class=max(10, per_class // 2), seed=2)
    for split in ("train", "test"):
        run_extract(build_config("extract", dict(input=str(work / split), output=str(work / f"f_{split}"),
                                                 shard_size=400, overwrite=True)), progress=False)
    zio.write_bytes_atomic(str(work / "classes.yaml"),
                           ("classes:\n" + "".join(f"  - name: {n}\n" for n in EMOJI_CLASSES)).encode())
    run_classes(build_config("classes", dict(input=str(work / "classes.yaml"), output=str(work / "classes"),
                                             overwrite=True)))
    rng = np.random.default_rng(0)
    unseen = sorted(rng.choice(EMOJI_CLASSES, size=n_unseen, replace=False).tolist())
    return [c for c in EMOJI_CLASSES if c not in unseen], unseen


def emoji_set(work: Path, per_class: int, tune: bool, n_unseen: int = 10) -> list[dict]:
    seen, unseen = _emoji_features(work, per_class, n_unseen)
    res = _train_eval("emoji", work, str(work / "f_train"), str(work / "f_test"), str(work / "classes"),
                      seen, unseen, TEXT_RUNS, tune=tune, transductive=True)
    return [{"dataset": "OpenMoji emoji (40 classes)", "semantics_source": "class names (emoji CLDR names): MiniLM "
             "prompt ensembles, GloVe", "images": "real emoji art, augmented renders, EfficientNet-Lite0",
             "seen": seen, "unseen": unseen, **res}]


def class_tables(work: Path, shared: Path, per_class: int, tune: bool) -> list[dict]:
    import pandas as pd

    from benchmarks.datasets import simulate_features
    from pipeline.core.config import build_config
    from pipeline.core.features import write_features
    from pipeline.stages.classes import run_classes

    sections = []
    for ds in ("awa1", "awa2", "apy", "cub", "sun"):
        d = shared / ds
        if not d.is_dir():
            continue
        table = pd.read_csv(d / "class_attributes.csv", index_col="class")
        names = list(table.index)
        if (d / "splits.json").exists():
            sp = json.loads((d / "splits.json").read_text())
            seen, unseen, source = sp["seen"], sp["unseen"], "splits.json (Xian PS)"
        else:  # SUN: no class lists shipped; a seeded split of Xian's sizes (645 / 72)
            rng = np.random.default_rng(0)
            unseen = sorted(rng.choice(names, size=72, replace=False).tolist())
            seen, source = [n for n in names if n not in set(unseen)], "seeded random 645/72 (no PS lists available)"
        A = table.to_numpy(np.float64)
        A = np.where(A < 0, np.nan, A)
        A = np.where(np.isnan(A), np.nanmean(A, axis=0), A)
        X, y = simulate_features(A, per_class=per_class + per_class // 2 + per_class, seed=0)
        yn = np.asarray(names, dtype=object)[y]
        order = np.arange(len(y))
        slot = order - np.searchsorted(y, y)  # index within class
        is_seen = np.isin(yn, seen)
        train = is_seen & (slot < per_class)
        test = (is_seen & (slot >= per_class) & (slot < per_class + per_class // 2)) | (~is_seen & (slot < per_class))
        w = work / ds
        for split, m in (("train", train), ("test", test)):
            ids = [f"{ds}/{i}" for i in np.flatnonzero(m)]
            shutil.rmtree(w / f"f_{split}", ignore_errors=True)  # no shards of an earlier, larger run
            write_features(str(w / f"f_{split}"), image_ids=ids, uris=ids, labels=list(yn[m]), X=X[m],
                           model_id="simulated", notes={"split": split, "dataset": ds})
        run_classes(build_config("classes", dict(input=str(d / "class_attributes.csv"), output=str(w / "classes"),
                                                 missing_attributes="column_mean", word_vectors=False,
                                                 overwrite=True)))
        res = _train_eval(ds, w, str(w / "f_train"), str(w / "f_test"), str(w / "classes"), seen, unseen,
                          ATTR_RUNS, tune=tune, transductive=True)
        sections.append({"dataset": f"{ds.upper()} class table ({len(names)} classes x {A.shape[1]} attributes)",
                         "semantics_source": f"{ds}/class_attributes.csv, L2-normalised; split: {source}",
                         "images": "none: simulated features relu(z(s_c) M + 0.5 noise), 64-d", "seen": seen,
                         "unseen": unseen, **res})
    return sections


BRIDGES = ("ridge", "asif", "contrastive")


def _corpus_features(work: Path, limit: int | None) -> str:
    """Open Clip Art (Debian packages) -> captioned features with caption embeddings (cached in ``work``)."""
    from pipeline.core.config import build_config
    from pipeline.inputs.corpus import write_openclipart_corpus
    from pipeline.stages.embed_text import run_embed_text
    from pipeline.stages.extract import run_extract

    write_openclipart_corpus(str(work / "corpus"), limit=limit, progress=False)
    run_extract(build_config("extract", dict(input=str(work / "corpus"), output=str(work / "f_corpus"))),
                progress=False)
    run_embed_text(build_config("embed-text", dict(features=str(work / "f_corpus"))), progress=False)
    return str(work / "f_corpus")


def bridge_rows(name: str, work: Path, corpus: str, feats_train: str, feats_test: str, classes: str, seen, unseen,
                exclude: list[str], tune: bool) -> dict:
    """Bridges alone (no class labels), each class-trained text method with the ridge bridge (weight
    and γ chosen on held-out seen classes), and their transductive variants."""
    from pipeline.core.config import build_config
    from pipeline.stages.bridge import run_bridge
    from pipeline.stages.evaluate import run_evaluate_all
    from pipeline.stages.train import run_train

    models, overlap = [], {}
    for method in BRIDGES:
        out = str(work / "bridges" / method)
        shutil.rmtree(out, ignore_errors=True)
        m = run_bridge(build_config("bridge", dict(features=corpus, output=out, method=method, exclude=exclude)))
        overlap[method] = {"pairs": m.config["pairs_with_captions"], "dropped_as_in_eval_sets": m.config["overlap_dropped"],
                           "used": m.n_train}
        models.append(out)
    for method, mode in (("devise", "scores"), ("eszsl", "scores"), ("ale", "scores"), ("devise", "features"),
                         ("eszsl", "features")):
        out = str(work / "models" / (f"{method}+bridge" if mode == "scores" else f"{method}+bridged-features"))
        shutil.rmtree(out, ignore_errors=True)
        run_train(build_config("train", dict(features=feats_train, classes=classes, seen=list(seen), method=method,
                                             bridge=str(work / "bridges" / "ridge"), bridge_mode=mode, tune=tune,
                                             output=out)))
        models.append(out)
    res = run_evaluate_all(build_config("evaluate", dict(models=models, features=feats_test, classes=classes,
                                                         unseen=list(unseen), transductive=True)))
    for row, r, path in zip(res["table"], res["results"], models):
        w = (r.get("params") or {}).get("weight")
        row["method"] = (f"bridge-{Path(path).name}" if Path(path).parent.name == "bridges"
                         else f"{Path(path).name} (w={w})" if w is not None else Path(path).name)
    res["overlap"] = overlap
    return res


def bridge_sections(work: Path, corpus_limit: int | None, tune: bool, per_class: tuple[int, int]) -> list[dict]:
    """Bridge rows for the image datasets (their features as the animal-mnist and emoji sections make them)."""
    import pipeline.inputs.corpus as oc

    if not os.path.isdir(oc.OPENCLIPART_ROOT):
        raise FileNotFoundError(f"{oc.OPENCLIPART_ROOT}: apt-get install openclipart-png openclipart-svg")
    corpus = _corpus_features(work / "openclipart", corpus_limit)
    am, em = work / "animal_mnist", work / "emoji"
    _animal_features(am, per_class[0])
    e_seen, e_unseen = _emoji_features(em, per_class[1])
    split = json.loads((ROOT / "conf" / "demo" / "split.json").read_text())
    exclude = [str(am / "f_test"), str(em / "f_test")]
    sections = []
    res = bridge_rows("animal-mnist", am / "bridge", corpus, str(am / "f_train"), str(am / "f_test"),
                      str(am / "classes_demo"), split["seen"], split["unseen"], exclude, tune)
    sections.append({"dataset": "animal-mnist: caption bridges (Open Clip Art)", "semantics_source":
                     "conf/demo/classes.yaml through MiniLM; bridges fitted on Open Clip Art drawings + captions",
                     "images": "real (28x28 silhouettes), EfficientNet-Lite0", "seen": split["seen"],
                     "unseen": split["unseen"], **res})
    prev = {"seen": e_seen, "unseen": e_unseen}
    res = bridge_rows("emoji", em / "bridge", corpus, str(em / "f_train"), str(em / "f_test"), str(em / "classes"),
                      prev["seen"], prev["unseen"], exclude, tune)
    sections.append({"dataset": "OpenMoji emoji: caption bridges (Open Clip Art)", "semantics_source":
                     "emoji CLDR names through MiniLM; bridges fitted on Open Clip Art drawings + captions",
                     "images": "real emoji art, augmented renders, EfficientNet-Lite0", "seen": prev["seen"],
                     "unseen": prev["unseen"], **res})
    return sections


def portable(section: dict) -> dict:
    """The section with paths under the repository made relative to it (results are committed)."""
    out = dict(section)
    f = out.get("features")
    if isinstance(f, str) and os.path.isabs(f) and Path(f).is_relative_to(ROOT):
        out["features"] = os.path.relpath(f, ROOT)
    return out


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"


def to_markdown(sections: list[dict], meta: dict) -> str:
    lines = ["# ZSL evaluation results", "",
             f"Generated by `make eval` (`python -m benchmarks.eval_suite`) on {meta['date']}; do not edit by hand."
             + (f" That run regenerated only: {', '.join(meta['partial'])} (`--only`); the other sections are from "
                f"the run of {meta.get('previous_date', 'an earlier date')}." if meta.get("partial") else ""),
             "All accuracies are per-class mean top-1 (%). ZSL: unseen test images, prediction among unseen "
             "classes. GZSL: seen and unseen test images, prediction among all classes; H = harmonic mean. "
             "*cal*: calibrated stacking with γ tuned on held-out **seen** classes. "
             f"Hyper-parameters {'tuned (--tune) on held-out seen classes' if meta['tune'] else 'at defaults'}. "
             "*trans*: transductive, reported separately: prototype refinement on the unlabelled test features "
             "(models that embed images), else each class's scores standardised over the test images.", ""]
    for s in sections:
        lines += [f"## {s['dataset']}", "",
                  f"- images: {s['images']}", f"- semantics: {s['semantics_source']}",
                  f"- {len(s['seen'])} seen / {len(s['unseen'])} unseen classes", "",
                  "| method | semantics | ZSL | S | U | H | S cal | U cal | H cal | γ | AUSUC | ZSL trans | H cal trans |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["table"]:
            lines.append(f"| {r['method']} | {r['semantics']} | {_pct(r['zsl'])} | {_pct(r['S'])} | {_pct(r['U'])} | "
                         f"{_pct(r['H'])} | {_pct(r['S_cal'])} | {_pct(r['U_cal'])} | **{_pct(r['H_cal'])}** | "
                         f"{r['gamma']:.3f} | {_pct(r['ausuc'])} | {_pct(r.get('zsl_trans'))} | "
                         f"{_pct(r.get('H_cal_trans'))} |")
        for method, o in (s.get("overlap") or {}).items():
            lines.append(f"\n_bridge {method}: {o['pairs']} captioned drawings, {o['dropped_as_in_eval_sets']} dropped "
                         f"as near-duplicates of evaluated images, {o['used']} used_")
        for sk in s.get("skipped", []):
            lines.append(f"\n_skipped {sk['run']}: {sk['reason']}_")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eval_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default=str(ROOT / "runs" / "eval"))
    parser.add_argument("--shared", default=str(ROOT / "conf" / "class_semantics"))
    parser.add_argument("--quick", action="store_true", help="fewer images, no tuning (smoke run)")
    parser.add_argument("--only", choices=["animal-mnist", "emoji", "tables", "bridge"], action="append",
                        help="run these sections only; the others are kept from the previous results")
    parser.add_argument("--corpus-limit", type=int, default=None, help="Open Clip Art drawings for the bridges")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.data", "sentence_transformers", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipeline.core import fs as zio

    work, shared = Path(args.work), Path(args.shared)
    shared_ok = shared.is_dir()
    if not shared_ok:
        LOG.warning("%s not found: the class-table and AwA2 sections are skipped", shared)
    tune = not args.quick
    only = set(args.only or ["animal-mnist", "emoji", "tables", "bridge"])
    sections = []
    with timed() as clock:
        if "animal-mnist" in only:
            sections += animal_mnist(work / "animal_mnist", shared if shared_ok else None, 20 if args.quick else 60,
                                     tune)
        if "emoji" in only:
            sections += emoji_set(work / "emoji", 10 if args.quick else 30, tune)
        if "tables" in only and shared_ok:
            sections += class_tables(work / "tables", shared, 10 if args.quick else 20, tune)
        if "bridge" in only:
            sections += bridge_sections(work, 1500 if args.quick else args.corpus_limit, tune,
                                        (20, 10) if args.quick else (60, 30))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tune": tune, "quick": args.quick,
            "seconds": round(clock.seconds, 1)}
    out = Path(args.out)
    slim = [{k: v for k, v in s.items() if k != "results"} | {"per_class": [r["per_class"] for r in s["results"]]}
            for s in sections]
    if args.only and (out / "eval_results.json").exists():  # keep the sections not run, in their order
        prev = json.loads((out / "eval_results.json").read_text())
        old = prev["sections"]
        meta["previous_date"] = prev["meta"].get("previous_date") if prev["meta"].get("partial") else prev["meta"]["date"]
        fresh = {s["dataset"]: s for s in slim}
        slim = [fresh.pop(s["dataset"], s) for s in old] + list(fresh.values())
        meta["partial"] = sorted(only)
    slim = [portable(s) for s in slim]
    sections = slim
    zio.write_json_atomic(str(out / "eval_results.json"), {"meta": meta, "sections": slim})
    zio.write_bytes_atomic(str(out / "EVAL.md"), to_markdown(sections, meta).encode())
    print(to_markdown(sections, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
