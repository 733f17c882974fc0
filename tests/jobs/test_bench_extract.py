"""benchmarks.bench_extract: every side of the extraction benchmark on a tiny real input, in-process."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module", autouse=True)
def _ray_down(ray_down_after):
    yield


def test_tiny_run_times_every_side_and_compares_the_embeddings(tmp_path):
    from benchmarks import bench_extract

    out = tmp_path / "extract.json"
    assert bench_extract.main(["--data", "animal-mnist", "--images", "60", "--repeats", "1", "--shard-size", "15",
                               "--batch-size", "16", "--no-one-off", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    d = r["datasets"]["animal-mnist"]
    assert d["n_images"] == 60 and set(d["sides"]) == {"torch", "onnx", "bare", "encode"}
    onnx, torch = d["sides"]["onnx"]["runs"][0], d["sides"]["torch"]["runs"][0]
    assert onnx["resources"]["rows_by_backend"] == {"onnx": 60, "torch": 0}
    assert torch["resources"]["rows_by_backend"] == {"onnx": 0, "torch": 60}
    assert set(onnx["stage_ms_per_image"]) == {"read", "decode", "encode", "write"}
    assert set(d["sides"]["bare"]["runs"][0]["stage_ms_per_image"]) == {"read", "decode", "encode"}
    for side in d["sides"].values():
        assert side["median_steady_images_per_s"] > 0
    e = d["embeddings"]
    assert e["rows_decoded_alike"] == 60 and e["within_tolerance"] and e["rows_drafted"] == 0
    assert e["max_abs_diff_onnx_pipeline_vs_bare_loop"] < 1e-3
    assert set(d["ratios_steady"]) == {"onnx_vs_torch", "onnx_vs_encode_loop", "onnx_vs_bare_loop",
                                       "bare_loop_vs_encode_loop"}
    assert d["decode_only"]["median_ms_per_image"]["today"] > 0 and "describe" in r["plan"]
