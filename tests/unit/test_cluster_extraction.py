"""pipeline.cluster.extraction: the decode mapper without Ray, the resource plan, and decode on a 2-CPU Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cluster.extraction import (DECODE_SHARE, MAX_ACTOR_THREADS, ResourcePlan, decode_chunks,
                                         decode_shard, plan_resources)
from pipeline.inputs.base import Shard
from pipeline.inputs.registry import list_shards

SIZE = 28
KW = dict(image_size=SIZE, max_pixels=10**6, read={"image_column": "image", "label_column": "label"})


def _batch(*shards: Shard) -> dict:
    return {"shard": np.array([s.to_json() for s in shards], dtype=object)}


def test_decode_shard_folder_with_one_broken_file(tiny_images):
    root, written = tiny_images
    with open(f"{root}/{sorted(written)[0]}", "rb") as f:
        good = f.read()
    with open(f"{root}/bird/99999.png", "wb") as f:
        f.write(good[: len(good) // 2])  # a real PNG, cut in half
    (shard,) = list_shards(root, shard_size=100)
    out = decode_shard(_batch(shard), **KW)
    n = len(written) + 1
    assert set(out) == {"shard_id", "shard_n", "shard_row", "image_id", "uri", "label", "caption", "width", "height",
                        "url", "key", "meta", "error", "stage", "pixels", "read_s", "decode_s"}
    assert out["shard_row"].tolist() == list(range(n))
    assert out["pixels"].shape == (n, SIZE, SIZE, 3) and out["pixels"].dtype == np.uint8
    assert out["shard_n"].tolist() == [n] * n and out["shard_id"].tolist() == [0] * n
    assert (out["read_s"] > 0).all() and (out["decode_s"] > 0).all()  # each row's seconds (stage timings)
    assert out["read_s"].sum() + out["decode_s"].sum() < 10
    ids = out["image_id"].tolist()
    assert ids == sorted([*written, "bird/99999.png"])
    bad = ids.index("bird/99999.png")
    assert out["stage"][bad] == "decode" and out["error"][bad].startswith("broken image")
    assert (out["pixels"][bad] == 0).all() and out["width"][bad] == 0 and out["height"][bad] == 0
    assert out["label"][bad] == "bird"
    for i, rel in enumerate(ids):
        if i == bad:
            continue
        assert out["error"][i] == "" and out["stage"][i] == ""
        assert (out["width"][i], out["height"][i]) == (28, 28) and out["label"][i] == rel.split("/")[0]
        np.testing.assert_array_equal(out["pixels"][i, :, :, 0], written[rel])
    assert out["caption"].tolist() == [""] * n  # "" = none (Ray would turn None into NaN)


def test_decode_shard_counts_rows_per_shard(tiny_images):
    root, written = tiny_images
    shards = list_shards(root, shard_size=4)
    out = decode_shard(_batch(*shards), **KW)
    assert out["shard_id"].tolist() == [0, 0, 0, 0, 1, 1]
    assert out["shard_n"].tolist() == [4, 4, 4, 4, 2, 2]
    assert (out["error"] == "").all()


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 6, 100])
def test_decode_chunks_streams_bounded_blocks_with_the_total_on_the_last(tiny_images, chunk_rows):
    root, _ = tiny_images
    shards = list_shards(root, shard_size=4)  # 4 + 2 images
    whole = decode_shard(_batch(*shards), **KW)
    blocks = list(decode_chunks(_batch(*shards), **KW, chunk_rows=chunk_rows))
    assert all(0 < len(b["image_id"]) <= chunk_rows and b["pixels"].shape[0] == len(b["image_id"]) for b in blocks)
    for sid, n in ((0, 4), (1, 2)):
        mine = [b for b in blocks if b["shard_id"][0] == sid]
        assert all((b["shard_id"] == sid).all() for b in mine)
        assert [len(b["image_id"]) for b in mine] == [min(chunk_rows, n - i) for i in range(0, n, chunk_rows)]
        assert all((b["shard_n"] == -1).all() for b in mine[:-1]) and (mine[-1]["shard_n"] == n).all()
    joined = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    for k in whole:
        if k not in ("shard_n", "read_s", "decode_s"):  # timings differ run to run
            np.testing.assert_array_equal(joined[k], whole[k])


def test_decode_chunks_shard_breaking_part_way_keeps_the_rows_read(tiny_images, monkeypatch):
    import pipeline.cluster.extraction as rs

    root, _ = tiny_images
    (shard,) = list_shards(root, shard_size=100)
    real = rs.read_shard

    def breaks(sh, **kw):
        for i, rec in enumerate(real(sh, **kw)):
            if i == 3:
                raise OSError("connection reset")
            yield rec

    monkeypatch.setattr(rs, "read_shard", breaks)
    blocks = list(decode_chunks(_batch(shard), **KW, chunk_rows=2))
    out = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    assert out["shard_row"].tolist() == [0, 1, 2, 3] and out["shard_n"].tolist() == [-1, -1, 4, 4]
    assert out["error"][:3].tolist() == ["", "", ""] and out["stage"][3] == "read"
    assert out["error"][3] == "unreadable shard: OSError: connection reset"


class _Progress:
    n = 0

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        pass


def _writer_block(rows, n, error_rows=()):
    """Encoded rows of shard 0 as the writer receives them."""
    m = len(rows)
    col = lambda v: np.array([v] * m, dtype=object)  # noqa: E731
    return {"shard_id": np.zeros(m, np.int64), "shard_n": np.full(m, n, np.int64),
            "shard_row": np.asarray(rows, np.int64), "image_id": np.array([f"i{r}" for r in rows], dtype=object),
            "uri": col("u"), "label": col("a"), "caption": col(""), "url": col(""), "key": col(""),
            "meta": col(""), "width": np.ones(m, np.int32), "height": np.ones(m, np.int32),
            "error": np.array(["broken" if r in error_rows else "" for r in rows], dtype=object),
            "stage": np.array(["read" if r in error_rows else "" for r in rows], dtype=object),
            "embedding": np.ones((m, 4), np.float32)}


def test_shard_writer_waits_for_the_block_with_the_total(tmp_path):
    """Blocks arrive in any order; a shard is written once, when its total is known and every row is in."""
    import pyarrow.parquet as pq

    from pipeline.stages.extract import _ShardWriter

    w = _ShardWriter(str(tmp_path), 4, progress=_Progress())
    w(_writer_block([4], 5))  # the last block first: 1 of 5 rows
    w(_writer_block([0, 1], -1))
    assert not (tmp_path / "features").exists()
    w(_writer_block([2, 3], -1))
    t = pq.read_table(tmp_path / "features" / "shard-000000.parquet")
    assert t.column("image_id").to_pylist() == [f"i{r}" for r in range(5)] and w.n_ok == 5 and w.progress.n == 1


def test_shard_writer_retry_that_read_less_keeps_the_retry(tmp_path, caplog):
    """Attempt 1 streamed 4 rows and died; attempt 2 broke earlier (3 rows in all): its 3 rows are written."""
    import logging

    import pyarrow.parquet as pq

    from pipeline.stages.extract import _ShardWriter

    w = _ShardWriter(str(tmp_path), 4, progress=_Progress())
    w(_writer_block([0, 1, 2, 3], -1))
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.extract"):
        w(_writer_block([0, 1, 2], 3, error_rows=(2,)))
    t = pq.read_table(tmp_path / "features" / "shard-000000.parquet")
    e = pq.read_table(tmp_path / "errors" / "shard-000000.parquet")
    assert t.column("image_id").to_pylist() == ["i0", "i1"] and e.column("image_id").to_pylist() == ["i2"]
    assert "1 rows beyond its 3" in caplog.text


def test_shard_writer_writes_shards_that_delivered_nothing_empty(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.stages.extract import _ShardWriter

    w = _ShardWriter(str(tmp_path), 4, progress=_Progress())
    w(_writer_block([0], 1))
    w.finish([0, 1])  # shard 1: an empty tar
    assert pq.read_table(tmp_path / "features" / "shard-000001.parquet").num_rows == 0
    assert pq.read_table(tmp_path / "errors" / "shard-000001.parquet").num_rows == 0
    assert w.written == {0, 1} and w.progress.n == 2


def test_decode_shard_unreadable_shard_is_one_read_error(tmp_path):
    shard = Shard(shard_id=5, kind="parquet", source=str(tmp_path / "gone.parquet"))
    out = decode_shard(_batch(shard), **KW)
    assert out["shard_id"].tolist() == [5] and out["shard_n"].tolist() == [1]
    assert out["stage"].tolist() == ["read"] and out["error"][0].startswith("unreadable shard")
    assert out["pixels"].shape == (1, SIZE, SIZE, 3)


def test_decode_shard_parquet_null_image_is_a_read_error(tmp_path):
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (40, 30), (9, 8, 7)).save(buf, "PNG")
    pq.write_table(pa.table({"image": [buf.getvalue(), None], "label": ["a", "b"]}), tmp_path / "p.parquet")
    out = decode_shard(_batch(*list_shards(str(tmp_path))), **KW)
    assert out["image_id"].tolist() == ["p/0", "p/1"]
    assert out["stage"].tolist() == ["", "read"] and "null image" in out["error"][1]
    assert (out["width"][0], out["height"][0]) == (40, 30) and (out["pixels"][0] == [9, 8, 7]).all()


# ---------------------------------------------------------------- resource plan


def test_plan_two_cpus_keeps_one_for_decode():
    plan = plan_resources(cpus=2, gpus=0, num_actors=None, device="auto")
    assert plan == ResourcePlan(num_actors=1, actor_cpus=1.0, actor_gpus=0.0, threads=2, device="cpu",
                                backend="onnx", decode_cpus=1.0, batch_size=128, spinning=False)
    assert plan_resources(cpus=2, gpus=0, num_actors=None, device="auto", backend="torch").batch_size == 64
    assert plan_resources(cpus=2, gpus=0, num_actors=None, device="auto", batch_size=32).batch_size == 32
    assert plan.actor_cpus * plan.num_actors <= 2 - 1
    assert "1 encoder actor(s) x 2 onnx threads" in plan.describe() and "sleep when idle" in plan.describe()


@pytest.mark.parametrize("cpus", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_plan_cpu_default_keeps_one_cpu_free(cpus, backend):
    plan = plan_resources(cpus=cpus, gpus=0, num_actors=None, device="auto", backend=backend)
    assert plan.device == "cpu" and plan.actor_gpus == 0.0
    assert plan.backend == ("torch" if backend == "torch" else "onnx")
    assert plan.actor_cpus * plan.num_actors <= cpus - 1 + 1e-9
    assert plan.decode_cpus == pytest.approx(cpus - plan.actor_cpus * plan.num_actors)
    assert 1 <= plan.threads <= MAX_ACTOR_THREADS
    # decode tasks get about their share of the cores (threads are whole), at least one; every core has a thread
    assert plan.decode_cpus >= max(1, 0.6 * cpus * DECODE_SHARE[plan.backend])
    assert plan.threads * plan.num_actors + plan.decode_cpus >= cpus


@pytest.mark.parametrize("cpus, want", [
    (2, (1, 2, 1.0, 1.0)), (8, (2, 3, 3.0, 2.0)), (16, (4, 3, 3.0, 4.0)),
])
def test_plan_onnx_on_2_8_16_cores(cpus, want):
    """What is chosen on the node sizes the README states (actors, threads, CPUs per actor, decode CPUs)."""
    plan = plan_resources(cpus=cpus, gpus=0, num_actors=None, device="cpu")
    assert (plan.num_actors, plan.threads, plan.actor_cpus, plan.decode_cpus) == want


@pytest.mark.parametrize("cpus, actors", [
    (2, 1), (2, 2), (2, 3), (4, 3), (8, 5), (16, 4),
    (2, 6),
    (6, 9),
])
def test_plan_explicit_actor_count_keeps_one_cpu_free(cpus, actors):
    plan = plan_resources(cpus=cpus, gpus=0, num_actors=actors, device="cpu")
    assert plan.num_actors == actors
    assert plan.actor_cpus * plan.num_actors <= cpus - 1


def test_plan_onnx_on_a_gpu_is_refused():
    with pytest.raises(ValueError, match="'onnx' runs on the CPU"):
        plan_resources(cpus=16, gpus=2, num_actors=None, device="auto", backend="onnx")
    assert plan_resources(cpus=16, gpus=2, num_actors=None, device="cpu", backend="onnx").backend == "onnx"


def test_plan_gpus():
    plan = plan_resources(cpus=16, gpus=2, num_actors=None, device="auto")
    assert plan == ResourcePlan(num_actors=2, actor_cpus=1.0, actor_gpus=1.0, threads=4, device="cuda",
                                backend="torch", decode_cpus=14.0, batch_size=64)
    assert plan.actor_cpus * plan.num_actors <= 16 - 1
    assert plan_resources(cpus=16, gpus=2, num_actors=None, device="cuda").device == "cuda"


def test_plan_gpus_with_few_cpus_keeps_one_cpu_free():
    plan = plan_resources(cpus=4, gpus=4, num_actors=None, device="auto")
    assert plan.actor_cpus * plan.num_actors <= 4 - 1


def test_plan_device_cpu_ignores_gpus():
    plan = plan_resources(cpus=16, gpus=2, num_actors=None, device="cpu")
    assert plan.device == "cpu" and plan.actor_gpus == 0.0 and plan.num_actors == 4 and plan.backend == "onnx"


def test_plan_cuda_without_gpu_is_an_error():
    with pytest.raises(ValueError, match="device 'cuda' requested but the Ray cluster has no GPU"):
        plan_resources(cpus=8, gpus=0, num_actors=None, device="cuda")


# ---------------------------------------------------------------- on Ray


def test_decode_on_ray_data(ray_start_2_cpus, tiny_images):
    """The decode mapper as run_extraction runs it: one shard per block, CPU tasks, numpy batches."""
    import ray
    from ray.data import DataContext

    from pipeline.cluster.extraction import _decode_task_args

    root, written = tiny_images
    shards = list_shards(root, shard_size=4)
    DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(decode_chunks, batch_size=1, batch_format="numpy", ray_remote_args_fn=_decode_task_args,
                        fn_kwargs={**KW, "chunk_rows": 3})
    rows = sorted(ds.iter_rows(), key=lambda r: r["image_id"])
    assert [r["image_id"] for r in rows] == sorted(written)
    # shard 0 streamed as 3 rows (total unknown yet) + 1 row carrying the total; shard 1 in one block
    assert [(int(r["shard_id"]), int(r["shard_row"]), int(r["shard_n"])) for r in rows] == \
        [(0, 0, -1), (0, 1, -1), (0, 2, -1), (0, 3, 4), (1, 0, 2), (1, 1, 2)]
    for r in rows:
        assert r["error"] == "" and r["label"] == r["image_id"].split("/")[0]
        np.testing.assert_array_equal(r["pixels"][:, :, 1], written[r["image_id"]])


def test_jpegs_deferred_to_the_encoder_actor(tiny_images):
    """jpeg_on_gpu: decode tasks pass JPEG bytes on (their size from the header) and decode the rest;
    the actor decodes them on its device (here the CPU) in the same geometry, so the features agree
    with the all-CPU path; a broken JPEG becomes a decode error row and fails only itself."""
    import io

    from PIL import Image

    from pipeline.cluster.extraction import EncodeActor

    root, written = tiny_images
    rels = sorted(written)[:6]
    for rel in rels[:4]:  # four of them as JPEG (larger, not square), the rest stay PNG
        big = Image.open(f"{root}/{rel}").convert("RGB").resize((96, 64))
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=92)
        with open(f"{root}/{rel[:-4]}.jpg", "wb") as f:
            f.write(buf.getvalue() if rel != rels[3] else buf.getvalue()[:300])  # the fourth is cut short
    (shard,) = list_shards(root, shard_size=1000)
    kw = dict(KW, image_size=224)
    plain = decode_shard(_batch(shard), **kw)
    deferred = list(decode_chunks(_batch(shard), **kw, chunk_rows=1000, defer_jpeg=True))[0]
    jpg = np.array([u.endswith(".jpg") for u in deferred["uri"]])
    assert jpg.sum() == 4 and "jpeg" in deferred and "jpeg" not in plain
    passed = np.array([len(b) > 0 for b in deferred["jpeg"]])
    assert passed.sum() >= 3 and not (passed & ~jpg).any()  # the whole JPEGs (the cut one maybe too)
    assert (deferred["width"][passed] == 96).all() and (deferred["height"][passed] == 64).all()
    assert int(deferred["pixels"][passed].sum()) == 0  # not decoded by the task
    actor = EncodeActor(encoder="effnet-lite0", pretrained=None, device="cpu", threads=2, backend="torch")
    a, b = actor(dict(plain)), actor(dict(deferred))
    assert "jpeg" not in b
    cut = np.array([u.endswith(f"{rels[3][:-4].split('/')[-1]}.jpg") for u in b["uri"]])
    assert b["stage"][cut].tolist() == ["decode"] and a["stage"][cut].tolist() == ["decode"]
    good = np.array([e == "" for e in a["error"]])
    ea, eb = a["embedding"][good], b["embedding"][good]
    cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    assert cos.min() >= 0.999, cos
    assert np.array_equal(ea[~jpg[good]], eb[~jpg[good]])  # PNG rows: the same pixels, the same features
