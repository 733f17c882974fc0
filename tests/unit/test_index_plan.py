"""pipeline.index.plan and pipeline.index.choose without faiss: what a `zsl index` run decides to do
(build / add / retune / nothing) and why, from hand-made manifests; nothing here builds an index."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import IndexConfig
from pipeline.core.manifests import IndexManifest, IndexTuning
from pipeline.index.choose import estimate_memory
from pipeline.index.plan import IndexPlan, plan_index

ROOT = Path(__file__).resolve().parents[2]
DIM = 16
SHARD_ROWS = 1600


def _rows(n_shards: int, size: int = SHARD_ROWS) -> dict[str, int]:
    return {f"shard-{i:06d}.parquet": size for i in range(n_shards)}


def _cfg(**kw) -> IndexConfig:
    return IndexConfig(features="/f", model="/m", output=kw.pop("output", "/tmp/zsl-plan-out"), **kw)


def _tuning(cfg: IndexConfig, n_total: int, **kw) -> IndexTuning:
    """The tuning record a run with ``cfg`` leaves (what the plan compares the settings with)."""
    return IndexTuning(**{"params": "efSearch=32", "target_recall": cfg.target_recall,
                          "k": min(cfg.tune_k, 100, n_total), "max_query_ms": cfg.max_query_ms, "met_target": True,
                          "n_queries": min(cfg.tune_queries, n_total), "recall_at_1": 1.0, "recall_at_10": 0.99,
                          "latency_ms_mean": 0.1, "latency_ms_p99": 0.2, "batch_ms_per_query": 0.01,
                          "tried": [{"params": "efSearch=32"}], "seconds": 1.0, **kw})


def _done(cfg: IndexConfig, rows: dict[str, int], factory: str = "HNSW32,Flat", **kw) -> IndexManifest:
    n = sum(rows.values())
    return IndexManifest(**{"ntotal": n, "dim": DIM, "factory": factory, "index_bytes": 1, "sha256": "x",
                            "shards": list(rows), "tuning": _tuning(cfg, n), "train_rows": None, **kw})


def test_no_finished_index_builds_the_chosen_type():
    cfg = _cfg()
    p = plan_index(cfg, done=None, rows=_rows(5), dim=DIM)
    assert isinstance(p, IndexPlan) and p.action == "build" and p.build == "build" and not p.rebuild
    assert p.factory == "Flat" and p.n_total == 8000 and p.train_rows is None and p.partitions == 0
    assert p.shards == p.new_shards == tuple(_rows(5)) and p.estimated_bytes == estimate_memory("Flat", 8000, DIM)
    assert p.search_params is None and "building" in p.reason
    with pytest.raises(Exception):  # frozen
        p.action = "add"


def test_a_forced_factory_and_fixed_params_are_taken_as_given():
    p = plan_index(_cfg(index_factory="IVF16,Flat", nprobe=4), done=None, rows=_rows(5), dim=DIM)
    assert p.factory == "IVF16,Flat" and p.search_params == "nprobe=4" and p.train_rows == 8000
    assert plan_index(_cfg(search_params="efSearch=64"), done=None, rows=_rows(2), dim=DIM).search_params == \
        "efSearch=64"


def test_the_same_shards_and_settings_do_nothing():
    cfg = _cfg()
    p = plan_index(cfg, done=_done(cfg, _rows(3)), rows=_rows(3), dim=DIM)
    assert p.action == "nothing" and p.new_shards == () and "nothing to do" in p.reason
    one = _rows(1, size=1)  # a single vector: nothing to tune, so nothing to redo
    assert plan_index(_cfg(target_recall=0.5), done=_done(cfg, one, tuning=None), rows=one, dim=DIM).action == \
        "nothing"


def test_other_tuning_settings_retune_and_keep_the_index():
    cfg = _cfg()
    done = _done(cfg, _rows(3), train_rows=123)
    p = plan_index(_cfg(target_recall=0.99), done=done, rows=_rows(3), dim=DIM)
    assert p.action == p.build == "retune" and p.factory == "HNSW32,Flat" and p.new_shards == ()
    assert p.shards == tuple(_rows(3)) and p.train_rows == 123 and "tuning settings changed" in p.reason
    assert plan_index(_cfg(tune_queries=7), done=done, rows=_rows(3), dim=DIM).action == "retune"
    assert plan_index(_cfg(nprobe=3), done=done, rows=_rows(3), dim=DIM).action == "retune"


def test_new_shards_are_added_after_the_indexed_ones():
    cfg = _cfg()
    p = plan_index(cfg, done=_done(cfg, _rows(3), train_rows=7), rows=_rows(5), dim=DIM)
    assert p.action == p.build == "add" and not p.rebuild and p.factory == "HNSW32,Flat"
    assert p.new_shards == ("shard-000003.parquet", "shard-000004.parquet") and p.shards == tuple(_rows(5))
    assert p.n_total == 8000 and p.train_rows == 7 and "gained 2 shard(s)" in p.reason
    assert p.estimated_bytes == estimate_memory("HNSW32,Flat", 8000, DIM)


def test_indexed_shards_listed_in_another_order_keep_the_index_and_its_order():
    """A shard added after a later one (left out as unreadable, then readable again) stays where the
    index put it: the same shards in another order are the same index, with nothing to do."""
    cfg = _cfg()
    rows = _rows(3)
    done = _done(cfg, dict(reversed(list(rows.items()))))
    p = plan_index(cfg, done=done, rows=rows, dim=DIM)
    assert p.action == "nothing" and p.shards == tuple(done.shards) and "nothing to do" in p.reason
    p = plan_index(_cfg(target_recall=0.99), done=done, rows=rows, dim=DIM)
    assert p.action == "retune" and p.shards == tuple(done.shards)
    grown = {**rows, "shard-000009.parquet": 10}
    p = plan_index(cfg, done=done, rows=grown, dim=DIM)
    assert p.action == "add" and p.shards == (*done.shards, "shard-000009.parquet")


@pytest.mark.parametrize("change, why", [
    (lambda rows: (dict(list(rows.items())[1:]), {}), "1 indexed shard(s) are gone"),
    (lambda rows: ({**rows, "shard-000000.parquet": 5, "shard-000009.parquet": 10}, {}),
     "indexed shards changed size"),
    (lambda rows: ({**rows, "shard-000009.parquet": 10}, {"data_files": {"index.ivfdata": 9}}),
     "on-disk merged IVF index is rebuilt"),
])
def test_changed_features_rebuild_and_say_why(change, why):
    cfg = _cfg()
    rows = _rows(3)
    now, extra = change(rows)  # (a resize alone changes the features' identity: refused before planning)
    p = plan_index(cfg, done=_done(cfg, rows, **extra), rows=now, dim=DIM)
    assert p.action == "build" and p.rebuild and why in p.reason and p.new_shards == tuple(now)


def test_growth_beyond_the_budget_rebuilds_with_a_smaller_type():
    budget = estimate_memory("Flat", 2 * SHARD_ROWS, DIM) + 100  # Flat holds 2 shards, not 3
    cfg = _cfg(max_memory=str(budget))
    p = plan_index(cfg, done=_done(cfg, _rows(2), factory="Flat"), rows=_rows(3), dim=DIM)
    assert p.action == "build" and p.rebuild and p.factory != "Flat"
    assert f"can no longer hold {3 * SHARD_ROWS} vectors" in p.reason
    assert p.estimated_bytes <= budget


def test_partitions_only_for_ivf_on_several_shards_and_a_local_output():
    kw = dict(index_factory="IVF16,Flat")
    assert plan_index(_cfg(**kw, partitions=3), done=None, rows=_rows(5), dim=DIM).partitions == 3
    p = plan_index(_cfg(**kw, address="ray://x", num_workers=2), done=None, rows=_rows(5), dim=DIM)
    assert p.partitions == 2 and p.build == "partitions" and p.action == "build"
    assert plan_index(_cfg(**kw, address="ray://x"), done=None, rows=_rows(5), dim=DIM).partitions == 2  # 5 // 2
    assert plan_index(_cfg(**kw, partitions=9), done=None, rows=_rows(5), dim=DIM).partitions == 5  # one per file
    assert plan_index(_cfg(**kw, partitions=3), done=None, rows=_rows(1), dim=DIM).partitions == 0
    assert plan_index(_cfg(index_factory="HNSW32,Flat", partitions=3), done=None, rows=_rows(5),
                      dim=DIM).partitions == 0
    assert plan_index(_cfg(index_factory="OPQ4_16,IVF16,PQ4x8", partitions=2), done=None, rows=_rows(5),
                      dim=DIM).partitions == 2
    with pytest.raises(ValueError, match="merged into index.ivfdata on a local"):
        plan_index(_cfg(**kw, partitions=3, output="memory://zsl-plan/idx"), done=None, rows=_rows(5), dim=DIM)


def test_nothing_fits_the_budget():
    with pytest.raises(ValueError, match="needs at least"):
        plan_index(_cfg(max_memory="1K"), done=None, rows=_rows(5), dim=DIM)


def test_planning_and_choosing_never_import_faiss():
    """plan_index and choose_index run where faiss cannot be imported at all."""
    code = """
