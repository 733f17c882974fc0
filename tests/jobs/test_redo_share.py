"""benchmarks.redo_share: what a rerun of `zsl extract` redid, counted from the output directory's state.

The counter (``snapshot`` before and after the rerun + ``rerun_counts``) reads the features shard
files (inode, mtime, size), ``run.json`` and ``manifest.json``; no log is parsed. It is checked on a
fake output directory (written with the library's writers, the "rerun" done by hand), on a real
tiny extraction with a shard removed, and (slow) through the whole kill-and-rerun harness.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import redo_share  # noqa: E402
from pipeline.core import fs as zio  # noqa: E402
from pipeline.core import parquet as zpq  # noqa: E402
from pipeline.core.features import shard_name, write_features  # noqa: E402
from pipeline.core.manifests import RunRecord  # noqa: E402
from pipeline.core.schema import ERRORS_SCHEMA  # noqa: E402

N_SHARDS, SHARD = 5, 2


def _fake_extract(out: Path) -> dict[str, bytes]:
    """A finished extract output of N_SHARDS x SHARD rows, as ``zsl extract`` lays it out; returns its shard files."""
    n = N_SHARDS * SHARD
    ids = [f"cls/{i:05d}.png" for i in range(n)]
    X = np.random.default_rng(0).random((n, 8), dtype=np.float32)
    write_features(str(out), image_ids=ids, uris=[f"file:///in/{i}" for i in ids], labels=["cls"] * n, X=X,
                   model_id="fake", shard_size=SHARD)
    for sid in range(N_SHARDS):
        zpq.write_parquet_atomic(str(out / "errors" / shard_name(sid)), ERRORS_SCHEMA.empty_table())
    plan = {str(sid): f"fp{sid}" for sid in range(N_SHARDS)}
    zio.write_json_atomic(str(out / "run.json"),
                          RunRecord(job="extract", identity={"input": "/in"}, state={"shards": plan}).model_dump())
    return {shard_name(sid): (out / "features" / shard_name(sid)).read_bytes() for sid in range(N_SHARDS)}


def _kill(out: Path, unfinished: list[int]) -> None:
    """What a kill leaves: no manifest, the unfinished shards' features files absent."""
    (out / "manifest.json").unlink()
    for sid in unfinished:
        (out / "features" / shard_name(sid)).unlink()


def _rerun(out: Path, files: dict[str, bytes], rewrite: list[int], manifest: dict) -> None:
    """What a rerun does: write the given shards (atomically, as extract does), then the manifest last."""
    for sid in rewrite:
        zio.write_bytes_atomic(str(out / "features" / shard_name(sid)), files[shard_name(sid)])
    zio.write_json_atomic(str(out / "manifest.json"), manifest)


def test_counts_the_shards_a_rerun_finished(tmp_path):
    out = tmp_path / "out"
    files = _fake_extract(out)
    manifest = zio.read_json(str(out / "manifest.json"))
    _kill(out, [3, 4])
    (out / "features" / "._tmp-shard-000003.parquet-x").write_bytes(b"half")  # a commit cut by the kill
    before = redo_share.snapshot(out)
    assert sorted(before) == [shard_name(i) for i in range(3)]
    _rerun(out, files, [3, 4], manifest)
    counts = redo_share.rerun_counts(out, before, redo_share.snapshot(out))
    assert counts["shards_in_input"] == N_SHARDS and counts["shards_in_output"] == N_SHARDS
    assert counts["found_done"] == 3 and counts["to_do"] == 2
    assert counts["redone"] == [shard_name(3), shard_name(4)]
    assert counts["recomputed"] == []
    assert counts["images_found_done"] == 3 * SHARD and counts["images_redone"] == 2 * SHARD
    assert counts["n_images"] == N_SHARDS * SHARD and counts["n_errors"] == 0


def test_nothing_to_do_counts_nothing(tmp_path):
    out = tmp_path / "out"
    _fake_extract(out)
    before = redo_share.snapshot(out)
    counts = redo_share.rerun_counts(out, before, redo_share.snapshot(out))
    assert counts["found_done"] == N_SHARDS and counts["to_do"] == 0
    assert counts["redone"] == [] and counts["recomputed"] == [] and counts["images_redone"] == 0


