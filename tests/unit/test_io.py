"""pipeline.core.fs: atomic writes leave no temp files and never a partial file; listing; memory:// URIs."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq


def _leftovers(root) -> list[str]:
    return [f for _, _, files in os.walk(root) for f in files if f.startswith(zio.TMP_PREFIX)]


@pytest.fixture
def mem_root():
    """A fresh directory on fsspec's in-process memory filesystem, removed afterwards."""
    root = f"memory://zsl-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs, path = zio.filesystem(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_join_strips_slashes():
    assert zio.join("s3://b/", "/a/", "c.parquet") == "s3://b/a/c.parquet"
    assert zio.join("/x", "y") == "/x/y"


def test_write_parquet_atomic_round_trip_and_no_temp_files(tmp_path):
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", None]})
    uri = str(tmp_path / "deep" / "dir" / "t.parquet")  # parents are created
    zpq.write_parquet_atomic(uri, table)
    assert pq.read_table(uri).equals(table)
    assert _leftovers(tmp_path) == []
    assert os.listdir(tmp_path / "deep" / "dir") == ["t.parquet"]


def test_write_json_atomic_round_trip_and_no_temp_files(tmp_path):
    uri = str(tmp_path / "m.json")
    obj = {"b": [1, 2.5, None], "a": "é"}
    zio.write_json_atomic(uri, obj)
    zio.write_json_atomic(uri, {**obj, "c": 1})  # overwrite in place
    assert zio.read_json(uri) == {**obj, "c": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_read_json_invalid_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        zio.read_json(str(p))


def test_failing_write_keeps_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    uri = str(tmp_path / "m.json")
    zio.write_json_atomic(uri, {"version": 1})
    before = (tmp_path / "m.json").read_bytes()

    def boom(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(LocalFileOpener, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        zio.write_json_atomic(uri, {"version": 2})
    with pytest.raises(OSError, match="disk full"):
        zpq.write_parquet_atomic(str(tmp_path / "new.parquet"), pa.table({"a": [1]}))
    monkeypatch.undo()
    assert (tmp_path / "m.json").read_bytes() == before
    assert json.loads(before) == {"version": 1}
    assert sorted(os.listdir(tmp_path)) == ["m.json"]  # neither a temp file nor a partial new.parquet


def test_interrupt_during_write_also_cleans_up(tmp_path, monkeypatch):
    """BaseException (Ctrl-C) during the write must not leave a temp file either."""
    def interrupt(self, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalFileOpener, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        zio.write_bytes_atomic(str(tmp_path / "x.bin"), b"abc")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_list_files_skips_hidden_and_temp_files_and_sorts(tmp_path):
    for rel in ["b/2.png", "a/1.png", "a/.hidden.png", "a/._tmp-1234abcd-3.png", "c.txt", ".DS_Store", "z.PNG"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    root = str(tmp_path)
    assert zio.list_files(root) == [f"{root}/a/1.png", f"{root}/b/2.png", f"{root}/c.txt", f"{root}/z.PNG"]
    assert zio.list_files(root, suffixes=(".png",)) == [f"{root}/a/1.png", f"{root}/b/2.png", f"{root}/z.PNG"]
    assert zio.list_files(root, recursive=False) == [f"{root}/c.txt", f"{root}/z.PNG"]
    assert zio.list_files(f"{root}/c.txt") == [f"{root}/c.txt"]  # a single file lists itself


def test_list_files_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        zio.list_files(str(tmp_path / "nope"))


def test_memory_uri_write_list_read(mem_root):
    zio.write_json_atomic(f"{mem_root}/sub/m.json", {"k": 1})
    zpq.write_parquet_atomic(f"{mem_root}/sub/t.parquet", pa.table({"a": [1.5]}))
    zio.write_bytes_atomic(f"{mem_root}/sub/.hidden", b"h")
    files = zio.list_files(mem_root)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["m.json", "t.parquet"]
    assert all(f.startswith("memory://") for f in files)  # usable URIs, not bare paths
    assert zio.read_json(files[0]) == {"k": 1}
    assert zio.exists(f"{mem_root}/sub/m.json") and not zio.exists(f"{mem_root}/sub/x.json")
    t = zpq.read_parquet_dir(f"{mem_root}/sub")
    assert t.column("a").to_pylist() == [1.5]
    fs = fsspec.filesystem("memory")
    assert not [p for p in fs.find(zio.filesystem(mem_root)[1]) if zio.TMP_PREFIX in p]


def test_read_parquet_dir_concatenates_in_name_order_and_ignores_temp(tmp_path):
    zpq.write_parquet_atomic(str(tmp_path / "b.parquet"), pa.table({"x": [3, 4]}))
    zpq.write_parquet_atomic(str(tmp_path / "a.parquet"), pa.table({"x": [1, 2]}))
    (tmp_path / f"{zio.TMP_PREFIX}zz-c.parquet").write_bytes(b"partial garbage")
    assert zpq.read_parquet_dir(str(tmp_path)).column("x").to_pylist() == [1, 2, 3, 4]


def test_read_parquet_dir_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        zpq.read_parquet_dir(str(tmp_path))


def test_fingerprint_is_order_independent_and_sensitive():
    a = zio.fingerprint({"x": 1, "y": [1, 2]})
    assert a == zio.fingerprint({"y": [1, 2], "x": 1})
    assert a != zio.fingerprint({"x": 1, "y": [2, 1]})
    assert len(a) == 16 and int(a, 16) >= 0
    assert zio.fingerprint(np.float32(1.0)) == zio.fingerprint("1.0")  # default=str
