"""Fault injection: real `zsl` processes killed with SIGKILL at several points, then rerun.

`zsl extract` runs for real (a local Ray cluster, EfficientNet-Lite0, real animal-mnist images plus
a few hostile files) and is killed: very early (before any shard), at the instant its second
features file is being committed (after that shard's errors file, before the rename), and after
the 3rd and 6th features files appear. The rerun must complete with exactly the rows of an
uninterrupted run: same ids, no duplicates, no gaps, the same embeddings, the same error rows.
`zsl label` and `zsl index` are killed at the commit of an output file the same way.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq

PY = sys.executable
N_SHARDS, SHARD = 8, 16
HOSTILE = {  # image_id -> bytes: item-level problems that must become error rows, once each
    "bird/00000-empty.png": b"",
    "cow/00000-notimage.png": b"GIF89a? no: plain text\n" * 10,
    "dog/00000-truncated.png": None,  # filled in with half a real PNG
    "horse/00000-bomb.png": None,  # a PNG header claiming 50000 x 50000 pixels
}

# Runs `zsl` in-process after wrapping the atomic-commit step: when the commit of the
# KILL_AT-th file whose path contains KILL_MATCH begins (temp file written, not yet renamed),
# the whole process group is SIGKILLed: a real kill at an exact, reproducible point.
KILL_AT_COMMIT = """
import os, signal, sys
import pipeline.core.fs as zio
from pipeline.core import parquet as zpq
real, seen = zio._commit, [0]
def commit(fs, tmp, path):
    if os.environ["KILL_MATCH"] in path:
        seen[0] += 1
        if seen[0] == int(os.environ["KILL_AT"]):
            os.killpg(os.getpgrp(), signal.SIGKILL)
    real(fs, tmp, path)
zio._commit = commit
from jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(tag: str) -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "ZSL_RAY_TMPDIR": f"/tmp/zsl-ray-resume-{os.getpid()}-{tag}", "TQDM_DISABLE": "1"}


def _start(argv: list[str], log: Path, tag: str, kill_match: str | None = None, kill_at: int = 0) -> subprocess.Popen:
    env = _env(tag)
    if kill_match:
        cmd = [PY, "-c", KILL_AT_COMMIT, *argv]
        env.update(KILL_MATCH=kill_match, KILL_AT=str(kill_at))
    else:
        cmd = [PY, "-m", "jobs.cli", *argv]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[2])


