"""What a ``zsl run`` did: ``runs/<run id>/record.json`` and a self-contained ``report.html`` beside it.

The record lists, per stage: what it found new, what it did, counts, failed items with their reasons,
seconds and the driver's peak RSS. The report shows the same as a page (no network needed: styles
inline, thumbnails as data URIs), the label diff of a relabel per class (how many images moved from
which label to which, with example thumbnails: the review step of dataset expansion), and links to the
previous run's report; ``runs/index.html`` lists every run kept.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core import fs as zio

LOG = logging.getLogger(__name__)

__all__ = ["RunRecord", "StageRecord", "write_run", "run_ids", "render_report", "RECORD_FILE", "REPORT_FILE"]

RECORD_FILE, REPORT_FILE, INDEX_FILE = "record.json", "report.html", "index.html"
#: label-diff pairs shown with thumbnails, and examples per pair
DIFF_PAIRS, DIFF_EXAMPLES, THUMB_PX = 12, 6, 96
#: at most this long making thumbnails for one report (images in remote tars can be slow to reach)
THUMB_SECONDS = 20
#: larger source images get no thumbnail
THUMB_MAX_BYTES = 32 << 20


@dataclass
class StageRecord:
    """One stage of a run: ``status`` is done (it changed its output), nothing new, skipped or failed."""

    name: str
    status: str = "done"
    found: str = ""
    did: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    peak_rss_mb: float | None = None


@dataclass
class RunRecord:
    """One run of a pipeline (``status``: running, done, done with failed items, bad input, failed, locked)."""

    run_id: str
    pipeline: str
    root: str
    spec: str | None
    spec_fingerprint: str
    started: str
    host: str
    pid: int
    status: str = "running"
    exit_code: int | None = None
    message: str = ""
    finished: str | None = None
    seconds: float | None = None
    previous: str | None = None
    stages: list[StageRecord] = field(default_factory=list)

    @classmethod
    def start(cls, cfg, *, spec: str | None) -> "RunRecord":
        now = _dt.datetime.now(_dt.timezone.utc)
        return cls(run_id=now.strftime("%Y%m%dT%H%M%S.%fZ"), pipeline=cfg.name, root=cfg.root, spec=spec,
                   spec_fingerprint=zio.fingerprint(cfg.model_dump(mode="json")),
                   started=now.isoformat(timespec="seconds"), host=socket.gethostname(), pid=os.getpid())

    def finish(self, status: str, code: int, message: str = "") -> None:
        now = _dt.datetime.now(_dt.timezone.utc)
        self.status, self.exit_code, self.message = status, code, message
        self.finished = now.isoformat(timespec="seconds")
        self.seconds = round((now - _dt.datetime.fromisoformat(self.started)).total_seconds(), 2)

    def to_json(self) -> dict:
        return asdict(self)

    def failed_items(self) -> list[dict]:
        return [{"stage": s.name, **f} for s in self.stages for f in s.failed]


def write_run(runs_dir: str, rec: RunRecord, *, final: bool, keep: int | None = None) -> str:
    """Write ``runs/<id>/record.json`` (and, when ``final``, ``report.html`` and ``runs/index.html``); the
    run's folder. ``keep``: the newest runs kept (older folders removed)."""
    where = zio.join(runs_dir, rec.run_id)
    zio.makedirs(where)
    zio.write_json_atomic(zio.join(where, RECORD_FILE), rec.to_json())
    if final:
        zio.write_bytes_atomic(zio.join(where, REPORT_FILE), render_report(rec, runs_dir).encode())
        if keep is not None:
            _prune(runs_dir, keep)
        zio.write_bytes_atomic(zio.join(runs_dir, INDEX_FILE), _render_index(runs_dir).encode())
    return where


def run_ids(runs_dir: str) -> list[str]:
    """The ids of the runs recorded under ``runs_dir``, oldest first."""
    if not zio.is_local(runs_dir) or not os.path.isdir(runs_dir):
        return []
    return sorted(d for d in os.listdir(runs_dir) if os.path.isfile(os.path.join(runs_dir, d, RECORD_FILE)))


def _prune(runs_dir: str, keep: int) -> None:
    for old in run_ids(runs_dir)[:-keep]:
        shutil.rmtree(os.path.join(runs_dir, old), ignore_errors=True)


