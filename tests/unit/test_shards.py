"""pipeline.inputs: deterministic listing and raw record reading for folder, webdataset and Parquet inputs."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs.base import Shard
from pipeline.inputs.registry import detect_format, list_shards, read_shard

# ---------------------------------------------------------------- folder


def test_folder_shards_are_sorted_chunked_and_labelled(tiny_images):
    root, written = tiny_images
    shards = list_shards(root, shard_size=4)
    assert [s.shard_id for s in shards] == [0, 1]
    assert [len(s.members) for s in shards] == [4, 2]
    assert all(s.kind == "folder" for s in shards)
    members = [m for s in shards for m in s.members]
    assert members == sorted(f"{root}/{rel}" for rel in written)
    assert list_shards(root, shard_size=4) == shards  # same input -> same shards
    records = [r for s in shards for r in read_shard(s)]
    assert [r.image_id for r in records] == sorted(written)
    assert [r.label for r in records] == [rel.split("/")[0] for rel in sorted(written)]
    assert all(r.error is None and r.data[:8] == b"\x89PNG\r\n\x1a\n" for r in records)


def test_folder_shard_size_one_and_large(tiny_images):
    root, written = tiny_images
    assert len(list_shards(root, shard_size=1)) == len(written)
    assert len(list_shards(root, shard_size=1000)) == 1


def test_folder_files_at_top_level_have_no_label_and_non_images_are_skipped(tmp_path):
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "a.jpg").write_bytes(b"1")
    (tmp_path / "top.png").write_bytes(b"2")
    (tmp_path / "notes.txt").write_bytes(b"3")
    (tmp_path / "dog" / ".b.jpg").write_bytes(b"4")
    (shard,) = list_shards(str(tmp_path), input_format="folder")
    recs = list(read_shard(shard))
    assert [(r.image_id, r.label, r.data) for r in recs] == [("dog/a.jpg", "dog", b"1"), ("top.png", None, b"2")]


def test_shard_json_round_trip(tiny_images):
    root, _ = tiny_images
    shard = list_shards(root, shard_size=3)[1]
    again = Shard.from_json(shard.to_json())
    assert again == shard and isinstance(again.members, tuple)


def test_folder_member_that_vanished_gives_read_error(tiny_images):
    import os

    root, written = tiny_images
    (shard,) = list_shards(root, shard_size=100)
    first = sorted(written)[0]
    os.remove(f"{root}/{first}")
    recs = list(read_shard(shard))
    assert len(recs) == len(written)
    assert recs[0].image_id == first and recs[0].data is None and recs[0].error.startswith("read failed")
    assert all(r.error is None for r in recs[1:])


# ---------------------------------------------------------------- webdataset


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


IMG_C = bytes(range(256)) * 20  # 5120 bytes: large enough to cut in the middle


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "k1.jpg", b"JPEG-1")
        _add(tf, "k1.json", json.dumps({"label": "cat", "caption": "ignored: .txt wins"}).encode())
        _add(tf, "k1.txt", b"a cat on a mat\n")
        _add(tf, "k2.json", json.dumps({"label": "dog"}).encode())  # no image member
        _add(tf, "k3.png", b"PNG-3")
        _add(tf, "k3.cls", b"7")
        _add(tf, "k4.jpg", IMG_C)
        _add(tf, "k4.json", json.dumps({"class": "cow"}).encode())
    return buf.getvalue()


def test_webdataset_records_labels_captions_and_missing_image(tmp_path):
    (tmp_path / "part-00000.tar").write_bytes(_tar_bytes())
    assert detect_format(str(tmp_path)) == "webdataset"
    (shard,) = list_shards(str(tmp_path))
    assert shard.kind == "tar" and shard.source.endswith("part-00000.tar")
    recs = {r.image_id: r for r in read_shard(shard)}
    assert list(recs) == ["part-00000/k1", "part-00000/k2", "part-00000/k3", "part-00000/k4"]
    k1, k2, k3, k4 = recs.values()
    assert (k1.data, k1.label, k1.caption, k1.error) == (b"JPEG-1", "cat", "a cat on a mat", None)
    assert k1.uri.endswith("part-00000.tar::k1.jpg")
    assert k2.data is None and k2.label == "dog" and "no image member" in k2.error
    assert (k3.data, k3.label) == (b"PNG-3", "7")
    assert (k4.data, k4.label) == (IMG_C, "cow")


def test_webdataset_tars_are_one_shard_each_in_sorted_order(tmp_path):
    for name in ("b.tar", "a.tar", "c.tar"):
        (tmp_path / name).write_bytes(_tar_bytes())
    shards = list_shards(str(tmp_path))
    assert [s.source.rsplit("/", 1)[-1] for s in shards] == ["a.tar", "b.tar", "c.tar"]
    assert [s.shard_id for s in shards] == [0, 1, 2]


def test_truncated_tar_in_member_data_keeps_earlier_members_and_reports(tmp_path):
    data = _tar_bytes()
    cut = data.index(IMG_C) + len(IMG_C) // 2  # in the middle of k4.jpg's bytes
    (tmp_path / "broken.tar").write_bytes(data[:cut])
    recs = list(read_shard(Shard(0, "tar", str(tmp_path / "broken.tar"))))
    by_id = {r.image_id: r for r in recs}
    assert by_id["broken/k1"].data == b"JPEG-1" and by_id["broken/k1"].error is None
    assert by_id["broken/k3"].data == b"PNG-3" and by_id["broken/k3"].error is None
    assert by_id["broken/k4"].data is None and "k4.jpg" in by_id["broken/k4"].error
    tar_err = by_id["broken/<tar>"]
    assert tar_err.data is None and "unreadable tar" in tar_err.error


def test_truncated_tar_in_member_header_is_reported(tmp_path):
    data = _tar_bytes()
    header = data.index(IMG_C) - 512  # the header block of k4.jpg
    (tmp_path / "broken.tar").write_bytes(data[: header + 200])
    recs = list(read_shard(Shard(0, "tar", str(tmp_path / "broken.tar"))))
    assert {r.image_id for r in recs if r.error is None} == {"broken/k1", "broken/k3"}
    assert any(r.error and ("k4" in r.image_id or "<tar>" in r.image_id) for r in recs)


def test_tar_samples_stream_before_the_rest_of_the_tar_is_read(tmp_path, monkeypatch):
    """A sample is handed on once the next key starts: the reader holds one sample, not the tar."""
    from pipeline.inputs import webdataset

    (tmp_path / "s.tar").write_bytes(_tar_bytes())
    reads = []
    real = webdataset.tarfile.TarFile.extractfile
    monkeypatch.setattr(webdataset.tarfile.TarFile, "extractfile",
                        lambda self, m: (reads.append(m.name), real(self, m))[1])
    it = read_shard(Shard(0, "tar", str(tmp_path / "s.tar")))
    first = next(it)
    assert first.image_id == "s/k1" and reads == ["k1.jpg", "k1.json", "k1.txt"]  # k2 not read yet
    assert [r.image_id for r in it] == ["s/k2", "s/k3", "s/k4"]


def test_a_key_split_by_other_keys_is_an_error_row_not_merged(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "a.jpg", b"A")
        _add(tf, "b.jpg", b"B")
        _add(tf, "a.txt", b"late caption of a")  # not consecutive with a.jpg
        _add(tf, "c.jpg", b"C")
    (tmp_path / "t.tar").write_bytes(buf.getvalue())
    recs = list(read_shard(Shard(0, "tar", str(tmp_path / "t.tar"))))
    assert [r.image_id for r in recs] == ["t/a", "t/b", "t/a#2", "t/c"]
    assert recs[0].data == b"A" and recs[0].caption is None and recs[3].data == b"C"
    assert recs[2].data is None and "appears again after other keys" in recs[2].error


def test_gzipped_tar_reads_the_same(tmp_path):
    import gzip

    (tmp_path / "z.tar").write_bytes(gzip.compress(_tar_bytes()))
    recs = list(read_shard(Shard(0, "tar", str(tmp_path / "z.tar"))))
    assert [r.data for r in recs if r.error is None] == [b"JPEG-1", b"PNG-3", IMG_C]


# ---------------------------------------------------------------- parquet


def test_parquet_row_groups_are_shards_with_stem_row_ids(tmp_path):
    table = pa.table({"image": [f"img{i}".encode() for i in range(5)], "label": ["a", "b", None, "a", "c"]})
    pq.write_table(table, tmp_path / "part1.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 1), tmp_path / "part2.parquet")
    assert detect_format(str(tmp_path)) == "parquet"
    shards = list_shards(str(tmp_path))
    assert [(s.source.rsplit("/", 1)[-1], s.row_group, s.shard_id) for s in shards] == [
        ("part1.parquet", 0, 0), ("part1.parquet", 1, 1), ("part1.parquet", 2, 2), ("part2.parquet", 0, 3)]
    recs = [r for s in shards for r in read_shard(s)]
    assert [r.image_id for r in recs] == ["part1/0", "part1/1", "part1/2", "part1/3", "part1/4", "part2/0"]
    assert [r.data for r in recs] == [b"img0", b"img1", b"img2", b"img3", b"img4", b"img0"]
    assert [r.label for r in recs] == ["a", "b", None, "a", "c", "a"]
    assert recs[3].uri.endswith("part1.parquet::row=3")


def test_parquet_ids_uri_null_and_hf_struct_images(tmp_path):
    table = pa.table({
        "img": [{"bytes": b"B0", "path": "x.jpg"}, None, {"bytes": b"B2", "path": None}],
        "key": ["id0", "id1", None],
        "url": ["http://x/0.jpg", "", "http://x/2.jpg"],
        "cls": [1, 2, 3],
    })
    pq.write_table(table, tmp_path / "hf.parquet")
    (shard,) = list_shards(str(tmp_path), image_column="img")
    recs = list(read_shard(shard, image_column="img", label_column="cls"))
    assert [r.image_id for r in recs] == ["hf/id0", "hf/id1", "hf/2"]  # keys are prefixed like tar keys
    assert [r.data for r in recs] == [b"B0", None, b"B2"]
    assert [r.label for r in recs] == ["1", "2", "3"]
    assert recs[0].uri == "http://x/0.jpg" and recs[1].uri.endswith("hf.parquet::row=1")
    assert "null image" in recs[1].error


def test_parquet_non_bytes_image_column_is_an_error_record(tmp_path):
    """Listing refuses such a file (tests/unit/test_hostile_inputs.py); a shard read anyway still copes."""
    pq.write_table(pa.table({"image": ["not bytes"]}), tmp_path / "s.parquet")
    (rec,) = list(read_shard(Shard(0, "parquet", str(tmp_path / "s.parquet"))))
    assert rec.data is None and "holds str, not bytes" in rec.error


def test_parquet_without_image_column_names_file_and_columns(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "label": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError) as err:
        list_shards(str(tmp_path))
    msg = str(err.value)
    assert "bad.parquet" in msg and "image, jpg" in msg and "pixels, label" in msg


def test_unreadable_parquet_is_a_value_error(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet file"):
        list_shards(str(tmp_path))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fmt", ["auto", "folder", "webdataset", "parquet"])
def test_missing_input_is_file_not_found(tmp_path, fmt):
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "does-not-exist"), input_format=fmt)


def test_input_without_usable_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        list_shards(str(tmp_path))
    with pytest.raises(ValueError, match="no image files"):
        list_shards(str(tmp_path), input_format="folder")
    with pytest.raises(ValueError, match="unknown input format"):
        list_shards(str(tmp_path), input_format="zip")


# ---------------------------------------------------------------- img2dataset 'files' layout edge cases


def _i2d_files(root, shard="000", n=2, sidecar=True):
    d = root / shard
    d.mkdir(parents=True)
    for i in range(n):
        key = f"{shard}{i:04d}"
        (d / f"{key}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes([i]))
        (d / f"{key}.txt").write_text(f"caption {i}")
        (d / f"{key}.json").write_text(json.dumps({"url": f"http://x/{key}", "key": key, "status": "success"}))
    if sidecar:
        pq.write_table(pa.table({"url": ["http://x/bad"], "key": [f"{shard}9999"], "status": ["failed_to_download"],
                                 "error_message": ["HTTP Error 404"]}), root / f"{shard}.parquet")


def test_files_layout_with_short_shard_names_is_not_a_labelled_folder(tmp_path):
    _i2d_files(tmp_path, "000")  # img2dataset --oom_shard_count 3
    assert detect_format(str(tmp_path)) == "files"
    recs = [r for s in list_shards(str(tmp_path)) for r in read_shard(s)]
    assert [(r.image_id, r.label, r.caption) for r in recs if not r.error] == [
        ("000/0000000", None, "caption 0"), ("000/0000001", None, "caption 1")]
    assert [r.error for r in recs if r.error] == ["img2dataset failed_to_download: HTTP Error 404"]


def test_a_sidecar_cut_short_is_one_named_error_and_the_images_stay(tmp_path):
    _i2d_files(tmp_path, "00000")
    (tmp_path / "00000.parquet").write_bytes(b"PAR1 cut short")
    recs = [r for s in list_shards(str(tmp_path), input_format="files") for r in read_shard(s)]
    assert sum(r.data is not None for r in recs) == 2
    (bad,) = [r for r in recs if r.error]
    assert "00000.parquet" in bad.error and "unreadable img2dataset sidecar" in bad.error


def test_two_img2dataset_runs_with_the_same_shard_names_are_refused(tmp_path):
    _i2d_files(tmp_path / "run1", "00000")
    _i2d_files(tmp_path / "run2", "00000")
    with pytest.raises(ValueError, match="same name '00000'"):
        list_shards(str(tmp_path), input_format="files")


# ---------------------------------------------------------------- the registry


def _one_of_each(root) -> dict[str, str]:
    """{input_format: a tiny input of that layout}."""
    (root / "folder" / "dog").mkdir(parents=True)
    (root / "folder" / "dog" / "a.jpg").write_bytes(b"1")
    _i2d_files(root / "files", "00000")
    (root / "wds").mkdir()
    (root / "wds" / "part-0.tar").write_bytes(_tar_bytes())
    (root / "pq").mkdir()
    pq.write_table(pa.table({"image": [b"x", b"y"]}), root / "pq" / "p.parquet")
    return {"folder": str(root / "folder"), "files": str(root / "files"), "webdataset": str(root / "wds"),
            "parquet": str(root / "pq")}


def test_the_registry_dispatches_each_layout_through_its_module(tmp_path, monkeypatch):
    """Detection, listing and reading of each layout go through that layout's module, and no other."""
    from pipeline.inputs import folder, img2dataset, parquet, registry, webdataset

    modules = {"folder": folder, "files": img2dataset, "webdataset": webdataset, "parquet": parquet}
    assert sorted(m.name for m in registry.LAYOUTS) == sorted(modules)
    assert len({m.kind for m in registry.LAYOUTS}) == len(registry.LAYOUTS)
    calls: list[tuple[str, str]] = []

    def spy(fmt, fn, real):
        return lambda *a, **k: (calls.append((fmt, fn)), real(*a, **k))[1]

    for fmt, mod in modules.items():
        for fn in ("list_shards", "read"):
            monkeypatch.setattr(mod, fn, spy(fmt, fn, getattr(mod, fn)))
    for fmt, uri in _one_of_each(tmp_path).items():
        calls.clear()
        assert registry.detect_format(uri) == fmt
        shards = registry.list_shards(uri)
        assert shards and {s.kind for s in shards} == {modules[fmt].kind}
        assert registry.layout(kind=shards[0].kind) is modules[fmt]
        records = [r for s in shards for r in registry.read_shard(s)]
        assert any(r.data is not None for r in records)
        assert set(calls) == {(fmt, "list_shards"), (fmt, "read")}, fmt
