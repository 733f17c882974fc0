"""Captioned image corpora built from what the package registries install, for fitting bridges.

**Open Clip Art** (Debian ``openclipart-png`` + ``openclipart-svg``, public domain): ~8,100 drawings;
each PNG's caption is its SVG's ``dc:title`` followed by its first ``dc:subject`` keywords
(placeholders such as ``unsorted`` dropped), e.g. ``"Chemistry Flask: chemistry, science,
apparatus, symbols"``. :func:`write_openclipart_corpus` writes Parquet shards (``image`` PNG bytes,
``caption``, ``key``, ``url`` = the PNG's path, ``category``) that ``zsl extract`` reads like any
Parquet input (huge or broken PNGs, some over 100 M pixels, become its error rows, as any hostile
input does). The corpus directory follows the resume protocol (shards written atomically, a rerun
writes only missing ones).
"""

from __future__ import annotations

import html
import logging
import os
import re
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq

LOG = logging.getLogger(__name__)

__all__ = ["OPENCLIPART_ROOT", "openclipart_items", "openclipart_caption", "write_openclipart_corpus",
           "CORPUS_SCHEMA"]

OPENCLIPART_ROOT = "/usr/share/openclipart"
CORPUS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("caption", pa.string()),
    pa.field("url", pa.string(), nullable=False),
    pa.field("category", pa.string()),
])
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)
_PLACEHOLDER = {"", "unsorted", "clip art", "clipart", "image", "media", "public domain", "svg", "png"}


def openclipart_caption(svg_text: str, *, max_keywords: int = 5) -> str | None:
    """``"Title: kw1, kw2, ..."`` from an SVG's Dublin Core metadata (None without title or keywords)."""
    m = _TITLE.search(svg_text)
    title = " ".join(html.unescape(m.group(1)).split()) if m else ""
    kws: list[str] = []
    s = _SUBJECT.search(svg_text)
    for k in _LI.findall(s.group(1)) if s else []:
        k = " ".join(html.unescape(k).split()).strip(" ,;")
        if k.lower() not in _PLACEHOLDER and k.lower() != title.lower() and k.lower() not in {x.lower() for x in kws}:
            kws.append(k)
        if len(kws) == max_keywords:
            break
    if not title and not kws:
        return None
    return f"{title}: {', '.join(kws)}" if title and kws else title or ", ".join(kws)


def openclipart_items(root: str = OPENCLIPART_ROOT) -> list[tuple[str, str, str]]:
    """Sorted ``(key, png_path, svg_path)`` of every drawing with both files installed."""
    svg_root, png_root = os.path.join(root, "svg"), os.path.join(root, "png")
    if not os.path.isdir(svg_root) or not os.path.isdir(png_root):
        raise FileNotFoundError(f"{root}: no svg/ and png/ folders; install Debian's openclipart-svg and "
                                "openclipart-png (apt-get install openclipart-svg openclipart-png)")
    out = []
    for dirpath, _, files in os.walk(svg_root):
        for f in files:
            if not f.endswith(".svg"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), svg_root)[: -len(".svg")]
            png = os.path.join(png_root, rel + ".png")
            if os.path.exists(png):
                out.append((rel, png, os.path.join(svg_root, rel + ".svg")))
    return sorted(out)


def _records(items: list[tuple[str, str, str]]) -> Iterator[dict]:
    for key, png, svg in items:
        with open(svg, "rb") as fh:
            text = fh.read().decode("utf-8", "replace")
        with open(png, "rb") as fh:
            data = fh.read()
        yield {"key": key, "image": data, "caption": openclipart_caption(text), "url": png,
               "category": key.split("/", 1)[0] if "/" in key else None}


def write_openclipart_corpus(out: str, *, root: str = OPENCLIPART_ROOT, limit: int | None = None, seed: int = 0,
                             shard_rows: int = 1000, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the Open Clip Art corpus (all drawings, or a seeded sample of ``limit``) as Parquet shards."""
    from tqdm.auto import tqdm

    from pipeline.core.resume import OutputDir
    from pipeline.core.manifests import CorpusManifest

    items = openclipart_items(root)
    if limit is not None and limit < len(items):
        pick = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
        items = [items[i] for i in pick]
    identity = {"source": "openclipart", "root": root, "keys": zio.fingerprint([k for k, _, _ in items])}
    with OutputDir(out, job="corpus", identity=identity, overwrite=overwrite, owned=("shards",)) as od:
        n_shards = -(-len(items) // shard_rows)
        todo = [i for i in range(n_shards) if not zio.exists(od.join("shards", f"corpus-{i:05d}.parquet"))]
        if todo:
            od.begin()
        n_caps = 0
        for i in tqdm(range(n_shards), desc="corpus", unit="shard", disable=not progress):
            part = items[i * shard_rows:(i + 1) * shard_rows]
            if i in todo:
                rows = list(_records(part))
                zpq.write_parquet_atomic(od.join("shards", f"corpus-{i:05d}.parquet"),
                                         pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA))
                n_caps += sum(r["caption"] is not None for r in rows)
            else:
                n_caps += sum(v is not None for v in zpq.read_parquet(
                    od.join("shards", f"corpus-{i:05d}.parquet"), columns=["caption"]).column("caption").to_pylist())
        manifest = CorpusManifest(source="openclipart", root=root, n_images=len(items), n_captions=n_caps,
                                  n_shards=n_shards, limit=limit, seed=seed,
                                  license="public domain (Open Clip Art Library, Debian openclipart-png/-svg)")
        od.finish(manifest)
    LOG.info("Open Clip Art corpus: %d drawings, %d with captions -> %s", len(items), n_caps, out)
    return manifest.to_json()
