"""pipeline.index: seeded clustered data checked against numpy brute force (as faiss contrib)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("faiss")

from pipeline.index.build import build_index, new_index  # noqa: E402
from pipeline.index.choose import default_nlist, choose_index, estimate_memory  # noqa: E402
from pipeline.index.knn import exact_knn, recall_at_k, search  # noqa: E402
from pipeline.index.store import load_index, save_index  # noqa: E402
from pipeline.core.schema import INDEX_IDS_SCHEMA  # noqa: E402

DIM = 64


def clustered(n: int, dim: int = DIM, clusters: int = 20, seed: int = 0, spread: float = 0.3):
    """``n`` L2-normalised vectors around ``clusters`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


pytestmark = pytest.mark.usefixtures("one_faiss_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def data():
    base = clustered(2000, seed=0)
    rng = np.random.default_rng(2)  # queries: perturbed base rows, so they sit in the clusters
    picked = base[rng.choice(len(base), 100, replace=False)]
    queries = picked + 0.05 * rng.standard_normal((100, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    return base, queries, exact_knn(base, queries, 10)


def ids_table(n: int) -> pa.Table:
    return pa.table(
        {
            "faiss_id": np.arange(n, dtype=np.int64),
            "image_id": [f"img{i}" for i in range(n)],
            "uri": [f"file:///img{i}.jpg" for i in range(n)],
            "label": [f"c{i % 7}" for i in range(n)],
        },
        schema=INDEX_IDS_SCHEMA,
    )


# ---------------------------------------------------------------- build + search vs ground truth


def test_brute_force_matches_full_sort(data):
    base, queries, (scores, ids) = data
    sim = queries @ base.T
    assert ids.shape == (100, 10) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, -np.sort(-sim, axis=1)[:, :10], rtol=1e-6)
    assert recall_at_k(ids, ids) == 1.0


def test_flat_equals_brute_force(data):
    base, queries, (bs, bi) = data
    index = build_index(base, dim=DIM, factory="Flat")
    assert index.ntotal == len(base)
    scores, ids = search(index, queries, 10)
    np.testing.assert_allclose(scores, bs, atol=1e-5)
    differ = ids != bi  # only near-ties may swap
    assert differ.mean() < 0.01
    np.testing.assert_allclose(scores[differ], bs[differ], atol=1e-5)


@pytest.mark.parametrize(
    "factory, nprobe, min_recall",
    [("HNSW32,Flat", None, 0.95), ("IVF32,Flat", 32, 0.95), ("IVF32,PQ16x8", 32, 0.5)],
)
def test_approximate_recall(data, factory, nprobe, min_recall):
    base, queries, (_, exact) = data
    index = build_index(base, dim=DIM, factory=factory, seed=0)
    _, ids = search(index, queries, 10, nprobe=nprobe)
    assert recall_at_k(ids, exact) >= min_recall


def test_search_nprobe_is_restored_and_k_clamped(data):
    import faiss

    base, queries, _ = data
    index = build_index(base[:500], dim=DIM, factory="IVF8,Flat")
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = 2
    search(index, queries, 5, nprobe=8)
    assert ivf.nprobe == 2
    scores, ids = search(index, queries[0], 10_000, nprobe=8)  # 1-D query, k > ntotal
    assert ids.shape == (1, 500) and sorted(ids[0].tolist()) == list(range(500))
    with pytest.raises(ValueError, match="nprobe"):
        search(index, queries, 5, nprobe=0)
    with pytest.raises(ValueError, match="k must be"):
        search(index, queries, 0)
    with pytest.raises(ValueError, match=r"\(n, 64\)"):
        search(index, queries[:, :32], 5)


def test_batches_equal_one_array(data):
    base, queries, _ = data
    batches = [base[i : i + 300] for i in range(0, len(base), 300)]
    kw = dict(dim=DIM, factory="IVF32,PQ8x4", train_sample=1000, seed=3)
    one = search(build_index(base, **kw), queries, 10, nprobe=8)
    listed = search(build_index(batches, **kw), queries, 10, nprobe=8)
    counted = search(build_index(batches, n_total=len(base), **kw), queries, 10, nprobe=8)
    for got in (listed, counted):
        np.testing.assert_array_equal(got[1], one[1])
        np.testing.assert_array_equal(got[0], one[0])
    # a one-shot generator trains on its head: still a complete, usable index
    gen = build_index((b for b in batches), **{**kw, "factory": "IVF32,Flat"})
    assert gen.ntotal == len(base)
    flat_gen = build_index((b for b in batches), dim=DIM, factory="Flat", progress=True)
    exact = exact_knn(base, queries, 10)[1]
    np.testing.assert_array_equal(search(flat_gen, queries, 10)[1], exact)


def test_build_rejects_bad_vectors(data):
    base, _, _ = data
    with pytest.raises(ValueError, match=r"expected shape \(n, 32\), got \(2000, 64\)"):
        build_index(base, dim=32, factory="Flat")
    bad = base[:100].copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        build_index(bad, dim=DIM, factory="Flat")
    with pytest.raises(ValueError, match="float32"):
        build_index([[["a"] * DIM]], dim=DIM, factory="Flat")
    with pytest.raises(ValueError, match="bad index factory 'IVFx,Flat'"):
        build_index(base, dim=DIM, factory="IVFx,Flat")
    with pytest.raises(ValueError, match="cannot train IVF64,Flat on 10"):
        build_index(base[:10], dim=DIM, factory="IVF64,Flat")


def test_use_gpu_true_without_gpu_falls_back(data, caplog):
    import faiss

    if faiss.get_num_gpus():
        pytest.skip("machine has a GPU")
    index = build_index(data[0][:100], dim=DIM, factory="Flat", use_gpu=True)
    assert index.ntotal == 100 and "no GPU" in caplog.text


# ---------------------------------------------------------------- choose_index / estimate_memory

G = 1 << 30


def test_choose_index_progression():
    assert choose_index(1000, 512, max_memory_bytes=G) == "Flat"
    assert choose_index(20_000, 512, max_memory_bytes=G) == "Flat"
    assert choose_index(20_001, 512, max_memory_bytes=G) == "HNSW32,Flat"
    assert choose_index(2_000_000, 512, max_memory_bytes=16 * G).startswith("IVF")
    assert choose_index(2_000_000, 512, max_memory_bytes=16 * G).endswith(",Flat")
    tight = choose_index(2_000_000, 512, max_memory_bytes=G // 4)
    assert tight.startswith("OPQ") and ",IVF" in tight and ",PQ" in tight
    # an HNSW coarse quantiser from 4096 lists on (as autofaiss), a flat one below
    assert choose_index(2_000_000, 512, max_memory_bytes=16 * G) == "IVF4096_HNSW32,Flat"
    assert choose_index(1_100_000, 64, max_memory_bytes=16 * G) == "IVF4096_HNSW32,Flat"
    assert choose_index(200_000, 64, max_memory_bytes=2**26) == "IVF2048,Flat"
    assert choose_index(50_000, 64, max_memory_bytes=2**20).startswith("IVF1024,PQ")  # small: no OPQ
    # flat would fit but the HNSW graph does not
    n, dim = 500_000, 128
    between = estimate_memory(f"IVF{default_nlist(n)},Flat", n, dim) + 1
    assert choose_index(n, dim, max_memory_bytes=between).endswith(",Flat")
    assert not choose_index(n, dim, max_memory_bytes=between).startswith("HNSW")


def test_choose_index_nlist_bounds():
    assert default_nlist(100) == 2  # n // 39
    assert default_nlist(10_000) == 256  # 4 * sqrt(1e4) = 400 -> 512 > 10000 // 39 = 256
    assert default_nlist(1_000_000) == 4096
    assert default_nlist(10**12) == 65536
    assert default_nlist(1) == 1


def test_choose_index_impossible():
    with pytest.raises(ValueError, match=r"needs at least \d+ bytes"):
        choose_index(10**9, 768, max_memory_bytes=G)
    with pytest.raises(ValueError, match="needs at least 51200 bytes"):
        choose_index(100, 128, max_memory_bytes=1000)  # too few points for PQ
    with pytest.raises(ValueError, match="n=0,"):
        choose_index(0, 128, max_memory_bytes=G)
    with pytest.raises(ValueError, match="max_memory_bytes=0"):
        choose_index(10, 128, max_memory_bytes=0)


@pytest.mark.parametrize("n", [500, 20_000, 300_000, 5_000_000, 10**8])
@pytest.mark.parametrize("dim", [64, 384, 768, 1000])
@pytest.mark.parametrize("budget", [2**20, 2**26, 2**30, 2**34, 2**37])
def test_choice_fits_budget(n, dim, budget):
    try:
        factory = choose_index(n, dim, max_memory_bytes=budget)
    except ValueError as exc:
        needed = int(str(exc).split("needs at least ")[1].split()[0])
        assert needed > budget
        return
    assert estimate_memory(factory, n, dim) <= budget
    if factory.startswith("OPQ"):  # OPQ{m}_{d},IVF..,PQ{m}x8: d divisible by m, at most dim
        m, d = (int(v) for v in factory.split(",")[0][3:].split("_"))
        assert d % m == 0 and d <= dim and factory.endswith(f"PQ{m}x8") and n >= 100_000
    elif "PQ" in factory:
        assert dim % int(factory.split("PQ")[1].split("x")[0]) == 0
    new_index(dim, factory)  # faiss accepts it


def test_estimate_memory_formats():
    assert estimate_memory("Flat", 10, 4) == 160
    assert estimate_memory("IVF16,Flat", 100, 8) == 16 * 32 + 100 * (32 + 8)
    assert estimate_memory("IVF16,PQ4x8", 100, 8) == 16 * 32 + 100 * (4 + 8) + 256 * 32
    opq = estimate_memory("OPQ4,IVF16,PQ4x8", 100, 8)
    assert opq == estimate_memory("IVF16,PQ4x8", 100, 8) + 8 * 8 * 4
    assert estimate_memory("HNSW32", 10, 4) == estimate_memory("HNSW32,Flat", 10, 4)
    # an HNSW coarse quantiser adds its graph over the centroids
    assert estimate_memory("IVF16_HNSW32,Flat", 100, 8) == estimate_memory("IVF16,Flat", 100, 8) + 16 * 272
    with pytest.raises(ValueError, match="'LSH'"):
        estimate_memory("LSH", 10, 4)


# ---------------------------------------------------------------- save / load


@pytest.fixture
def saved(data, tmp_path):
    base, queries, _ = data
    index = build_index(base, dim=DIM, factory="IVF32,Flat")
    out = str(tmp_path / "idx")
    save_index(
        index, out, ids=ids_table(len(base)),
        manifest={"factory": "IVF32,Flat", "feature_model": "clip-a", "nprobe": 16},
    )
    return index, out, queries


def test_round_trip(saved):
    index, out, queries = saved
    loaded, ids, manifest = load_index(out, expected_dim=DIM, expected={"feature_model": "clip-a"})
    keys = ("format", "ntotal", "dim", "factory", "metric", "index_bytes", "sha256", "feature_model")
    for key in keys:
        assert getattr(manifest, key) is not None
    assert manifest.format == "zsl-index/1" and manifest.metric == "inner_product"
    assert manifest.ntotal == 2000 and manifest.dim == DIM
    assert manifest.index_bytes == os.path.getsize(os.path.join(out, "index.faiss"))
    assert ids.schema.equals(INDEX_IDS_SCHEMA) and ids.num_rows == 2000
    import faiss

    assert faiss.extract_index_ivf(loaded).nprobe == 16  # from the manifest
    for a, b in zip(search(index, queries, 10, nprobe=16), search(loaded, queries, 10)):
        np.testing.assert_array_equal(a, b)
    assert not [f for f in os.listdir(out) if f.startswith("._tmp-")]
    assert sorted(os.listdir(out)) == ["ids.parquet", "index.faiss", "manifest.json"]


def test_factory_read_back_when_not_given(data, tmp_path):
    index = build_index(data[0][:50], dim=DIM, factory="Flat")
    save_index(index, str(tmp_path), ids=ids_table(50), manifest={})
    assert json.loads((tmp_path / "manifest.json").read_text())["factory"] == "Flat"


def test_corrupted_index_rejected(saved):
    _, out, _ = saved
    path = os.path.join(out, "index.faiss")
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        load_index(out)


def test_missing_manifest(saved, tmp_path):
    _, out, _ = saved
    os.remove(os.path.join(out, "manifest.json"))
    with pytest.raises(FileNotFoundError, match="no manifest.json; is this a finished `zsl index` output"):
        load_index(out)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_index(str(tmp_path / "nowhere"))


def test_expectation_mismatches(saved):
    _, out, _ = saved
    with pytest.raises(ValueError, match="index dim is 64, expected 512"):
        load_index(out, expected_dim=512)
    with pytest.raises(ValueError, match=r"'feature_model' is 'clip-a', expected 'x'"):
        load_index(out, expected={"feature_model": "x"})
    with pytest.raises(ValueError, match=r"'classes_fp' is '<missing>'"):
        load_index(out, expected={"classes_fp": "abc"})


def test_ids_count_mismatch(saved, tmp_path):
    index, _, _ = saved
    with pytest.raises(ValueError, match="faiss_id 0..1999"):
        save_index(index, str(tmp_path / "bad"), ids=ids_table(10), manifest={})
    assert not (tmp_path / "bad").exists() or not os.listdir(tmp_path / "bad")


def test_resave_removes_stale_manifest_first(saved, data, tmp_path):
    index, out, _ = saved
    small = build_index(data[0][:50], dim=DIM, factory="Flat")
    save_index(small, out, ids=ids_table(50), manifest={"factory": "Flat"})
    loaded, ids, manifest = load_index(out)
    assert loaded.ntotal == 50 == ids.num_rows and "nprobe" not in manifest


def test_round_trip_on_fsspec_uri(data):
    """Any fsspec URI works: here the in-memory filesystem."""
    base, queries, _ = data
    index = build_index(base[:300], dim=DIM, factory="Flat")
    out = "memory://zsl-test-index/run1"
    save_index(index, out, ids=ids_table(300), manifest={"factory": "Flat"})
    loaded, ids, manifest = load_index(out, expected_dim=DIM)
    assert manifest.ntotal == 300 == ids.num_rows
    got, want = search(loaded, queries, 5), search(index, queries, 5)
    np.testing.assert_array_equal(got[1], want[1])
