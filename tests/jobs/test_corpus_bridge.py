"""`zsl corpus openclipart` on Debian's installed Open Clip Art (openclipart-png + -svg; `.ci/run`
installs them) and `zsl bridge` end to end: corpus -> extract -> embed-text -> bridge, with an
evaluation set excluded, then the bridge used by `zsl index` and `zsl search` like any model."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.usefixtures("ray_down_after")  # `zsl extract` runs in-process here

from pipeline.inputs.corpus import OPENCLIPART_ROOT, openclipart_caption


def test_captions_come_from_the_svg_title_and_keywords():
    svg = """<svg><metadata><rdf:RDF><cc:Work><dc:title>Chemistry  Flask</dc:title>
      <dc:subject><rdf:Bag><rdf:li></rdf:li><rdf:li>chemistry</rdf:li><rdf:li>unsorted</rdf:li>
      <rdf:li>Chemistry Flask</rdf:li><rdf:li>science &amp; labs</rdf:li><rdf:li>chemistry</rdf:li>
      </rdf:Bag></dc:subject></cc:Work></rdf:RDF></metadata></svg>"""
    assert openclipart_caption(svg) == "Chemistry Flask: chemistry, science & labs"
    assert openclipart_caption("<svg><dc:title>Cat</dc:title></svg>") == "Cat"
    assert openclipart_caption("<svg/>") is None


@pytest.mark.slow
def test_corpus_extract_bridge_index_search(tmp_path):
    if not os.path.isdir(OPENCLIPART_ROOT):
        pytest.fail(f"{OPENCLIPART_ROOT} is missing: apt-get install openclipart-png openclipart-svg")
    from jobs.cli import main

    c, f = tmp_path / "corpus", tmp_path / "features"
    assert main(["corpus", "openclipart", "--output", str(c), "--limit", "300"]) == 0
    m = json.loads((c / "manifest.json").read_text())
    assert m["n_images"] == 300 and m["n_captions"] >= 280
    t = pq.ParquetDataset(str(c / "shards")).read()
    assert t.num_rows == 300 and all(u.startswith(OPENCLIPART_ROOT) for u in t.column("url").to_pylist())
    assert main(["extract", "--input", str(c), "--output", str(f)]) == 0
    assert main(["embed-text", "--features", str(f)]) == 0
    # the first 100 corpus rows play an evaluation set: the bridge must not train on them
    held = tmp_path / "held"
    from pipeline.core.features import load_features, write_features

    feats = load_features(str(f))
    write_features(str(held), image_ids=list(feats.image_ids[:100]), uris=list(feats.uris[:100]),
                   labels=[None] * 100, X=feats.X[:100], model_id=feats.manifest.model_id)
    assert main(["bridge", "--features", str(f), "--exclude", str(held), "--output", str(tmp_path / "b")]) == 0
    bm = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert bm["config"]["overlap_dropped"] >= 100 and bm["n_train"] <= bm["config"]["pairs_with_captions"] - 100
    assert bm["method"] == "bridge" and bm["seen"] == [] and bm["tuning"]["lam"] > 0
    # the bridge makes the drawings searchable by text, like a class-trained model would
    assert main(["index", "--features", str(f), "--model", str(tmp_path / "b"), "--output", str(tmp_path / "i")]) == 0
    assert (tmp_path / "i" / "captions" / "manifest.json").exists()
    from pipeline.index.searcher import Searcher

    s = Searcher(str(tmp_path / "i"))
    caption = t.column("caption").to_pylist()[150]
    hits = s.search(caption, 5, mode="caption")
    assert hits[0]["uri"].endswith(t.column("url").to_pylist()[150].rsplit("/", 1)[-1]) or \
        hits[0]["score"] == pytest.approx(1.0, abs=1e-3)  # duplicated captions tie at 1.0
    assert len(s.search("a red car", 5)) == 5 and len(s.search("a red car", 5, mode="both")) == 5