def test_a_finished_shard_written_again_is_caught(tmp_path):
    """The very same bytes written again: the atomic rename still gives the file a new inode."""
    out = tmp_path / "out"
    files = _fake_extract(out)
    manifest = zio.read_json(str(out / "manifest.json"))
    _kill(out, [4])
    before = redo_share.snapshot(out)
    _rerun(out, files, [1, 4], manifest)
    after = redo_share.snapshot(out)
    assert after[shard_name(1)].size == before[shard_name(1)].size
    counts = redo_share.rerun_counts(out, before, after)
    assert counts["recomputed"] == [shard_name(1)]
    assert counts["redone"] == [shard_name(4)] and counts["found_done"] == 4


def test_unfinished_or_inconsistent_outputs_are_refused(tmp_path):
    out = tmp_path / "out"
    files = _fake_extract(out)
    manifest = zio.read_json(str(out / "manifest.json"))
    _kill(out, [2])
    before = redo_share.snapshot(out)
    with pytest.raises(FileNotFoundError):  # no manifest: the rerun did not finish
        redo_share.rerun_counts(out, before, redo_share.snapshot(out))
    zio.write_json_atomic(str(out / "manifest.json"), manifest)
    with pytest.raises(RuntimeError, match="missing"):  # manifest, but shard 2 never came back
        redo_share.rerun_counts(out, before, redo_share.snapshot(out))
    _rerun(out, files, [2], {**manifest, "n_images": manifest["n_images"] + 1})
    with pytest.raises(RuntimeError, match="manifest.json says"):
        redo_share.rerun_counts(out, before, redo_share.snapshot(out))
    zio.write_json_atomic(str(out / "run.json"), RunRecord(job="label", identity={}).model_dump())
    with pytest.raises(RuntimeError, match="not an extract"):
        redo_share.rerun_counts(out, before, redo_share.snapshot(out))


def test_snapshot_of_a_missing_output_is_empty(tmp_path):
    assert redo_share.snapshot(tmp_path / "nothing") == {}


@pytest.mark.slow  # about 35 s: Ray start-up and two encoder loads
@pytest.mark.timeout(180)
def test_counts_a_real_rerun_of_a_tiny_extraction(tmp_path, tiny_images, ray_start_2_cpus):
    """run_extract for real (6 images, 3 shards), shard 1 and the manifest removed, run_extract again."""
    from pipeline.core.config import ExtractConfig
    from pipeline.stages.extract import run_extract

    root, written = tiny_images
    out = tmp_path / "features"
    cfg = ExtractConfig(input=root, output=str(out), input_format="folder", shard_size=2, batch_size=4,
                        num_actors=1)
    first = run_extract(cfg, progress=False)
    assert first.n_images == len(written) == 6 and first.n_shards == 3
    _kill(out, [1])
    before = redo_share.snapshot(out)
    run_extract(cfg, progress=False)
    counts = redo_share.rerun_counts(out, before, redo_share.snapshot(out))
    assert counts["shards_in_input"] == 3 and counts["found_done"] == 2
    assert counts["redone"] == [shard_name(1)] and counts["images_redone"] == 2
    assert counts["recomputed"] == []
    assert counts["n_images"] == 6 and counts["n_errors"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_harness_kills_and_reruns_a_tiny_extraction(tmp_path):
    """The whole harness: a real `zsl extract` subprocess SIGKILLed mid-run, rerun, counted, written as JSON."""
    out = tmp_path / "redo_share.json"
    rc = redo_share.main(["--shards", "6", "--shard-size", "6", "--batch-size", "3", "--repeats", "1",
                          "--work", str(tmp_path / "work"), "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    (rep,) = result["repeats"]
    assert rep["total_shards"] == 6 and rep["rerun_shards_in_input"] == 6
    assert rep["finished_shards_recomputed"] == 0 == result["finished_shards_recomputed"]
    assert rep["shards_done_at_kill"] == rep["rerun_found_done"] >= 1
    assert rep["shards_done_at_kill"] + rep["shards_redone"] == 6 == rep["rerun_found_done"] + rep["rerun_to_do"]
    assert rep["images_done_at_kill"] + rep["images_redone"] == 36
    assert 0 <= rep["redone_share"] <= rep["in_flight_share"] <= 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith("._tmp-")]