def _session_pids(sid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
                out.append(int(d))
    return out


def _kill(p: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL the job's process group, then wait for its Ray processes (same session) to go away."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    _reap(p.pid, timeout)


def _reap(sid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)  # raylet and workers notice their driver died and exit
    for pid in _session_pids(sid):  # stragglers of this job's own session, by pid
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Watch:
    """Polls an output directory: every features file is complete when it appears (a reader never
    sees a partial file), no temp file is ever listed, and no finished file is ever rewritten."""

    def __init__(self, out: Path) -> None:
        self.out, self.first_seen = out, {}

    def poll(self) -> int:
        feats = self.out / "features"
        if not feats.exists():
            return 0
        listed = zio.list_files(str(self.out))
        assert not [f for f in listed if zio.TMP_PREFIX in f]
        for f in zpq.iter_parquet_files(str(feats)):
            name = f.rsplit("/", 1)[-1]
            if name not in self.first_seen:
                t = zpq.read_parquet(f)  # must parse: complete, never partial
                assert 0 < t.num_rows <= SHARD
                self.first_seen[name] = os.stat(f).st_mtime_ns
        return len(self.first_seen)

    def wait_for(self, p: subprocess.Popen, n: int, timeout: float = 240) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.poll()
            if got >= n:
                return got
            assert p.poll() is None, f"job exited early with {p.returncode} before {n} shards"
            time.sleep(0.05)
        raise AssertionError(f"no {n} features files after {timeout}s")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, animal_mnist) -> Path:
    from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES

    root = tmp_path_factory.mktemp("resume") / "in"
    x, y = animal_mnist
    classes = ANIMAL_MNIST_CLASSES[:8]
    n_real = N_SHARDS * SHARD - len(HOSTILE)
    for k, i in enumerate(np.concatenate([np.flatnonzero(y == c)[:16] for c in range(8)])[:n_real]):
        d = root / classes[int(y[i])]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{int(i):05d}.png")
    png = (root / "bear" / sorted(os.listdir(root / "bear"))[0]).read_bytes()
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    bomb = bytearray(buf.getvalue())
    bomb[16:24] = struct.pack(">II", 50_000, 50_000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    payload = {**HOSTILE, "dog/00000-truncated.png": png[: len(png) // 2], "horse/00000-bomb.png": bytes(bomb)}
    for rel, data in payload.items():
        (root / rel).write_bytes(data)
    assert sum(1 for _ in root.rglob("*.png")) == N_SHARDS * SHARD
    return root


@pytest.fixture(scope="module")
def reference(corpus) -> dict:
    """What an uninterrupted run must produce: the job's own mappers, run in-process without Ray."""
    from pipeline.cluster.extraction import EncodeActor, decode_shard
    from pipeline.inputs.registry import list_shards

    shards = list_shards(str(corpus), shard_size=SHARD)
    assert len(shards) == N_SHARDS
    enc = EncodeActor(encoder="effnet-lite0", pretrained=None, device="cpu", threads=2)
    emb, errors = {}, {}
    for s in shards:
        out = enc(decode_shard({"shard": np.array([s.to_json()], dtype=object)}, image_size=224,
                               max_pixels=89_478_485, read={"image_column": "image"}))
        for i, image_id in enumerate(out["image_id"]):
            if out["error"][i]:
                errors[str(image_id)] = str(out["stage"][i])
            else:
                emb[str(image_id)] = out["embedding"][i]
    assert sorted(errors) == sorted(HOSTILE)
    return {"emb": emb, "errors": errors}


@pytest.mark.timeout(900)
@pytest.mark.slow  # ~15-20 s: runs in CI's `make test-slow`
def test_extract_killed_at_several_points_resumes_to_the_exact_rows(corpus, reference, tmp_path):
    out = tmp_path / "features"
    argv = ["extract", "--input", str(corpus), "--output", str(out), "--shard-size", str(SHARD),
            "--batch-size", str(SHARD)]
    watch = Watch(out)
    kills = []
    try:
        # 1. very early: right after run.json is written, before Ray or any shard
        p = _start(argv, tmp_path / "run1.log", "1")
        while not (out / "run.json").exists():
            assert p.poll() is None, (tmp_path / "run1.log").read_text()
            time.sleep(0.01)
        _kill(p)
        kills.append(watch.poll())
        assert kills[-1] == 0 and not (out / "manifest.json").exists()

        # 2. at the commit of this run's 2nd features file: its errors file is in place, the
        #    features file is a complete temp file not yet renamed
        p = _start(argv, tmp_path / "run2.log", "2", kill_match="/features/shard-", kill_at=2)
        assert p.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "run2.log").read_text()[-3000:]
        _reap(p.pid)
        kills.append(watch.poll())
        assert kills[-1] == 1
        temps = [f for f in os.listdir(out / "features") if f.startswith(zio.TMP_PREFIX)]
        assert len(temps) == 1, os.listdir(out / "features")  # the kill left it ...
        assert zpq.read_parquet_dir(str(out / "features")).num_rows <= SHARD  # ... and no reader sees it
        orphan = temps[0].rsplit("-", 2)[-2:]  # errors/shard-N exists without features/shard-N
        assert (out / "errors" / "-".join(orphan)).exists()

        # 3. and 4. after the 3rd and the 6th features file appear
        for n, tag in ((3, "3"), (6, "4")):
            p = _start(argv, tmp_path / f"run{tag}.log", tag)
            watch.wait_for(p, n)
            _kill(p)
            kills.append(watch.poll())

        # 5. the rerun that completes
        done_before = watch.poll()
        p = _start(argv, tmp_path / "run5.log", "5")
        while p.poll() is None:
            watch.poll()
            time.sleep(0.05)
        log5 = (tmp_path / "run5.log").read_text()
        assert p.returncode == 0, log5[-3000:]
        _reap(p.pid)
    finally:
        for tag in "12345":
            shutil.rmtree(_env(tag)["ZSL_RAY_TMPDIR"], ignore_errors=True)

    assert kills[:2] == [0, 1] and kills[2] >= 3 and kills[3] >= 6
    assert f"{N_SHARDS} shards in the plan (0 new), {done_before} already done, {N_SHARDS - done_before} to do" in log5
    # every features file was written once: none was rewritten by a later run
    assert {n: os.stat(out / "features" / n).st_mtime_ns for n in watch.first_seen} == watch.first_seen
    assert sorted(watch.first_seen) == [f"shard-{i:06d}.parquet" for i in range(N_SHARDS)]

    feats = zpq.read_parquet_dir(str(out / "features"))
    ids = feats.column("image_id").to_pylist()
    assert len(ids) == len(set(ids))  # no duplicates
    assert sorted(ids) == sorted(reference["emb"])  # no gaps, nothing extra
    emb = np.stack(feats.column("embedding").to_numpy(zero_copy_only=False))
    for image_id, e in zip(ids, emb):
        np.testing.assert_allclose(e, reference["emb"][image_id], rtol=1e-5, atol=1e-5)
    errors = zpq.read_parquet_dir(str(out / "errors")).to_pylist()
    assert sorted(e["image_id"] for e in errors) == sorted(reference["errors"])  # each error row once
    assert {e["image_id"]: e["stage"] for e in errors} == reference["errors"]
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(zio.TMP_PREFIX)]
    m = json.loads((out / "manifest.json").read_text())
    assert (m["n_shards"], m["n_images"], m["n_errors"]) == (N_SHARDS, len(reference["emb"]), len(HOSTILE))

    # killed after the last shard but before the manifest: the rerun only writes the manifest
    os.remove(out / "manifest.json")
    p = _start(argv, tmp_path / "run6.log", "6")
    assert p.wait(timeout=120) == 0
    log6 = (tmp_path / "run6.log").read_text()
    assert f"{N_SHARDS} already done, 0 to do" in log6 and "encoder pool" not in log6  # Ray never started
    assert json.loads((out / "manifest.json").read_text())["n_images"] == m["n_images"]


# ---------------------------------------------------------------- label and index, killed mid-write


DIM, K, NAMES = 6, 4, ["cat", "dog", "okapi", "zebra"]


@pytest.fixture
def world(tmp_path) -> dict:
    from pipeline.semantics.classset import write_class_set
    from pipeline.core.features import write_features
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL

    rng = np.random.default_rng(3)
    text = rng.standard_normal((4, K)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    write_class_set(str(tmp_path / "classes"), NAMES, [None] * 4, text, None, {"text_model": "fake-text"})
    model = ESZSL(gamma=1.0, lam=1.0).fit(rng.standard_normal((20, DIM)), np.arange(20) % 2, text[:2])
    save_model(str(tmp_path / "model"), model, {
        "feature_model": "fake-feat", "feature_dim": DIM, "semantics": "text", "semantic_dim": K,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
        "seen": NAMES[:2], "gamma": 0.1, "calibration": None})
    X = rng.standard_normal((50, DIM)).astype(np.float32)
    write_features(str(tmp_path / "features"), image_ids=[f"i{n:03d}" for n in range(50)],
                   uris=[f"u{n}" for n in range(50)], labels=[NAMES[n % 4] for n in range(50)], X=X,
                   model_id="fake-feat", shard_size=10)
    return {k: str(tmp_path / k) for k in ("features", "classes", "model")}


def test_label_killed_while_committing_a_shard_resumes_exactly(world, tmp_path):
    from pipeline.core.config import LabelConfig
    from pipeline.stages.label import run_label

    run_label(LabelConfig(model=world["model"], features=world["features"], classes=world["classes"],
                          output=str(tmp_path / "ref")), progress=False)
    out = tmp_path / "labels"
    argv = ["label", "--model", world["model"], "--features", world["features"], "--classes", world["classes"],
            "--output", str(out)]
    p = _start(argv, tmp_path / "l1.log", "l1", kill_match="/labels/shard-", kill_at=3)
    assert p.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "l1.log").read_text()
    assert len(zio.list_files(str(out / "labels"))) == 2 and not (out / "manifest.json").exists()
    assert any(f.startswith(zio.TMP_PREFIX) for f in os.listdir(out / "labels"))
    p = _start(argv, tmp_path / "l2.log", "l2")
    assert p.wait(timeout=120) == 0, (tmp_path / "l2.log").read_text()
    assert "labeling 3 feature shards (2 already done)" in (tmp_path / "l2.log").read_text()
    got, want = zpq.read_parquet_dir(str(out / "labels")), zpq.read_parquet_dir(str(tmp_path / "ref" / "labels"))
    assert got.equals(want) and len(set(got.column("image_id").to_pylist())) == 50
    assert sorted(os.listdir(out / "labels")) == [f"shard-{i:06d}.parquet" for i in range(5)]
    assert json.loads((out / "manifest.json").read_text())["n_images"] == 50


@pytest.mark.parametrize("kill_match, kill_at, projected_on_rerun", [
    ("/vectors/", 3, 3),  # during projection: 2 shards cached, 3 left
    ("/index.faiss", 1, 0),  # while saving: every shard cached, nothing to project again
])
def test_index_killed_mid_build_resumes_from_its_cache(world, tmp_path, kill_match, kill_at, projected_on_rerun):
    from pipeline.core.config import IndexConfig
    from pipeline.index.store import load_index
    from pipeline.stages.index import run_index

    run_index(IndexConfig(features=world["features"], model=world["model"], output=str(tmp_path / "ref"),
                          index_factory="Flat", use_gpu="no"), progress=False)
    out = tmp_path / "index"
    argv = ["index", "--features", world["features"], "--model", world["model"], "--output", str(out),
            "--index-factory", "Flat", "--use-gpu", "no"]
    p = _start(argv, tmp_path / "i1.log", "i1", kill_match=kill_match, kill_at=kill_at)
    assert p.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "i1.log").read_text()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_index(str(out))
    p = _start(argv, tmp_path / "i2.log", "i2")
    assert p.wait(timeout=120) == 0, (tmp_path / "i2.log").read_text()
    assert f"projected {projected_on_rerun} of 5 shards" in (tmp_path / "i2.log").read_text()
    import faiss

    (a, ids_a, m), (b, ids_b, _) = load_index(str(out)), load_index(str(tmp_path / "ref"))
    assert ids_a.equals(ids_b) and m.ntotal == 50
    np.testing.assert_array_equal(faiss.rev_swig_ptr(a.get_xb(), 50 * K), faiss.rev_swig_ptr(b.get_xb(), 50 * K))
    assert sorted(os.listdir(out)) == [".zsl.lock", "ids.parquet", "index.faiss", "manifest.json", "model", "run.json"]


@pytest.mark.parametrize("kill_match", ["/ids.parquet", "/index.faiss"])
def test_index_killed_while_adding_new_shards_holds_each_image_once(world, tmp_path, kill_match):
    """Features gain shards; `zsl index` adds their vectors and is SIGKILLed while committing the new
    ids or index file. No reader accepts the half-written directory; the rerun rebuilds from the
    projection cache and every image is in the index exactly once."""
    from pipeline.index.store import load_index
    from pipeline.core.features import write_features

    feats = tmp_path / "features"
    rng = np.random.default_rng(5)
    X = rng.standard_normal((70, DIM)).astype(np.float32)
    ids = [f"g{n:03d}" for n in range(70)]
    write_features(str(feats), image_ids=ids[:50], uris=ids[:50], labels=[NAMES[0]] * 50, X=X[:50],
                   model_id="fake-feat", shard_size=10)
    out = tmp_path / "index"
    argv = ["index", "--features", str(feats), "--model", world["model"], "--output", str(out),
            "--index-factory", "Flat", "--use-gpu", "no"]
    p = _start(argv, tmp_path / "i0.log", "i0")
    assert p.wait(timeout=120) == 0, (tmp_path / "i0.log").read_text()
    write_features(str(feats), image_ids=ids, uris=ids, labels=[NAMES[0]] * 70, X=X, model_id="fake-feat",
                   shard_size=10)  # the same 5 shards and 2 more
    p = _start(argv, tmp_path / "i1.log", "i1", kill_match=kill_match, kill_at=1)
    assert p.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "i1.log").read_text()
    assert "adding their vectors" in (tmp_path / "i1.log").read_text()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_index(str(out))
    p = _start(argv, tmp_path / "i2.log", "i2")
    assert p.wait(timeout=120) == 0, (tmp_path / "i2.log").read_text()
    index, got, m = load_index(str(out))
    assert m.ntotal == index.ntotal == 70 and m.build == "build"
    assert sorted(got.column("image_id").to_pylist()) == ids  # each image once
    assert got.column("faiss_id").to_pylist() == list(range(70))
