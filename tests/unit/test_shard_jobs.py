"""pipeline.cluster.shard_jobs.map_shards: the one per-shard loop of `zsl label` and `zsl index`, here
(in-process, in order) or on Ray with an address (dispatch checked here; the real cluster run is
tests/jobs/test_cluster.py)."""

from __future__ import annotations

from functools import partial

from pipeline.cluster import shard_jobs


class _Upper:
    made: list[str] = []

    def __init__(self, tag: str) -> None:
        self.tag = tag
        _Upper.made.append(tag)

    def __call__(self, item: str) -> dict:
        return {"item": item.upper(), "by": self.tag}


def test_here_one_worker_runs_every_item_in_order(monkeypatch):
    monkeypatch.setattr(shard_jobs, "run_shard_jobs", None)  # never reached without an address
    _Upper.made = []
    out = shard_jobs.map_shards(["a", "b", "c"], partial(_Upper, "factory"), address=None, what="test")
    assert out == [{"item": "A", "by": "factory"}, {"item": "B", "by": "factory"}, {"item": "C", "by": "factory"}]
    # `local` (a model already loaded here) is used instead of the picklable factory
    out = shard_jobs.map_shards(["x"], partial(_Upper, "factory"), address=None, what="test", progress=True,
                                local=partial(_Upper, "local"))
    assert out == [{"item": "X", "by": "local"}] and _Upper.made == ["factory", "local"]
    assert shard_jobs.map_shards([], partial(_Upper, "factory"), address=None, what="test") == []
    assert _Upper.made == ["factory", "local"]  # no items: no worker built


def test_with_an_address_the_items_go_to_ray(monkeypatch):
    calls = []

    def fake(items, factory, *, address, num_workers, what):
        calls.append((items, factory, address, num_workers, what))
        return [{"item": i} for i in items]

    monkeypatch.setattr(shard_jobs, "run_shard_jobs", fake)
    factory = partial(_Upper, "factory")
    out = shard_jobs.map_shards(["a", "b"], factory, address="ray://head:10001", what="label shards", num_workers=3,
                                local=partial(_Upper, "local"))
    assert out == [{"item": "a"}, {"item": "b"}]
    assert calls == [(["a", "b"], factory, "ray://head:10001", 3, "label shards")]
