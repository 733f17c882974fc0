"""Self-contained HTML evaluation report: metrics table, plots and search galleries.

Every image is embedded as a base64 data URI, so the page is one file with no external resources.
All text coming from data (method names, class names, queries, URIs, labels) is HTML-escaped.
Plots use matplotlib's object-oriented ``Figure`` API rendered by the Agg canvas, which needs no
display and changes no global pyplot state; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import tarfile
from typing import Any, Callable, Iterable

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = [
    "plot_per_class_accuracy", "plot_seen_unseen_curve", "plot_confusion", "render_report",
    "write_report", "default_thumbnail", "metrics_by_name",
]

_SEEN_COLOUR, _UNSEEN_COLOUR = "#4c72b0", "#dd8452"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: matplotlib is heavy

    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def plot_per_class_accuracy(per_class: dict[str, float], *, unseen: set[str], title: str) -> bytes:
    """Horizontal bar chart of per-class accuracy (unseen classes in a second colour) as PNG."""
    names = sorted(per_class, key=lambda n: (n not in unseen, n))
    fig = _figure(7.0, min(max(2.0, 0.25 * len(names) + 1.0), 60.0))
    ax = fig.add_subplot()
    vals = [100.0 * float(per_class[n]) for n in names]
    colours = [_UNSEEN_COLOUR if n in unseen else _SEEN_COLOUR for n in names]
    ax.barh(range(len(names)), vals, color=colours)
    ax.set_yticks(range(len(names)), labels=names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 100), xlabel="top-1 accuracy (%)", title=title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=_SEEN_COLOUR, label="seen"),
                       Patch(color=_UNSEEN_COLOUR, label="unseen")], loc="lower right")
    if not names:
        ax.text(50, 0, "no classes", ha="center")
    return _png(fig)


def plot_seen_unseen_curve(curves: dict[str, tuple[list[float], list[float]]], *, title: str) -> bytes:
    """Seen (y) vs unseen (x) accuracy curves, one line per method, AUSUC in the legend, as PNG."""
    from pipeline.zsl.metrics import ausuc

    fig = _figure(5.5, 5.0)
    ax = fig.add_subplot()
    for name, (unseen_acc, seen_acc) in curves.items():
        u, s = np.asarray(unseen_acc, dtype=float), np.asarray(seen_acc, dtype=float)
        if u.size == 0:
            continue
        area = ausuc(s, u)
        order = np.argsort(u, kind="stable")
        ax.plot(100 * u[order], 100 * s[order], marker=".", markersize=3,
                label=f"{name} (AUSUC {_pct(area)})")
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="unseen accuracy (%)",
           ylabel="seen accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def plot_confusion(matrix: np.ndarray, labels: list[str], *, title: str) -> bytes:
    """Heat map of a (row-normalised) confusion matrix as PNG."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"matrix shape {m.shape} does not match {len(labels)} labels")
    side = min(max(4.0, 0.3 * len(labels) + 2.0), 40.0)
    fig = _figure(side, side)
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels=labels, rotation=90, fontsize=7)
    ax.set_yticks(ticks, labels=labels, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def _pct(v: Any, *, percent: bool = True) -> str:
    """``0.6667 -> '66.7%'`` (or ``'0.667'``); None/nan -> ``'n/a'``."""
    if v is None or math.isnan(float(v)):
        return "n/a"
    return f"{100.0 * float(v):.1f}%" if percent else f"{float(v):.3g}"


def _img(data: bytes, alt: str) -> str:
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:{mime};base64,{b64}" alt="{html.escape(alt)}">'


def _metrics_table(metrics: dict[str, dict]) -> str:
    head = ("<tr><th rowspan=2>method</th><th rowspan=2>ZSL unseen top-1</th>"
            "<th colspan=3>GZSL</th><th colspan=4>GZSL calibrated</th><th rowspan=2>AUSUC</th></tr>"
            "<tr><th>S</th><th>U</th><th>H</th><th>S</th><th>U</th><th>H</th><th>&gamma;</th></tr>")
    rows = []
    for name, m in metrics.items():
        g, c = m.get("gzsl", {}), m.get("gzsl_calibrated", {})
        cells = [_pct(m.get("zsl_unseen_top1")), _pct(g.get("seen")), _pct(g.get("unseen")),
                 _pct(g.get("H")), _pct(c.get("seen")), _pct(c.get("unseen")), _pct(c.get("H")),
                 _pct(c.get("gamma"), percent=False), _pct(m.get("ausuc"))]
        tds = "".join(f"<td>{html.escape(v)}</td>" for v in cells)
        rows.append(f"<tr><th>{html.escape(str(name))}</th>{tds}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _gallery(search: dict, thumbnail: Callable[[str], bytes | None] | None) -> str:
    items = []
    for hit in search.get("hits", []):
        uri = str(hit.get("uri", ""))
        data = None
        if thumbnail is not None:
            try:
                data = thumbnail(uri)
            except Exception:  # a broken thumbnail must not break the report
                LOG.debug("thumbnail failed for %s", uri, exc_info=True)
        body = _img(data, uri) if data else f'<div class="uri">{html.escape(uri)}</div>'
        label = hit.get("label")
        cap = f"{_pct(hit.get('score'), percent=False)} &middot; {html.escape(str(label)) if label else '&mdash;'}"
        items.append(f'<figure title="{html.escape(uri)}">{body}<figcaption>{cap}</figcaption></figure>')
    q = html.escape(str(search.get("query", "")))
    return f'<h3>&ldquo;{q}&rdquo;</h3><div class="gallery">{"".join(items) or "<p>no hits</p>"}</div>'


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
.gallery{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:120px;font-size:11px}
figure img{max-width:120px;max-height:120px}.uri{word-break:break-all;height:60px;overflow:hidden}"""


def render_report(
    *,
    title: str,
    metrics: dict[str, dict],
    searches: list[dict],
    notes: Iterable[str] = (),
    thumbnail: Callable[[str], bytes | None] | None = None,
) -> str:
    """Render one self-contained HTML page.

    Args:
        title: page title.
        metrics: method name -> dict from :func:`pipeline.zsl.metrics.evaluate_scores`. An optional
            ``"confusion": {"labels": [...], "matrix": [[...]]}`` entry adds a confusion plot.
        searches: ``{"query": str, "hits": [{"uri": str, "score": float, "label": str | None}]}``.
        notes: free-text lines shown under the title.
        thumbnail: ``uri -> PNG/JPEG bytes or None``; without it (or on None) the URI is shown.
    """
    t = html.escape(title)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{t}</title>"
             f"<style>{_CSS}</style></head><body><h1>{t}</h1>"]
    notes = list(notes)
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Metrics</h2>" + _metrics_table(metrics))
    curves = {name: (m["curve"]["unseen"], m["curve"]["seen"])
              for name, m in metrics.items() if m.get("curve")}
    if curves:
        png = plot_seen_unseen_curve(curves, title="seen-unseen accuracy curve")
        parts.append("<h2>Seen-unseen curve</h2>" + _img(png, "seen-unseen curve"))
    for name, m in metrics.items():
        per_class = m.get("per_class") or {}
        if per_class:
            png = plot_per_class_accuracy(per_class, unseen=set(m.get("unseen_classes", [])),
                                          title=f"{name}: per-class accuracy")
            parts.append(f"<h2>Per-class accuracy: {html.escape(str(name))}</h2>"
                         + _img(png, f"{name} per-class accuracy"))
        conf = m.get("confusion")
        if conf:
            png = plot_confusion(np.asarray(conf["matrix"]), [str(v) for v in conf["labels"]],
                                 title=f"{name}: confusion")
            parts.append(_img(png, f"{name} confusion"))
    if searches:
        parts.append("<h2>Searches</h2>" + "".join(_gallery(s, thumbnail) for s in searches))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path_or_uri: str, html: str) -> None:
    """Write ``html`` atomically (temp file + rename) to a local path or any fsspec URI."""
    from pipeline.core.fs import write_bytes_atomic

    write_bytes_atomic(str(path_or_uri), html.encode("utf-8"))


def _open_uri(uri: str):
    """Binary file object for a local path, ``file://`` URI or any fsspec URI."""
    if "://" in uri and not uri.startswith("file://"):
        import fsspec

        return fsspec.open(uri, "rb").open()
    return open(uri.removeprefix("file://"), "rb")


def default_thumbnail(uri: str, size: int = 96) -> bytes | None:
    """PNG thumbnail (at most ``size`` px a side) of an image path/URI or ``shard.tar::member``.

    Parquet row URIs (``file.parquet::row=N``) and any unreadable input give None.
    """
    if int(size) <= 0:
        raise ValueError(f"size must be > 0, got {size!r}")
    try:
        from PIL import Image

        if "::" in uri:
            container, member = uri.split("::", 1)
            if member.startswith("row=") or container.endswith(".parquet"):
                return None
            with _open_uri(container) as raw, tarfile.open(fileobj=raw) as tar:
                fh = tar.extractfile(member)
                if fh is None:
                    return None
                data = fh.read()
        else:
            with _open_uri(uri) as fh:
                data = fh.read()
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            im.thumbnail((int(size), int(size)))
            out = io.BytesIO()
            im.save(out, format="PNG")
            return out.getvalue()
    except Exception:
        LOG.debug("no thumbnail for %s", uri, exc_info=True)
        return None


def metrics_by_name(results: list[dict]) -> dict[str, dict]:
    """``{"method (semantics)": result}`` for :func:`render_report`, names made unique with primes."""
    out: dict[str, dict] = {}
    for r in results:
        name = f"{r['method']} ({r['semantics']})"
        while name in out:
            name += "'"
        out[name] = r
    return out
