"""A hostile-input corpus, generated here, driven through the job code without Ray.

Item-level problems (broken images, bad tar members, shards that vanish or cannot be read) must
become rows of the errors table with a reason while the rest of the shard goes on; config-level
problems (wrong Parquet schema, bad class tables, features of the wrong dimension, unsafe weights)
must stop the job at once with a message naming the file/row/field, and write nothing.
Single-image decoding details are in test_images.py; this file checks whole shards and jobs.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import resource
import struct
import tarfile
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.semantics.classset import add_classes, write_class_set
from pipeline.stages.classes import run_classes
from pipeline.core.config import IndexConfig, LabelConfig, build_config
from pipeline.core.features import write_features
from pipeline.stages.extract import check_checkpoint
from pipeline.zsl.models import load_model
from pipeline.cluster.extraction import decode_shard
from pipeline.core.schema import features_schema
from pipeline.semantics.classset import load_class_set
from pipeline.semantics.class_table import read_class_table
from pipeline.inputs.base import Shard
from pipeline.inputs.registry import list_shards, read_shard

SIZE = 16
KW = {"image_size": SIZE, "max_pixels": 89_478_485, "read": {"image_column": "image", "label_column": "label"}}


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _decode(*shards: Shard) -> dict:
    return decode_shard({"shard": np.array([s.to_json() for s in shards], dtype=object)}, **KW)


def _rows(out: dict) -> dict[str, dict]:
    keys = [k for k in out if k != "pixels"]
    return {str(out["image_id"][i]): {**{k: out[k][i] for k in keys}, "pixels": out["pixels"][i]}
            for i in range(len(out["image_id"]))}


def _png_claiming(width: int, height: int) -> bytes:
    data = bytearray(_enc(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_enc(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _rotated_jpeg() -> bytes:
    a = np.zeros((20, 40, 3), np.uint8)
    a[:10], a[10:] = (255, 0, 0), (0, 0, 255)  # red top, blue bottom; EXIF says "rotate 90 clockwise"
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    return _enc(im, "JPEG", exif=exif.tobytes(), quality=95)


def _palette_png() -> bytes:
    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.paste(1, (8, 0, 16, 16))
    return _enc(p, "PNG", transparency=0)


def _gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    return _enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def hostile_corpus(root) -> dict[str, tuple]:
    """Write the corpus under ``root/<label>/``; return ``{image_id: expectation}``.

    An expectation is ``("ok", check(pixels, width, height))`` or ``("error", stage, reason regex)``.
    """
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = _enc(noise, "JPEG")
    a16 = np.zeros((16, 16), np.uint16)
    a16[:, 8:] = 60000
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = (0, 0, 255, 255)  # left half fully transparent -> white
    files = {
        "bad/zero-bytes.jpg": (b"", ("error", "decode", r"^empty file \(0 bytes\)$")),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], ("error", "decode", r"^broken image")),
        "bad/text-as-image.png": (b"<html>not an image</html>" * 20, ("error", "decode", r"^not an image")),
        "bad/bomb-50000x50000.png": (_png_claiming(50_000, 50_000),
                                     ("error", "decode", r"^decompression bomb: .*2500000000 pixels")),
        "bad/bomb-50000x50000.jpg": (_jpeg_claiming(50_000, 50_000),
                                     ("error", "decode", r"^decompression bomb: .*2500000000 pixels")),
        "ok/png-named.jpg": (_enc(Image.new("RGB", (8, 8), (0, 255, 0)), "PNG"),
                             ("ok", lambda px, w, h: (px == [0, 255, 0]).all())),
        "ok/cmyk.jpg": (_enc(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
                        ("ok", lambda px, w, h: np.abs(px.astype(int) - [255, 0, 0]).max() <= 3)),
        "ok/16bit.png": (_enc(Image.fromarray(a16), "PNG"),
                         ("ok", lambda px, w, h: (px[:, :8] == 0).all() and (px[:, 8:] == 255).all())),
        "ok/palette-alpha.png": (_palette_png(),
                                 ("ok", lambda px, w, h: (px[:, :8] == 255).all()
                                  and (px[:, 8:] == [200, 100, 50]).all())),
        "ok/rgba.png": (_enc(Image.fromarray(rgba, "RGBA"), "PNG"),
                        ("ok", lambda px, w, h: (px[:, :8] == 255).all() and (px[:, 8:] == [0, 0, 255]).all())),
        # turned clockwise: 20 wide x 40 high, the red top ends up on the right
        "ok/exif-rotated.jpg": (_rotated_jpeg(),
                                ("ok", lambda px, w, h: (w, h) == (20, 40) and px[:, 12:, 0].min() > 200
                                 and px[:, :4, 2].min() > 200)),
        "ok/animated.gif": (_gif(), ("ok", lambda px, w, h: (px == [255, 0, 0]).all())),
        "ok/plain.png": (_enc(Image.new("L", (30, 20), 77), "PNG"), ("ok", lambda px, w, h: (px == 77).all())),
    }
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {rel: exp for rel, (_, exp) in files.items()}


def test_hostile_image_folder_every_item_is_decoded_or_an_error_row(tmp_path, monkeypatch):
    root = tmp_path / "in"
    expected = hostile_corpus(root)
    (root / "bad" / "vanished.png").write_bytes(b"x")
    (root / "bad" / "denied.png").write_bytes(_enc(Image.new("RGB", (4, 4)), "PNG"))
    (shard,) = list_shards(str(root), shard_size=100)  # listed while all files exist ...
    os.remove(root / "bad" / "vanished.png")  # ... then one is deleted, one becomes unreadable
    real_read = zio.read_bytes

    def read_bytes(uri):
        if uri.endswith("denied.png"):
            raise PermissionError(13, "Permission denied", uri)
        return real_read(uri)

    monkeypatch.setattr(zio, "read_bytes", read_bytes)
    expected["bad/vanished.png"] = ("error", "read", r"^read failed: .*No such file")
    expected["bad/denied.png"] = ("error", "read", r"^read failed: .*Permission denied")

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = _decode(shard)
    assert time.perf_counter() - t0 < 10
    # a 50000x50000 RGB buffer would be 7.5 GB: the peak RSS did not move by anything like it
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300_000  # KiB

    rows = _rows(out)
    assert sorted(rows) == sorted(expected)  # every item is there exactly once: the job went on
    assert set(out["shard_n"].tolist()) == {len(expected)}
    for image_id, exp in expected.items():
        r = rows[image_id]
        if exp[0] == "ok":
            assert r["error"] == "" and r["stage"] == "", (image_id, r["error"])
            assert exp[1](r["pixels"], int(r["width"]), int(r["height"])), image_id
        else:
            _, stage, pattern = exp
            assert r["stage"] == stage and re.search(pattern, r["error"]), (image_id, r["error"])
            assert (r["pixels"] == 0).all() and r["width"] == 0


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _wds_tar(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries:
            _add(tf, name, data)
    return buf.getvalue()


def test_hostile_webdataset_tars(tmp_path):
    good = _enc(Image.new("RGB", (8, 8), (0, 0, 255)), "PNG")
    big = _enc(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    d = tmp_path / "wds"
    d.mkdir()
    # a: a member holding garbage bytes under an image name, and a key with only a label
    (d / "a.tar").write_bytes(_wds_tar([("k1.png", good), ("k1.cls", b"blue"), ("k2.jpg", b"\xff\xd8garbage"),
                                        ("k3.json", b'{"label": "x"}')]))
    # b: cut in the middle of its second member's data
    full = _wds_tar([("k1.png", good), ("k2.png", big)])
    (d / "b.tar").write_bytes(full[: full.index(big) + len(big) // 2])
    # c: gzip-compressed, with bytes flipped inside the compressed stream
    z = bytearray(gzip.compress(_wds_tar([("k1.png", big), ("k2.png", big)])))
    z[len(z) // 2 : len(z) // 2 + 64] = b"\x00" * 64
    (d / "c.tar").write_bytes(bytes(z))
    (d / "d.tar").write_bytes(_wds_tar([("k1.png", good)]))
    shards = list_shards(str(d))
    assert [s.source.rsplit("/", 1)[-1] for s in shards] == ["a.tar", "b.tar", "c.tar", "d.tar"]
    os.remove(d / "d.tar")  # listed, then gone
    rows = _rows(_decode(*shards))
    assert rows["a/k1"]["error"] == "" and rows["a/k1"]["label"] == "blue"
    assert (rows["a/k1"]["pixels"] == [0, 0, 255]).all()
    assert rows["a/k2"]["stage"] == "decode" and rows["a/k2"]["error"].startswith("not an image")
    assert rows["a/k3"]["stage"] == "read" and "no image member" in rows["a/k3"]["error"]
    assert rows["b/k1"]["error"] == ""  # members before the break are kept
    assert rows["b/k2"]["stage"] == "read" and "k2.png" in rows["b/k2"]["error"]
    assert "unreadable tar" in rows["b/<tar>"]["error"]
    assert rows["c/<tar>"]["stage"] == "read" and "unreadable tar" in rows["c/<tar>"]["error"]
    assert rows["d/<tar>"]["stage"] == "read" and "No such file" in rows["d/<tar>"]["error"]
    ids = list(_decode(*shards)["image_id"])
    assert len(ids) == len(set(ids))  # one row per item, no duplicates


def test_missing_and_corrupted_parquet_shards_become_one_error_row_each(tmp_path):
    img = _enc(Image.new("RGB", (8, 8), (5, 6, 7)), "PNG")
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"image": [img] * 4, "label": ["a"] * 4}), d / "p.parquet", row_group_size=2)
    pq.write_table(pa.table({"image": [img]}), d / "q.parquet")
    shards = list_shards(str(d))
    assert len(shards) == 3
    os.remove(d / "q.parquet")
    blob = bytearray((d / "p.parquet").read_bytes())
    blob[4:200] = os.urandom(196)  # the first row group's pages: garbage
    (d / "p.parquet").write_bytes(bytes(blob))
    out = _decode(*shards)
    assert out["image_id"].tolist() == ["p/<shard-000000>", "p/2", "p/3", "q/<shard-000002>"]
    assert out["stage"].tolist() == ["read", "", "", "read"]
    assert out["error"][0].startswith("unreadable shard") and "No such file" in out["error"][3]


@pytest.mark.parametrize("table, needle", [
    (pa.table({"pixels": [b"x"], "label": ["a"]}), "no image column among image, jpg, jpeg, png, webp (columns: pixels, label)"),
    (pa.table({"image": ["not bytes"]}), "column 'image' is string, expected image bytes"),
    (pa.table({"image": [1, 2]}), "column 'image' is int64, expected image bytes"),
    (pa.table({"image": [{"path": "x.jpg", "size": 3}]}), "column 'image' is struct<path: string, size: int64>"),
])
def test_parquet_input_with_the_wrong_schema_stops_the_job_and_writes_nothing(tmp_path, capsys, table, needle):
    from jobs.cli import main

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"image": [b"fine"]}), d / "a-good.parquet")
    pq.write_table(table, d / "b-bad.parquet")
    assert main(["extract", "--input", str(d), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b-bad.parquet" in err[0] and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_hugging_face_image_structs_are_accepted(tmp_path):
    img = _enc(Image.new("RGB", (8, 8)), "PNG")
    pq.write_table(pa.table({"image": [{"bytes": img, "path": "x.png"}]}), tmp_path / "hf.parquet")
    (shard,) = list_shards(str(tmp_path))
    assert [r.data for r in read_shard(shard)] == [img]


# ---------------------------------------------------------------- class tables


class FakeText:
    dim, model_id = 8, "fake-text"

    def encode(self, texts) -> np.ndarray:
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(8) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("name, text, needle", [
    ("dup.csv", "name,a\nzebra,1\nokapi,2\nzebra,3\n", "duplicate class names: zebra"),
    ("dup.yaml", "- {name: zebra}\n- {name: zebra}\n", "duplicate class names: zebra"),
    ("nan.csv", "name,big,furry\nzebra,1,nan\nokapi,0,1\n", "class 'zebra', attribute 'furry': missing value"),
    ("empty-cell.csv", "name,big,furry\nzebra,1,\nokapi,0,1\n", "class 'zebra', attribute 'furry': missing value"),
    ("missing-key.yaml", "- {name: zebra, attributes: {big: 1, furry: 0}}\n- {name: okapi, attributes: {big: 1}}\n",
     "class 'okapi', attribute 'furry': missing value"),
    ("too-many.csv", "name,big,furry\nzebra,1,0,1\nokapi,0,1,1\n", "row 1 ('zebra') has 4 fields, the header has 3"),
    ("too-few.csv", "name,big,furry\nzebra,1,0\nokapi,0\n", "row 2 ('okapi') has 2 fields, the header has 3"),
    ("inf.csv", "name,big\nzebra,inf\nokapi,1\n", "row 1 ('zebra'), attribute 'big': infinite value"),
    ("text.csv", "name,big\nzebra,1\nokapi,lots\n", "row 2 ('okapi'), attribute 'big': not a number ('lots')"),
])
def test_bad_class_tables_stop_zsl_classes_and_write_nothing(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    out = tmp_path / "classes-out"
    cfg = build_config("classes", {"input": str(tmp_path / name), "output": str(out), "word_vectors": False})
    with pytest.raises(ValueError) as err:
        run_classes(cfg, text_encoder=FakeText())
    assert needle in str(err.value) and name in str(err.value)
    assert not out.exists()


def _class_set_with_attributes(tmp_path) -> str:
    src = tmp_path / "base.csv"
    src.write_text("name,description,stripes,big,furry\nzebra,striped horse,1,1,0\nokapi,,0,1,1\n")
    out = str(tmp_path / "set")
    run_classes(build_config("classes", {"input": str(src), "output": out, "word_vectors": False}),
                text_encoder=FakeText())
    return out


@pytest.mark.parametrize("header, row", [
    ("name,stripes,big", "cat,0,0"),  # one attribute fewer
    ("name,stripes,big,furry,wings", "cat,0,0,1,0"),  # one more
])
def test_add_classes_with_another_attribute_count_is_refused_and_changes_nothing(tmp_path, header, row):
    out = _class_set_with_attributes(tmp_path)
    before = (tmp_path / "set" / "classes.parquet").read_bytes()
    (tmp_path / "new.csv").write_text(f"{header}\n{row}\n")
    with pytest.raises(ValueError, match="attribute columns differ"):
        add_classes(out, str(tmp_path / "new.csv"), text_encoder=FakeText())
    assert (tmp_path / "set" / "classes.parquet").read_bytes() == before


def test_add_classes_check_runs_before_anything_is_written(tmp_path):
    out = _class_set_with_attributes(tmp_path)
    before = sorted(os.listdir(tmp_path / "set")), (tmp_path / "set" / "classes.parquet").read_bytes()
    (tmp_path / "new.csv").write_text("name,stripes,big,furry\ncat,0,0,1\n")

    def refuse(enlarged):
        assert enlarged.names == ["zebra", "okapi", "cat"]
        raise ValueError("model cannot score it")

    with pytest.raises(ValueError, match="model cannot score it"):
        add_classes(out, str(tmp_path / "new.csv"), text_encoder=FakeText(), check=refuse)
    assert (sorted(os.listdir(tmp_path / "set")), (tmp_path / "set" / "classes.parquet").read_bytes()) == before


def test_class_set_with_an_inconsistent_manifest_is_refused(tmp_path):
    out = _class_set_with_attributes(tmp_path)
    t = pq.read_table(os.path.join(out, "classes.parquet"))
    pq.write_table(t.replace_schema_metadata(None).slice(0, 1), os.path.join(out, "classes.parquet"))
    with pytest.raises(ValueError, match="classes.parquet has 1 classes, manifest.json 2"):
        load_class_set(out)


# ---------------------------------------------------------------- features of the wrong dimension


def _foreign_shard(features_dir: str, name: str, dim: int, n: int = 3) -> None:
    X = np.ones((n, dim), np.float32)
    table = pa.table({
        "image_id": [f"x{i}" for i in range(n)], "uri": ["u"] * n, "label": [None] * n, "caption": [None] * n,
        "width": [1] * n, "height": [1] * n, "url": [None] * n, "key": [None] * n, "meta": [None] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), dim),
    }, schema=features_schema(dim))
    zpq.write_parquet_atomic(zio.join(features_dir, "features", name), table)


def test_label_and_index_leave_out_a_shard_of_another_dimension(small_world, tmp_path):
    from pipeline.stages.label import run_label
    from pipeline.stages.index import run_index

    w = small_world(n_images=24, shard_size=8)
    _foreign_shard(w["features"], "shard-000001.parquet", dim=5)  # 5-d in a 6-d feature directory
    why = "embeddings are fixed_size_list<element: float>[5], the manifest and model expect fixed_size_list<float>[6]"
    lcfg = LabelConfig(model=w["model"], features=w["features"], classes=w["classes"], output=str(tmp_path / "l"))
    lm = run_label(lcfg, progress=False)  # labelling goes on without it, and names it
    assert lm.failed_shards == {"shard-000001.parquet": why} and lm.n_images == 16
    assert sorted(os.listdir(tmp_path / "l" / "labels")) == ["shard-000000.parquet", "shard-000002.parquet"]
    # indexing goes on without it: the other shards are indexed, this one is named in the manifest
    icfg = IndexConfig(features=w["features"], model=w["model"], output=str(tmp_path / "i"), index_factory="Flat",
                       use_gpu="no")
    m = run_index(icfg, progress=False)
    assert m.failed_shards == {"shard-000001.parquet": "embeddings are fixed_size_list<element: float>[5], the "
                                                       "manifest and model expect fixed_size_list<float>[6]"}
    assert m.shards == ["shard-000000.parquet", "shard-000002.parquet"] and m.ntotal == 16


def test_label_refuses_a_model_of_another_feature_dimension(small_world, tmp_path):
    from pipeline.stages.label import run_label

    w = small_world()
    other = tmp_path / "f8"
    write_features(str(other), image_ids=["a"], uris=["u"], labels=[None], X=np.ones((1, 8)), model_id="fake-feat")
    cfg = LabelConfig(model=w["model"], features=str(other), classes=w["classes"], output=str(tmp_path / "l"))
    with pytest.raises(ValueError, match="model expects 6-d features, got 8-d"):
        run_label(cfg, progress=False)
    assert not (tmp_path / "l").exists()


def test_label_refuses_classes_of_another_semantic_space(small_world, tmp_path):
    from pipeline.stages.label import run_label

    w = small_world()
    t5 = np.eye(4, 5, dtype=np.float32)
    write_class_set(str(tmp_path / "c5"), ["cat", "dog", "okapi", "zebra"], [None] * 4, t5, None,
                    {"text_model": "fake-text"})
    cfg = LabelConfig(model=w["model"], features=w["features"], classes=str(tmp_path / "c5"),
                      output=str(tmp_path / "l"))
    with pytest.raises(ValueError, match="class semantics are 5-d, the model expects 4-d"):
        run_label(cfg, progress=False)
    write_class_set(str(tmp_path / "c4"), ["cat", "dog", "okapi", "zebra"], [None] * 4, np.eye(4, dtype=np.float32),
                    None, {"text_model": "another-text-model"})
    cfg = LabelConfig(model=w["model"], features=w["features"], classes=str(tmp_path / "c4"),
                      output=str(tmp_path / "l"))
    with pytest.raises(ValueError, match="embedded with 'another-text-model'"):
        run_label(cfg, progress=False)
    assert not (tmp_path / "l").exists()


# ---------------------------------------------------------------- no pickle from user files


class _Evil:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_model_weights_that_are_a_pickle_are_refused_unexecuted(small_world, tmp_path):
    w = small_world()
    marker = tmp_path / "pwned"
    (tmp_path / "world" / "model" / "weights.safetensors").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(Exception) as err:  # noqa: PT011 - safetensors' own error type
        load_model(w["model"])
    assert "safetensor" in type(err.value).__name__.lower() or "header" in str(err.value).lower()
    assert not marker.exists()


def test_pickled_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(str(marker))}, evil)
    with pytest.raises(ValueError, match=r"evil.pt cannot be loaded as plain weights.*never unpickled"):
        check_checkpoint(str(evil))
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    check_checkpoint(str(good))  # plain tensors load fine

    from jobs.cli import main

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_enc(Image.new("RGB", (4, 4)), "PNG"))
    rc = main(["extract", "--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"),
               "--encoder", "open_clip:ViT-S-32", "--pretrained", str(evil)])
    assert rc == 2 and "cannot be loaded as plain weights" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_npy_reader_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([_Evil(str(marker))], dtype=object), allow_pickle=True)
    (tmp_path / "v.npy").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="v.npy: not a readable .npy array"):
        zio.read_npy(str(tmp_path / "v.npy"))
    assert not marker.exists()
    with pytest.raises(TypeError, match="object array"):
        zio.write_npy_atomic(str(tmp_path / "w.npy"), np.array([{}], dtype=object))


def test_class_table_readers_do_not_unpickle(tmp_path):
    """YAML is read with safe_load: a python/object tag is an error, not code."""
    marker = tmp_path / "pwned"
    (tmp_path / "c.yaml").write_text(f"- !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="cannot read class table"):
        read_class_table(str(tmp_path / "c.yaml"))
    assert not marker.exists()


@pytest.mark.parametrize("ext", ["tar", "parquet"])
def test_two_input_files_with_one_name_are_refused_as_their_ids_would_collide(tmp_path, ext):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        if ext == "tar":
            (tmp_path / sub / "part-0.tar").write_bytes(_wds_tar([("k1.png", b"x")]))
        else:
            pq.write_table(pa.table({"image": [b"x"]}), tmp_path / sub / "part-0.parquet")
    with pytest.raises(ValueError, match=rf"a/part-0.{ext} and .*b/part-0.{ext} have the same name 'part-0'"):
        list_shards(str(tmp_path))
