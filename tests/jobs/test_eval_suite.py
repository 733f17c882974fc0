"""benchmarks.eval_suite's bookkeeping (not the evaluations): `--only` regenerates some sections and
keeps the others in place, EVAL.md says so, and committed results hold no absolute repository paths."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is a folder of the repo

from benchmarks import eval_suite  # noqa: E402

ROW = {"method": "m", "semantics": "text", "zsl": 0.5, "S": 0.5, "U": 0.5, "H": 0.5, "S_cal": 0.5, "U_cal": 0.5,
       "H_cal": 0.5, "gamma": 0.0, "ausuc": 0.3}


def _section(name: str, zsl: float) -> dict:
    return {"dataset": name, "images": "i", "semantics_source": "s", "seen": ["a"], "unseen": ["b"],
            "features": str(eval_suite.ROOT / "runs" / "eval" / name), "table": [{**ROW, "zsl": zsl}],
            "results": [{"per_class": {}}]}


def test_only_regenerates_its_sections_and_keeps_the_rest(tmp_path, monkeypatch):
    old = {"meta": {"date": "2026-11-27 13:17 UTC", "tune": True}, "sections": [
        {k: v for k, v in _section("A", 0.1).items() if k != "results"} | {"per_class": [{}]},
        {k: v for k, v in _section("bridged B", 0.2).items() if k != "results"} | {"per_class": [{}]}]}
    (tmp_path / "eval_results.json").write_text(json.dumps(old))
    monkeypatch.setattr(eval_suite, "bridge_sections", lambda *a, **k: [_section("bridged B", 0.9),
                                                                        _section("bridged C", 0.8)])
    assert eval_suite.main(["--only", "bridge", "--out", str(tmp_path), "--work", str(tmp_path / "w"),
                            "--shared", str(tmp_path / "none")]) == 0
    new = json.loads((tmp_path / "eval_results.json").read_text())
    assert [s["dataset"] for s in new["sections"]] == ["A", "bridged B", "bridged C"]
    assert [s["table"][0]["zsl"] for s in new["sections"]] == [0.1, 0.9, 0.8]
    assert new["meta"]["partial"] == ["bridge"] and new["meta"]["previous_date"] == "2026-11-27 13:17 UTC"
    assert all(not Path(s["features"]).is_absolute() for s in new["sections"])
    md = (tmp_path / "EVAL.md").read_text()
    assert "regenerated only: bridge" in md and "2026-11-27 13:17 UTC" in md and "## bridged C" in md
