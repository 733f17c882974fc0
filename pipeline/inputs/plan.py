"""Growth-safe shard plans: what each shard id of an extraction holds, kept with its output.

An input is listed afresh on every run (:func:`pipeline.inputs.registry.list_shards`, sorted), but shard ids
are not taken from that listing once an output exists: the output keeps the *plan* it was made from
(``plan.parquet``: one row per shard, its spec and the sizes of its items), and a rerun only appends to it.

* **Items** are what a shard is made of: the member files of a folder shard, the tar (or img2dataset
  folder) of a tar / files shard, ``file#row group`` of a Parquet shard (:func:`shard_items`).
* Items not in any recorded shard become **new shards**, with ids after the highest recorded one, whatever
  their names sort as (a new class folder ``cat/`` before ``dog/``, files between old ones, img2dataset
  shards arriving out of order); folder items are grouped ``shard_size`` to a shard, in listing order.
* Recorded shards never change: their ids and rows stay as extracted. Items that are no longer listed are
  **vanished**; items whose size changed are **changed**. Both are reported (:class:`PlanUpdate`), never
  re-extracted under their old ids (a changed file needs a new name, or ``--overwrite`` to start afresh).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.inputs.base import Shard

LOG = logging.getLogger(__name__)

__all__ = ["PLAN_FILE", "PlanUpdate", "shard_items", "item_file", "read_plan", "write_plan", "grow_plan",
           "item_sizes"]

PLAN_FILE = "plan.parquet"
_SCHEMA = pa.schema([("shard_id", pa.int64()), ("spec", pa.string()), ("items", pa.list_(pa.string())),
                     ("sizes", pa.list_(pa.int64()))])


def shard_items(shard: Shard) -> list[str]:
    """The items a shard is made of (see the module docstring)."""
    if shard.members:
        return list(shard.members)
    if shard.kind == "parquet":
        return [f"{shard.source}#{shard.row_group}"]
    return [shard.source]


def item_file(item: str) -> str:
    """The file an item lives in (a Parquet item's file without its ``#row group``)."""
    head, sep, tail = item.rpartition("#")
    return head if sep and tail.isdigit() else item


def item_sizes(items: list[str]) -> dict[str, int]:
    """Size in bytes of each item's file (-1 where it cannot be read), by one detailed listing per folder."""
    out: dict[str, int] = {}
    by_dir: dict[str, list[str]] = {}
    for it in items:
        f = item_file(it)
        by_dir.setdefault(f.rsplit("/", 1)[0] if "/" in f else f, []).append(it)
    for folder, its in by_dir.items():
        fs, path = zio.filesystem(folder)
        try:
            entries = fs.ls(path, detail=True)
        except (OSError, ValueError):
            entries = []
        listing = {e["name"].rstrip("/"): e for e in entries}
        for it in its:
            f = item_file(it)
            d = listing.get(zio.filesystem(f)[1].rstrip("/"))
            size = d.get("size") if d is not None else None
            out[it] = int(size) if isinstance(size, (int, float)) and d.get("type", "file") == "file" else -1
    return out


def read_plan(uri: str) -> list[tuple[Shard, list[str], list[int]]] | None:
    """The recorded plan of an extraction output (None: none recorded): ``(shard, items, sizes)`` by id."""
    path = zio.join(uri, PLAN_FILE)
    if not zio.exists(path):
        return None
    t = zpq.read_parquet(path)
    rows = zip(t.column("spec").to_pylist(), t.column("items").to_pylist(), t.column("sizes").to_pylist())
    return sorted(((Shard.from_json(s), list(i), list(z)) for s, i, z in rows), key=lambda r: r[0].shard_id)


def write_plan(uri: str, plan: list[tuple[Shard, list[str], list[int]]]) -> None:
    """Write the plan atomically (the whole table: it only ever grows)."""
    table = pa.table({"shard_id": [s.shard_id for s, _, _ in plan], "spec": [s.to_json() for s, _, _ in plan],
                      "items": [i for _, i, _ in plan], "sizes": [z for _, _, z in plan]}, schema=_SCHEMA)
    zpq.write_parquet_atomic(zio.join(uri, PLAN_FILE), table)


@dataclass
class PlanUpdate:
    """A recorded plan brought up to date with a fresh listing."""

    plan: list[tuple[Shard, list[str], list[int]]]  #: every shard, recorded ones first, new ones after
    new: list[Shard] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def shards(self) -> list[Shard]:
        return [s for s, _, _ in self.plan]


def grow_plan(recorded: list[tuple[Shard, list[str], list[int]]] | None, fresh: list[Shard], *,
              shard_size: int) -> PlanUpdate:
    """``recorded`` (None: a new output) grown by the items of ``fresh`` it lacks (see the module docstring).

    >>> a = [Shard(0, "folder", "/in", ("/in/dog/1.png", "/in/dog/2.png"), root="/in")]
    >>> b = [Shard(0, "folder", "/in", ("/in/cat/1.png", "/in/dog/1.png"), root="/in"),
    ...      Shard(1, "folder", "/in", ("/in/dog/2.png",), root="/in")]
    >>> up = grow_plan([(a[0], list(a[0].members), [-1, -1])], b, shard_size=2)
    >>> [(s.shard_id, s.members) for s in up.shards]
    [(0, ('/in/dog/1.png', '/in/dog/2.png')), (1, ('/in/cat/1.png',))]
    """
    recorded = list(recorded or [])
    known = {it: (s.shard_id, z) for s, its, zs in recorded for it, z in zip(its, zs)}
    fresh_items = {it: s for s in fresh for it in shard_items(s)}
    sizes = item_sizes([it for it in fresh_items if it not in known] +
                       [it for it in fresh_items if it in known and known[it][1] >= 0])
    next_id = max((s.shard_id for s, _, _ in recorded), default=-1) + 1
    plan, new = list(recorded), []
    pending: dict[tuple, list[str]] = {}  # folder items waiting to be grouped, by (kind, source, root)
    for s in fresh:
        items = [it for it in shard_items(s) if it not in known]
        if not items:
            continue
        if s.members:
            pending.setdefault((s.kind, s.source, s.root), []).extend(items)
            continue
        shard = Shard(next_id, s.kind, s.source, (), s.row_group, s.root)
        next_id += 1
        plan.append((shard, items, [sizes.get(it, -1) for it in items]))
        new.append(shard)
    for (kind, source, root), items in pending.items():
        for i in range(0, len(items), shard_size):
            chunk = items[i:i + shard_size]
            shard = Shard(next_id, kind, source, tuple(chunk), 0, root)
            next_id += 1
            plan.append((shard, chunk, [sizes.get(it, -1) for it in chunk]))
            new.append(shard)
    vanished = sorted(it for it in known if it not in fresh_items)
    changed = sorted(it for it, (_, z) in known.items() if it in fresh_items and z >= 0
                     and sizes.get(it, -1) >= 0 and sizes[it] != z)
    return PlanUpdate(plan=plan, new=new, vanished=vanished, changed=changed)