# -- HTML ----------------------------------------------------------------------------------------------
_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
.done{color:#0a6}.failed,.bad{color:#c00}.nothing{color:#777}.skipped{color:#999}.partial{color:#b60}
.thumbs img{width:72px;height:72px;object-fit:cover;margin:2px;border:1px solid #ccc}
code{background:#f4f4f4;padding:1px 4px}.muted{color:#777}"""
_STATUS_CLASS = {"done": "done", "nothing new": "nothing", "skipped": "skipped", "failed": "failed",
                 "done with failed items": "partial", "bad input": "bad", "running": "nothing", "locked": "bad"}


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def render_report(rec: RunRecord, runs_dir: str) -> str:
    """The run's report page (self-contained)."""
    cls = _STATUS_CLASS.get(rec.status, "")
    prev = (f'<a href="../{_e(rec.previous)}/{REPORT_FILE}">previous run ({_e(rec.previous)})</a>'
            if rec.previous else "first run")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>zsl run {_e(rec.pipeline)} {_e(rec.run_id)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>zsl run <code>{_e(rec.pipeline)}</code> — <span class='{cls}'>{_e(rec.status)}</span> "
             f"(exit {_e(rec.exit_code)})</h1>",
             f"<p>run {_e(rec.run_id)} on {_e(rec.host)}, started {_e(rec.started)}, {_e(rec.seconds)} s; "
             f"spec <code>{_e(rec.spec)}</code>; root <code>{_e(rec.root)}</code>. {prev} · "
             f"<a href='../{INDEX_FILE}'>all runs</a></p>"]
    if rec.message:
        parts.append(f"<p class='{cls}'>{_e(rec.message)}</p>")
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>found</th><th>did</th><th>counts</th>"
                 "<th>failed</th><th>s</th><th>peak RSS MB</th></tr>")
    for s in rec.stages:
        counts = ", ".join(f"{k} {v}" for k, v in s.counts.items())
        notes = "".join(f"<br><span class='muted'>{_e(n)}</span>" for n in s.notes)
        err = f"<br><span class='failed'>{_e(s.error)}</span>" if s.error else ""
        parts.append(f"<tr><td>{_e(s.name)}</td><td class='{_STATUS_CLASS.get(s.status, '')}'>{_e(s.status)}</td>"
                     f"<td>{_e(s.found)}</td><td>{_e(s.did)}{notes}{err}</td><td>{_e(counts)}</td>"
                     f"<td>{len(s.failed)}</td><td>{_e(s.seconds)}</td><td>{_e(s.peak_rss_mb)}</td></tr>")
    parts.append("</table><p class='muted'>Peak RSS: the driver process during the stage (Ray workers apart).</p>")
    failed = rec.failed_items()
    if failed:
        parts.append(f"<h2>Failed items ({len(failed)}; the next run retries failed shards)</h2><table>"
                     "<tr><th>stage</th><th>item</th><th>reason</th></tr>")
        parts += [f"<tr><td>{_e(f['stage'])}</td><td>{_e(f.get('item'))}</td><td>{_e(f.get('reason'))}</td></tr>"
                  for f in failed[:500]]
        parts.append("</table>")
    for s in rec.stages:
        if s.name == "classes" and (s.details.get("added") or s.details.get("removed")):
            parts.append(f"<h2>Classes</h2><p>added: {_e(', '.join(s.details.get('added', [])) or '—')}; "
                         f"removed: {_e(', '.join(s.details.get('removed', [])) or '—')}</p>")
        if s.name == "label" and s.details.get("diff"):
            parts.append(_render_diff(s.details["diff"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def _render_diff(diff: dict) -> str:
    """Per (old label -> new label): how many images moved, with example thumbnails."""
    pairs = diff.get("pairs") or []
    out = [f"<h2>Label changes ({_e(diff.get('moved'))} of {_e(diff.get('compared'))} images changed label)</h2>"]
    if diff.get("changed"):
        out.append(f"<p>because: {_e(diff['changed'])}</p>")
    if diff.get("dir"):
        out.append(f"<p>diff table: <code>{_e(diff['dir'])}</code> (Parquet: image, old label, new label, "
                   "old and new score)</p>")
    if not pairs:
        return "\n".join(out + ["<p class='muted'>no image changed label</p>"])
    examples = _diff_examples(diff.get("dir"), pairs[:DIFF_PAIRS])
    out.append("<table><tr><th>from</th><th>to</th><th>images</th><th>examples</th></tr>")
    for p in pairs:
        key = (p.get("old"), p.get("new"))
        thumbs = "".join(f"<img title='{_e(t)}' alt='{_e(t)}' src='{src}'>" for t, src in examples.get(key, []))
        out.append(f"<tr><td>{_e(p.get('old'))}</td><td>{_e(p.get('new'))}</td><td>{_e(p.get('n'))}</td>"
                   f"<td class='thumbs'>{thumbs}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _diff_examples(diff_dir: str | None, pairs: list[dict]) -> dict[tuple, list[tuple[str, str]]]:
    """A few example thumbnails (data URIs) for each (old, new) pair, read from the diff table's uris."""
    if not diff_dir or not zio.exists(diff_dir):
        return {}
    from pipeline.core import parquet as zpq

    wanted = {(p.get("old"), p.get("new")) for p in pairs}
    out: dict[tuple, list[tuple[str, str]]] = {}
    tries: dict[tuple, int] = {}
    deadline = time.monotonic() + THUMB_SECONDS
    try:
        for f in sorted(zpq.iter_parquet_files(diff_dir)):
            t = zpq.read_parquet(f, columns=["image_id", "uri", "old_label", "new_label"])
            for iid, uri, old, new in zip(*(t.column(c).to_pylist() for c in t.column_names)):
                key = (old, new)
                if key not in wanted or tries.get(key, 0) >= 2 * DIFF_EXAMPLES or \
                        len(out.get(key, [])) >= DIFF_EXAMPLES:
                    continue
                tries[key] = tries.get(key, 0) + 1  # unreadable images are not tried for every row
                src = _thumbnail(uri)
                if src:
                    out.setdefault(key, []).append((iid, src))
                if time.monotonic() > deadline:
                    LOG.info("label diff thumbnails: stopped after %d s", THUMB_SECONDS)
                    return out
            if all(len(out.get(k, [])) >= DIFF_EXAMPLES or tries.get(k, 0) >= 2 * DIFF_EXAMPLES for k in wanted):
                break
    except Exception as exc:  # noqa: BLE001 - the report goes on without thumbnails
        LOG.warning("label diff thumbnails left out: %s: %s", type(exc).__name__, exc)
    return out


def _thumbnail(uri: str | None) -> str | None:
    """A small JPEG of the image at ``uri`` as a data URI, or None where it cannot be read."""
    if not uri:
        return None
    try:
        from PIL import Image

        from pipeline.inputs.images import decode_image

        data = _read_source(uri)
        if data is None:
            return None
        px, _, _ = decode_image(data, size=THUMB_PX, max_pixels=50_000_000)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001 - a moved or unreadable image has no thumbnail
        return None


def _read_source(uri: str) -> bytes | None:
    """The bytes of an image file or of a tar member (``a.tar::member``, as webdataset inputs name their
    images); None when larger than :data:`THUMB_MAX_BYTES`."""
    import tarfile

    container, _, member = uri.partition("::")
    fs, path = zio.filesystem(container)
    with fs.open(path, "rb") as fh:
        if not member:
            data = fh.read(THUMB_MAX_BYTES + 1)
            return data if len(data) <= THUMB_MAX_BYTES else None
        with tarfile.open(fileobj=fh, mode="r|*") as tar:  # streamed: read up to the member only
            for info in tar:
                if info.name == member:
                    if not info.isfile() or info.size > THUMB_MAX_BYTES:
                        return None
                    return tar.extractfile(info).read()
    return None


def _render_index(runs_dir: str) -> str:
    rows = []
    for rid in reversed(run_ids(runs_dir)):
        try:
            r = zio.read_json(zio.join(runs_dir, rid, RECORD_FILE))
        except Exception:  # noqa: BLE001
            continue
        did = "; ".join(f"{s['name']}: {s.get('did') or s.get('status')}" for s in r.get("stages", [])
                        if s.get("status") in ("done", "failed"))
        rows.append(f"<tr><td><a href='{_e(rid)}/{REPORT_FILE}'>{_e(rid)}</a></td>"
                    f"<td class='{_STATUS_CLASS.get(r.get('status'), '')}'>{_e(r.get('status'))}</td>"
                    f"<td>{_e(r.get('exit_code'))}</td><td>{_e(r.get('seconds'))}</td><td>{_e(did or 'nothing new')}</td></tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>zsl runs</title><style>{_CSS}</style></head>"
            "<body><h1>zsl runs</h1><table><tr><th>run</th><th>status</th><th>exit</th><th>s</th><th>changes</th></tr>"
            + "\n".join(rows) + "</table></body></html>")
