"""`zsl run` plays three days of a living pipeline, as real `zsl` processes on real animal-mnist images.

* day 1: shards A (nine class folders, the first images of each) and a class table without `cat`;
* day 2: shards B — new images in the old folders (their names sort between A's) and a new class folder
  `cat/` (sorts before most of A's) — plus the class table with `cat`;
* day 3: nothing new.

After day 2 the labels and the index hold exactly what one from-scratch run on A+B gives (same rows, same
labels, same index contents up to ids), every image was extracted once (day 1's feature shards untouched),
and the label diff lists exactly the images whose label moved. Day 3 changes no file. A second pipeline
killed with SIGKILL in the middle of day 2's relabel and run again ends exactly like the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core import parquet as zpq
from tests.jobs.test_resume import KILL_AT_COMMIT  # the zsl CLI, SIGKILLed at the N-th commit of a matching file

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
PER_CLASS, DAY1 = 6, 4  # images per class folder; the first DAY1 of each arrive on day 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.inputs.demo_data import write_demo_data

    base = tmp_path_factory.mktemp("living")
    write_demo_data(str(base / "src"), per_class=PER_CLASS)
    table = yaml.safe_load((ROOT / "conf/demo/classes.yaml").read_text())
    (base / "classes-day1.yaml").write_text(yaml.safe_dump({"classes": [c for c in table["classes"]
                                                                         if c["name"] != "cat"]}))
    shutil.copy(ROOT / "conf/demo/classes.yaml", base / "classes-day2.yaml")
    return base


def _day(world: Path, inputs: Path, day: int) -> None:
    """Bring the input folder ``inputs`` to what has arrived by ``day``."""
    src = world / "src" / "train"
    for cls in sorted(os.listdir(src)):
        if cls == "cat" and day < 2:
            continue
        files = sorted(os.listdir(src / cls))
        for f in files[: DAY1 if day < 2 else len(files)]:
            (inputs / cls).mkdir(parents=True, exist_ok=True)
            if not (inputs / cls / f).exists():
                shutil.copy(src / cls / f, inputs / cls / f)
    shutil.copy(world / f"classes-day{min(day, 2)}.yaml", inputs.parent / "classes.yaml")


def _spec(root: Path, inputs: Path) -> Path:
    spec = {"name": root.name, "root": str(root / "out"), "inputs": [str(inputs)],
            "extract": {"shard_size": 8}, "classes": {"input": str(root / "classes.yaml")},
            "train": {"seen": str(ROOT / "conf/demo/split.json"), "method": "devise",
                      "params": {"epochs": 15}, "calibration": False},
            "label": {"top_k": 3}, "index": {"max_memory": "1G"}}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _env(tag: str) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "ZSL_RAY_TMPDIR": f"/tmp/zsl-ray-living-{os.getpid()}-{tag}", "TQDM_DISABLE": "1"}


def _zsl(spec: Path, tag: str, *, kill_match: str | None = None, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = _env(tag)
    if kill_match:
        cmd = [PY, "-c", KILL_AT_COMMIT, "run", str(spec), "--no-progress"]
        env.update(KILL_MATCH=kill_match, KILL_AT=str(kill_at))
    else:
        cmd = [PY, "-m", "jobs.cli", "run", str(spec), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, start_new_session=True)


def _ok(p: subprocess.CompletedProcess, code: int = 0) -> None:
    assert p.returncode == code, (p.stdout + p.stderr)[-4000:]


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Every output file (run records and lock files aside): path -> (mtime ns, size)."""
    got = {}
    for d, _, fs in os.walk(out):
        for f in fs:
            p = Path(d) / f
            rel = p.relative_to(out).as_posix()
            if rel.startswith("runs/") or f.endswith(".lock"):
                continue
            st = p.stat()
            got[rel] = (st.st_mtime_ns, st.st_size)
    return got


def _labels(out: Path) -> dict[str, tuple]:
    t = zpq.read_parquet_dir(str(out / "labels" / "labels"))
    return {i: (t1, tuple(k), tuple(np.round(s, 5))) for i, t1, k, s in
            zip(*(t.column(c).to_pylist() for c in ("image_id", "top1", "topk", "topk_scores")))}