import sys
sys.modules["faiss"] = None  # any `import faiss` now raises ImportError
from pipeline.core.config import IndexConfig
from pipeline.core.units import parse_memory
from pipeline.index.choose import choose_index, estimate_memory, training_rows
from pipeline.index.plan import plan_index
assert choose_index(5_000_000, 512, max_memory_bytes=parse_memory("16G")) == "IVF8192_HNSW32,Flat"
assert training_rows("IVF4096,Flat", 10**7) == 262144 and estimate_memory("Flat", 10, 4) == 160
cfg = IndexConfig(features="/f", model="/m", output="/o", partitions=2)
p = plan_index(cfg, done=None, rows={"a": 30_000, "b": 30_000}, dim=64)
print(p.action, p.factory, p.partitions, sorted(m for m in sys.modules if "faiss" in m and sys.modules[m]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["build", "HNSW32,Flat", "0", "[]"]


# ------------------------------------------------------------------ unreadable shards, and why a rebuild

def test_a_shard_left_out_as_unreadable_is_added_once_readable_not_rebuilt():
    cfg = _cfg()
    rows = _rows(4)
    left_out = {"shard-000001.parquet": "not a readable feature shard (ArrowInvalid: ...)"}
    now = {n: r for n, r in rows.items() if n not in left_out}
    p = plan_index(cfg, done=None, rows=now, dim=DIM, failed=left_out)
    assert p.action == "build" and p.shards == tuple(now) and p.n_total == 3 * SHARD_ROWS
    assert "leaving out 1 unreadable shard(s) (shard-000001.parquet)" in p.reason
    done = _done(cfg, now, failed_shards=left_out)
    # still unreadable: nothing to do (and said)
    p = plan_index(cfg, done=done, rows=now, dim=DIM, failed=left_out)
    assert p.action == "nothing" and "leaving out 1 unreadable" in p.reason
    # readable again: added after the indexed shards, faiss ids continuing
    p = plan_index(cfg, done=done, rows=rows, dim=DIM)
    assert p.action == p.last_action == "add" and not p.rebuild
    assert p.new_shards == ("shard-000001.parquet",) and p.shards == (*now, "shard-000001.parquet")
    assert p.n_total == 4 * SHARD_ROWS and "1 left out as unreadable by an earlier run" in p.reason


def test_an_indexed_shard_unreadable_now_rebuilds_and_says_so():
    cfg = _cfg()
    rows = _rows(3)
    bad = {"shard-000000.parquet": "OSError: Couldn't deserialize thrift"}
    now = {n: r for n, r in rows.items() if n not in bad}
    p = plan_index(cfg, done=_done(cfg, rows), rows=now, dim=DIM, failed=bad)
    assert p.action == "build" and p.rebuild and p.last_action == "rebuild" and p.shards == tuple(now)
    assert "1 indexed shard(s) cannot be read now (shard-000000.parquet)" in p.reason


def test_an_index_replaced_with_overwrite_is_a_rebuild_that_says_what_it_was_made_from():
    p = plan_index(_cfg(), done=None, rows=_rows(2), dim=DIM, replaced="another model")
    assert p.action == "build" and p.rebuild and p.last_action == "rebuild"
    assert "made from another model and is replaced (--overwrite)" in p.reason


@pytest.mark.parametrize("done_kw, rows, cfg_kw, replaced", [
    ({}, dict(list(_rows(3).items())[1:]), {}, None),  # a shard gone
    ({}, {**_rows(3), "shard-000000.parquet": 5, "shard-000009.parquet": 9}, {}, None),  # resized
    ({"data_files": {"index.ivfdata": 9}}, {**_rows(3), "shard-000009.parquet": 9}, {}, None),  # on-disk IVF
    ({"factory": "Flat"}, _rows(3), {"max_memory": str(estimate_memory("Flat", 2 * SHARD_ROWS, DIM) + 100)},
     None),  # budget
    (None, _rows(3), {}, "another model"),  # --overwrite
])
def test_every_rebuild_says_why(done_kw, rows, cfg_kw, replaced):
    cfg = _cfg(**cfg_kw)
    done = None if done_kw is None else _done(cfg, _rows(2 if "factory" in done_kw else 3), **done_kw)
    p = plan_index(cfg, done=done, rows=rows, dim=DIM, replaced=replaced)
    assert p.rebuild and p.last_action == "rebuild" and p.reason.endswith("rebuilding it")
    fresh = plan_index(cfg, done=None, rows=rows, dim=DIM).reason
    assert p.reason != fresh and "(" in p.reason  # the cause, named
