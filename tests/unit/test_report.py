"""Tests for pipeline.zsl.html_report: HTML rendering, plots, atomic writes, thumbnails."""

from __future__ import annotations

import base64
import io
import os
import re
import tarfile

import numpy as np
import pytest

from pipeline.zsl.metrics import evaluate_scores
from pipeline.zsl.html_report import (
    default_thumbnail,
    plot_confusion,
    plot_per_class_accuracy,
    plot_seen_unseen_curve,
    render_report,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCORES = np.array(
    [[0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.7, 0.0], [0.6, 0.0, 0.4, 0.3], [0.0, 0.5, 0.2, 0.25]]
)


def _metrics() -> dict:
    m = evaluate_scores(SCORES, np.array([0, 1, 2, 3]), class_names=["cat", "dog", "zebra", "okapi"],
                        seen_idx=[0, 1], unseen_idx=[2, 3], gamma=0.3)
    m["confusion"] = {"labels": ["cat", "dog"], "matrix": [[1.0, 0.0], [0.5, 0.5]]}
    return m


def _png_bytes(size=(200, 100), colour=(255, 0, 0), fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def test_render_report_contains_table_images_and_escaped_queries():
    metrics = {"ProtoNet <v2>": _metrics()}
    searches = [
        {"query": "<script>alert('x')</script> striped horse",
         "hits": [{"uri": "imgs/a.jpg", "score": 0.91234, "label": "zebra"},
                  {"uri": "imgs/<b>.jpg", "score": 0.5, "label": None}]},
    ]
    thumbs = {"imgs/a.jpg": _png_bytes()}
    html = render_report(title="Run & report", metrics=metrics, searches=searches,
                         notes=["gamma tuned on <val>"], thumbnail=thumbs.get)
    assert "ProtoNet &lt;v2&gt;" in html and "<v2>" not in html
    assert "Run &amp; report" in html
    assert "gamma tuned on &lt;val&gt;" in html
    # ZSL 100.0%, GZSL S/U/H 100.0/0.0/0.0, calibrated 50.0/100.0/66.7 at gamma 0.3, AUSUC 50.0
    row = re.search(r"<tr><th>ProtoNet &lt;v2&gt;</th>(.*?)</tr>", html).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells == ["100.0%", "100.0%", "0.0%", "0.0%", "50.0%", "100.0%", "66.7%", "0.3", "50.0%"]
    # curve + per-class + confusion plots + one thumbnail, all embedded PNGs
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 4
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in imgs)
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "imgs/&lt;b&gt;.jpg" in html  # no thumbnail -> escaped uri text
    assert "0.912" in html and "zebra" in html
    assert "http://" not in html and "https://" not in html  # nothing external


def test_render_report_reports_nan_as_na_and_tolerates_broken_thumbnails():
    m = evaluate_scores(SCORES[2:], np.array([2, 3]), class_names=list("abcd"), seen_idx=[0, 1],
                        unseen_idx=[2, 3], gamma=0.3)

    def broken(uri):
        raise OSError(uri)

    html = render_report(title="t", metrics={"m": m},
                         searches=[{"query": "q", "hits": [{"uri": "x.jpg", "score": 1.0}]}],
                         thumbnail=broken)
    assert "n/a" in html and "x.jpg" in html


def test_plots_return_png_bytes():
    assert plot_per_class_accuracy({"a": 0.5, "b": 1.0}, unseen={"b"}, title="t").startswith(PNG_MAGIC)
    assert plot_seen_unseen_curve({"m": ([0.0, 1.0], [1.0, 0.0])}, title="t").startswith(PNG_MAGIC)
    assert plot_confusion(np.eye(2), ["a", "b"], title="t").startswith(PNG_MAGIC)
    with pytest.raises(ValueError):
        plot_confusion(np.eye(2), ["a"], title="t")


def test_write_report_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "report.html"
    write_report(str(target), "<html>one</html>")
    write_report(str(target), "<html>two</html>")
    assert target.read_text(encoding="utf-8") == "<html>two</html>"
    assert os.listdir(target.parent) == ["report.html"]


def test_write_report_cleans_up_on_failure(tmp_path):
    target = tmp_path / "report.html"
    target.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        write_report(str(target), "<html></html>")
    assert sorted(os.listdir(tmp_path)) == ["report.html"]


def test_default_thumbnail_local_file_tar_member_and_failures(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    img.write_bytes(_png_bytes((300, 150)))
    thumb = default_thumbnail(str(img), size=64)
    assert thumb is not None and thumb.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(thumb)).size == (64, 32)

    shard = tmp_path / "shard-000.tar"
    jpg = _png_bytes((50, 80), fmt="JPEG")
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("key1.jpg")
        info.size = len(jpg)
        tar.addfile(info, io.BytesIO(jpg))
    t = default_thumbnail(f"{shard}::key1.jpg")
    assert t is not None and Image.open(io.BytesIO(t)).size == (50, 80)  # never upscaled

    assert default_thumbnail(f"{shard}::missing.jpg") is None
    assert default_thumbnail(str(tmp_path / "nope.jpg")) is None
    assert default_thumbnail(str(tmp_path / "x.parquet") + "::row=12") is None
