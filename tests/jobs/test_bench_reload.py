"""The service follows its index under load (benchmarks.bench_reload at a tiny scale): a real `zsl serve`
subprocess answers text queries while `zsl index` adds a shard and then rebuilds with every id moved;
no 5xx, no hit whose uri is not its id's in the version the reply names, the added images found once
their version serves, and the RSS of the reloaded server within 10 % of a fresh one's."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo, not installed

from benchmarks import bench_reload  # noqa: E402


@pytest.mark.timeout(300)
def test_serving_under_load_while_the_index_grows_and_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "reload.json"
    with pytest.raises(SystemExit) as done:
        bench_reload.app(["--rows", "3000", "--clients", "2", "--settle", "1.5", "--output", str(out)])
    assert done.value.code == 0
    r = json.loads(out.read_text())
    load = r["load"]
    assert load["5xx"] == 0 and load["other_errors"] == 0 and load["ok"] > 50
    assert load["wrong_uris"] == 0 and load["replies_of_unknown_versions"] == 0
    assert len(load["replies_per_version"]) == 3  # first, grown, rebuilt: each answered queries
    assert load["added_version_replies_with_new_images"] > 0
    assert r["steps"]["add"]["ntotal"] == 3000 and r["steps"]["add"]["switch_s"] < 30
    assert r["rss_ratio_reloaded_vs_fresh"] <= 1.10
