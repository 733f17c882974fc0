"""End to end through the real CLI (`jobs.cli.main`) on real animal-mnist images, real models
(EfficientNet-Lite0, all-MiniLM-L6-v2), a real local Ray cluster and real FAISS."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES, load_animal_mnist

SEEN = ["bear", "bird", "cow", "elephant"]
UNSEEN = ["giraffe", "zebra"]
CLASSES_YAML = """
classes:
  - {name: bear, description: a large heavy furry animal with big paws}
  - {name: bird, description: a small animal with feathers and wings that flies}
  - {name: cow, description: a farm animal with hooves and horns that gives milk}
  - {name: elephant, description: a huge gray animal with a long trunk and big ears}
  - {name: giraffe, description: a very tall animal with an extremely long neck}
  - {name: zebra, description: a wild horse-like animal with black and white stripes}
"""


@pytest.fixture(scope="module")
def ray_cluster():
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipeline.cluster.session import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    x, y = load_animal_mnist()
    rng = np.random.default_rng(0)
    for name in SEEN + UNSEEN:
        idx = rng.permutation(np.flatnonzero(y == ANIMAL_MNIST_CLASSES.index(name)))
        for split, part in (("train", idx[:12]), ("test", idx[12:20])):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    (root / "classes.yaml").write_text(CLASSES_YAML)
    (root / "split.json").write_text(json.dumps({"seen": SEEN, "unseen": UNSEEN}))
    (root / "new.yaml").write_text("classes:\n  - {name: kangaroo, description: a marsupial that hops}\n")
    return root


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_full_flow(ray_cluster, data: Path, tmp_path: Path, capsys):
    out = tmp_path
    assert run("extract", "--input", data / "train", "--output", out / "ftrain", "--shard-size", "16") == 0
    assert run("extract", "--input", data / "test", "--output", out / "ftest", "--shard-size", "16") == 0
    man = json.loads((out / "ftrain" / "manifest.json").read_text())
    assert (man["n_images"], man["n_errors"], man["dim"], man["n_shards"]) == (72, 0, 1280, 5)
    shard = pq.read_table(out / "ftrain" / "features" / "shard-000000.parquet")
    assert shard.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    assert set(shard.column("label").to_pylist()) <= set(SEEN + UNSEEN)

    # a rerun finds every shard done and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in (out / "ftrain" / "features").iterdir()}
    assert run("extract", "--input", data / "train", "--output", out / "ftrain", "--shard-size", "16") == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "ftrain" / "features").iterdir()}
    # ... and a rerun with another shard size into the same output is refused, nothing written
    assert run("extract", "--input", data / "train", "--output", out / "ftrain", "--shard-size", "8") == 2
    assert "other inputs or settings (shard_size: was 16, now 8)" in capsys.readouterr().err

    assert run("classes", "--input", data / "classes.yaml", "--output", out / "classes") == 0
    split = data / "split.json"
    assert run("train", "--features", out / "ftrain", "--classes", out / "classes", "--seen", split,
               "--method", "devise", "--output", out / "model", "--epochs", "10") == 0
    assert run("evaluate", "--model", out / "model", "--features", out / "ftest", "--classes", out / "classes",
               "--unseen", split, "--json", out / "eval.json", "--transductive") == 0
    ev = json.loads((out / "eval.json").read_text())["results"][0]
    assert ev["n_test_unseen"] == 16 and ev["n_test_seen"] == 32
    assert 0.0 <= ev["zsl_unseen_top1"] <= 1.0 and 0.0 <= ev["gzsl_calibrated"]["H"] <= 1.0
    assert 0.0 <= ev["transductive"]["zsl_unseen_top1"] <= 1.0
    assert len(ev["confusion"]["matrix"]) == len(UNSEEN)
    # evaluating on the training features is refused
    assert run("evaluate", "--model", out / "model", "--features", out / "ftrain", "--classes", out / "classes",
               "--unseen", split) == 2

    assert run("label", "--model", out / "model", "--features", out / "ftest", "--classes", out / "classes",
               "--output", out / "labels", "-k", "3") == 0
    labels = pq.read_table(out / "labels" / "labels").to_pandas()
    assert len(labels) == 48 and labels["topk"].map(len).eq(3).all()
    assert set(labels["top1"]) <= set(SEEN + UNSEEN)

    assert run("index", "--features", out / "ftest", "--model", out / "model", "--output", out / "index") == 0
    capsys.readouterr()
    assert run("search", "--index", out / "index", "an animal with a long neck", "-k", "5", "--json") == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 5 and all(h["uri"].endswith(".png") for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)

    # new class from a name + description only; existing features are re-labelled, not re-extracted
    feats_before = {p.name: p.stat().st_mtime_ns for p in (out / "ftest" / "features").iterdir()}
    assert run("add-classes", "--model", out / "model", "--classes", out / "classes", "--input", data / "new.yaml",
               "--relabel", out / "labels") == 0
    relabeled = json.loads((out / "labels" / "manifest.json").read_text())
    assert "kangaroo" in relabeled["classes"] and len(relabeled["classes"]) == 7
    assert feats_before == {p.name: p.stat().st_mtime_ns for p in (out / "ftest" / "features").iterdir()}
    relabels = pq.read_table(out / "labels" / "labels").to_pandas()
    assert len(relabels) == 48 and relabels["topk"].map(len).eq(3).all()


@pytest.mark.slow  # ~15-20 s: runs in CI's `make test-slow`
def test_webdataset_and_parquet_inputs(ray_cluster, data: Path, tmp_path: Path, monkeypatch):
    imgs = sorted((data / "train" / "bear").glob("*.png"))[:5]
    tar_dir = tmp_path / "wds"
    tar_dir.mkdir()
    with tarfile.open(tar_dir / "00000.tar", "w") as tf:
        for i, p in enumerate(imgs):
            for name, payload in ((f"{i:09d}.png", p.read_bytes()),
                                  (f"{i:09d}.json", json.dumps({"label": "bear"}).encode()),
                                  (f"{i:09d}.txt", b"a bear silhouette")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    assert run("extract", "--input", tar_dir, "--output", tmp_path / "f_wds") == 0
    t = pq.read_table(tmp_path / "f_wds" / "features")
    assert t.num_rows == 5 and set(t.column("label").to_pylist()) == {"bear"}
    assert t.column("caption").to_pylist()[0] == "a bear silhouette"
    # the tar's decode task streams blocks of 2 rows: one shard, written once its 3 blocks are in, same rows
    from pipeline.stages import extract as stage

    seen, real = [], stage._ShardWriter.__call__
    monkeypatch.setattr(stage._ShardWriter, "__call__",
                        lambda self, batch: (seen.extend(batch["shard_n"].tolist()), real(self, batch))[1])
    assert run("extract", "--input", tar_dir, "--output", tmp_path / "f_wds2", "--set", "decode_block_rows=2") == 0
    assert sorted(seen) == [-1] * 4 + [5]  # rows 0-3 came in blocks before the last (the setting reached Ray)
    t2 = pq.read_table(tmp_path / "f_wds2" / "features")
    assert [p.name for p in (tmp_path / "f_wds2" / "features").iterdir()] == ["shard-000000.parquet"]
    assert t2.column("image_id").to_pylist() == t.column("image_id").to_pylist()
    np.testing.assert_allclose(np.stack(t2.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-4)

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    pq.write_table(pa.table({"image": [p.read_bytes() for p in imgs] + [b"not an image"],
                             "label": ["bear"] * 6}), pq_dir / "part-0.parquet", row_group_size=3)
    assert run("extract", "--input", pq_dir, "--output", tmp_path / "f_pq") == 0
    m = json.loads((tmp_path / "f_pq" / "manifest.json").read_text())
    assert (m["n_images"], m["n_errors"], m["n_shards"]) == (5, 1, 2)
    err = pq.read_table(tmp_path / "f_pq" / "errors").to_pylist()
    assert err[0]["image_id"] == "part-0/5" and err[0]["stage"] == "decode"


@pytest.mark.parametrize("argv, needle", [
    (["extract", "--input", "/nonexistent/dir", "--output", "/tmp/x"], "no such file"),
    (["train", "--features", "/nonexistent", "--classes", "/x", "--seen", "a", "--output", "/tmp/m",
      "--method", "nope"], "method"),
    (["extract", "--input", "/tmp", "--output", "/tmp/x", "--set", "bogus_key=1"], "unknown key 'bogus_key'"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zsl: error:") and needle in err[0].lower()


def test_every_command_has_help(capsys):
    for cmd in ("extract", "classes", "train", "evaluate", "label", "index", "search", "add-classes", "report"):
        assert main([cmd, "--help"]) == 0
        assert "Usage" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert main(["label"]) == 2  # missing required options
    assert "missing required 'model' (give --model" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


def test_extract_on_cpu_runs_on_onnx_runtime_with_the_pytorch_features(ray_cluster, data: Path, tmp_path: Path):
    """The default `zsl extract` on a CPU-only cluster: the encoder actors run the ONNX Runtime export,
    and its features equal PyTorch's (same decoding, large JPEGs in draft mode) within the bound."""
    from pipeline.encoders.image import load_image_encoder
    from pipeline.encoders.image_onnx import TOLERANCE
    from pipeline.inputs.images import decode_image

    inp = tmp_path / "in"
    (inp / "bear").mkdir(parents=True)
    for f in sorted((data / "train" / "bear").glob("*.png"))[:6]:
        (inp / "bear" / f.name).write_bytes(f.read_bytes())
    rng = np.random.default_rng(0)
    for i in range(3):  # large JPEGs: decoded in draft mode
        arr = np.clip(rng.normal(128, 40, (60, 80, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).resize((800, 600), Image.Resampling.BICUBIC).save(inp / "bear" / f"big{i}.jpg", quality=90)
    assert run("extract", "--input", inp, "--output", tmp_path / "f", "--shard-size", "4") == 0
    man = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert man["resources"]["backend"] == "onnx" and man["resources"]["rows_by_backend"] == {"onnx": 9, "torch": 0}
    assert man["config"]["jpeg_draft"] is True and man["config"]["image_backend"] == "auto"
    assert set(man["stage_seconds"]) == {"read", "decode", "encode", "write"}
    assert all(v > 0 for v in man["stage_seconds"].values())
    t = pq.read_table(tmp_path / "f" / "features")
    X = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    torch_enc = load_image_encoder("effnet-lite0", device="cpu", backend="torch")
    want = torch_enc.encode(np.stack([decode_image(Path(u).read_bytes(), size=224, draft=True)[0]
                                      for u in t.column("uri").to_pylist()]))
    assert float(np.abs(X - want).max()) / max(1.0, float(np.abs(want).max())) <= TOLERANCE


@pytest.mark.slow  # ~15-20 s: runs in CI's `make test-slow`
def test_open_clip_backbone_and_text_tower_zero_shot(ray_cluster, data: Path, tmp_path: Path):
    """open_clip path end to end with random weights (no hub download): image tower in the Ray
    actors, text tower for the classes, and the `clip` method that needs no projection."""
    arch = ["--encoder", "open_clip:ViT-S-32", "--pretrained", "random"]
    for split in ("train", "test"):
        assert run("extract", "--input", data / split, "--output", tmp_path / split, "--limit", "1",
                   "--shard-size", "8", *arch) == 0
    man = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert man["model_id"] == "open_clip:ViT-S-32@random" and man["dim"] == 384
    assert run("classes", "--input", data / "classes.yaml", "--output", tmp_path / "classes",
               "--text-model", "open_clip:ViT-S-32", "--pretrained", "random") == 0
    classes = json.loads((tmp_path / "classes" / "manifest.json").read_text())
    assert classes["text_dim"] == 384
    train_labels = set(pq.read_table(tmp_path / "train" / "features").column("label").to_pylist())
    seen = ",".join(sorted(train_labels)[:2])
    assert run("train", "--features", tmp_path / "train", "--classes", tmp_path / "classes", "--seen", seen,
               "--method", "clip", "--no-calibration", "--output", tmp_path / "model") == 0
    from safetensors.numpy import load_file

    assert "W" not in load_file(str(tmp_path / "model" / "weights.safetensors"))  # identity: shared space


def test_open_clip_without_weights_fails_fast(tmp_path: Path, data: Path, capsys):
    assert run("extract", "--input", data / "train", "--output", tmp_path / "x",
               "--encoder", "open_clip:ViT-S-32") == 2
    assert "needs --pretrained" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
