"""The input layouts, and the four calls that dispatch to them: what an input is
(:func:`describe_input`, :func:`detect_format`), its shards (:func:`list_shards`) and one shard's
records (:func:`read_shard`).

Four layouts are supported, local or on any fsspec filesystem, one module each (a new layout is
one module implementing :class:`~pipeline.inputs.base.Layout` and one line of :data:`LAYOUTS`):

* **webdataset** (:mod:`~pipeline.inputs.webdataset`) — ``.tar`` shards, one tar a shard;
* **files** (:mod:`~pipeline.inputs.img2dataset`) — img2dataset's ``NNNNN/`` folders with sidecars;
* **parquet** (:mod:`~pipeline.inputs.parquet`) — image bytes in Parquet, one row group a shard;
* **folder** (:mod:`~pipeline.inputs.folder`) — image files, a first-level sub-folder names the label.

``auto`` tells them apart from the file names (and, for Parquet, its schema), trying them in that
order, and says why it chose one. img2dataset's rows keep ``url``, ``key`` and the rest of their
metadata (``Record.meta``); rows it marked failed come back as errors with its ``error_message``.
Inputs may be brace patterns (``shards/{00000..00099}.tar``).

Shard ids follow the sorted listing, so the same input always gives the same shards and a rerun
maps each shard to the same output file. Readers never raise for a broken item: it comes back as a
:class:`~pipeline.inputs.base.Record` with ``error`` set (a whole shard that cannot be opened
raises, and the decode task turns that into one error row).
"""

from __future__ import annotations

import logging
from typing import Iterator

from pipeline.inputs import folder, img2dataset, parquet, webdataset
from pipeline.inputs.base import Layout, Record, Shard, list_input

LOG = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "layout", "describe_input", "detect_format", "list_shards", "read_shard"]

#: every input layout, in the order ``auto`` tries them (the first whose ``detect`` answers wins)
LAYOUTS: tuple[Layout, ...] = (
    webdataset,
    img2dataset,
    parquet,
    folder,
)


def layout(*, name: str | None = None, kind: str | None = None) -> Layout:
    """The layout called ``name`` (an ``input_format``), or the one whose shards are of ``kind``.

    >>> layout(name="webdataset").kind, layout(kind="files").name
    ('tar', 'files')
    """
    for lay in LAYOUTS:
        if (name is not None and lay.name == name) or (kind is not None and lay.kind == kind):
            return lay
    if name is not None:
        names = [lay.name for lay in LAYOUTS]
        raise ValueError(f"unknown input format {name!r}; use {', '.join(names[:-1])} or {names[-1]}")
    raise ValueError(f"unknown shard kind {kind!r}")


def describe_input(uri: str, image_column: str = "auto") -> tuple[str, str]:
    """``(format, why)``: which layout ``uri`` holds, recognised from its file names (and, for
    Parquet, its schema): img2dataset's three outputs, Parquet with image bytes, or image folders."""
    files = list_input(uri)
    if not files:
        raise ValueError(f"{uri}: no input files found")
    for lay in LAYOUTS:
        why = lay.detect(files, image_column=image_column)
        if why is not None:
            return lay.name, why
    raise ValueError(f"{uri}: found no images, .tar shards or .parquet files")


def detect_format(uri: str) -> str:
    """The input layout of ``uri`` (see :func:`describe_input`)."""
    return describe_input(uri)[0]


def list_shards(
    uri: str, *, input_format: str = "auto", shard_size: int = 256, image_column: str = "auto"
) -> list[Shard]:
    """List the shards of an input, in a deterministic order.

    Raises ``FileNotFoundError`` for a missing input and ``ValueError`` for an input that cannot
    be used at all (no images, Parquet without the image column), before any work starts.
    """
    fmt = describe_input(uri, image_column)[0] if input_format == "auto" else input_format
    return layout(name=fmt).list_shards(uri, shard_size=shard_size, image_column=image_column)


def read_shard(
    shard: Shard, *, image_column: str = "auto", label_column: str = "label", label_field: str | None = None
) -> Iterator[Record]:
    """Yield the raw records of one shard. Unreadable items come back with ``error`` set.

    ``label_field``: the json key (files, webdataset) or column (parquet) holding the label; the
    ``files`` layout has labels only from it."""
    yield from layout(kind=shard.kind).read(shard, image_column=image_column, label_column=label_column,
                                            label_field=label_field)