def _index(out: Path) -> dict[str, np.ndarray]:
    """image id -> the vector the index holds for it."""
    import faiss

    index = faiss.read_index(str(out / "index" / "index.faiss"))
    ids = zpq.read_parquet(str(out / "index" / "ids.parquet"))
    assert index.ntotal == ids.num_rows
    return {i: index.reconstruct(int(f)) for f, i in zip(ids.column("faiss_id").to_pylist(),
                                                         ids.column("image_id").to_pylist())}


def _record(out: Path) -> dict:
    runs = sorted((out / "runs").glob("*/record.json"))
    return json.loads(runs[-1].read_text())


def _diff_rows(out: Path) -> dict[str, tuple[str, str]]:
    files = sorted((out / "labels").glob("diffs/*/*.parquet"))
    got = {}
    for f in files:
        t = zpq.read_parquet(str(f))
        for i, a, b in zip(*(t.column(c).to_pylist() for c in ("image_id", "old_label", "new_label"))):
            assert i not in got, f"{i} listed twice in the label diff"
            got[i] = (a, b)
    return got


@pytest.fixture(scope="module")
def scratch(world):
    """One from-scratch run on A+B."""
    root = world / "scratch"
    inputs = root / "images"
    _day(world, inputs, 2)
    _ok(_zsl(_spec(root, inputs), "scratch"))
    return root / "out"


def test_three_days(world, scratch):
    root = world / "daily"
    inputs = root / "images"
    _day(world, inputs, 1)
    spec = _spec(root, inputs)
    out = root / "out"

    _ok(_zsl(spec, "day1"))
    day1_files, day1_labels = _files(out), _labels(out)
    day1_features = {k: v for k, v in day1_files.items() if k.startswith("features/features/")}
    assert len(day1_labels) == 9 * DAY1

    _day(world, inputs, 2)
    _ok(_zsl(spec, "day2"))
    rec = _record(out)
    stages = {s["name"]: s for s in rec["stages"]}
    assert stages["extract"]["counts"]["new_images"] == 10 * PER_CLASS - 9 * DAY1
    assert stages["classes"]["details"]["added"] == ["cat"]
    assert stages["train"]["status"] == "done"  # new images of seen classes: trained again
    assert (out / "runs" / rec["run_id"] / "report.html").exists()

    # every image extracted once: day 1's shards untouched, no image twice
    after = _files(out)
    assert {k: after[k] for k in day1_features} == day1_features
    feats = zpq.read_parquet_dir(str(out / "features" / "features"))
    ids = feats.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 10 * PER_CLASS

    # the same labels and index contents as the from-scratch run
    labels = _labels(out)
    assert labels == _labels(scratch)
    got, want = _index(out), _index(scratch)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)

    # the diff lists exactly the images (of day 1) whose label moved
    moved = {i: (day1_labels[i][0], labels[i][0]) for i in day1_labels if day1_labels[i][0] != labels[i][0]}
    assert _diff_rows(out) == moved
    assert stages["label"]["details"]["diff"]["moved"] == len(moved)

    # day 3: nothing new, no file changed
    before = _files(out)
    _ok(_zsl(spec, "day3"))
    assert _files(out) == before
    rec3 = _record(out)
    assert {s["status"] for s in rec3["stages"]} <= {"nothing new", "skipped"}


def test_sigkill_in_day_two(world, scratch):
    root = world / "killed"
    inputs = root / "images"
    _day(world, inputs, 1)
    spec = _spec(root, inputs)
    out = root / "out"
    _ok(_zsl(spec, "k1"))
    _day(world, inputs, 2)
    p = _zsl(spec, "k2", kill_match="/labels/", kill_at=3)  # killed while relabelling
    assert p.returncode == -9, (p.stdout + p.stderr)[-3000:]
    _ok(_zsl(spec, "k3"))
    daily = world / "daily" / "out"
    assert _labels(out) == _labels(scratch)
    if (daily / "labels").exists():
        assert _diff_rows(out) == _diff_rows(daily)
    got, want = _index(out), _index(scratch)
    assert sorted(got) == sorted(want)
