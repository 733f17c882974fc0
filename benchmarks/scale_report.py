"""The scale benchmark's report: goals, peak-RSS growth, the interpretation, SCALE.md, and results made
repository-relative (they are committed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.bench import ratio
from benchmarks.scale_data import DIM, RECALL_KS

REPO = Path(__file__).resolve().parent.parent
#: Goals of the scale issue.
GOALS = {"label_ratio_min": 0.8, "label_rss_growth_max": 1.3, "extract_steady_ratio_min": 0.9}


NOTES = [
    "Feature rows are synthetic (non-negative, class-clustered, low-rank class structure plus per-row noise), "
    "written in the real shard format; the model is ESZSL trained on them (semantics text).",
    "Labeling: both sides are subprocesses timed from spawn to exit (interpreter start and imports included); "
    "'in-process' uses the labels manifest's seconds_last_run vs the bare script's own timing of its loop. "
    "The bare script computes (l2n(X) @ V) @ S.T with np.argpartition top-k in batches of LabelConfig.batch_size, "
    "writes nothing and applies no calibration.",
    "Peak RSS: the larger of the polled sum of RSS over the process tree (every --poll-ms) and the root "
    "process's VmHWM (its own peak, which also catches spikes between polls).",
    "Index build: our total runs zsl index on the feature shards, so it includes projecting them with the "
    "model; 'minus projection' subtracts the manifest's timings.project_s when the manifest has it. autofaiss "
    "gets the pre-projected vectors (emb/part-*.npy, float32) and never pays for the projection; its total "
    "includes its own hyper-parameter search (efSearch/nprobe to fit --max_index_query_time_ms, default 10 ms) "
    "and a 'Compute fast metrics' step (its own latency/recall report), which 'minus fast metrics' removes.",
    "Recall: exact top-100 by brute force over the same projected vectors; both indexes are searched with the "
    "same 1,000 held-out queries (new rows of the same distribution, projected the same way) in this process; "
    "recall@k = |approx top-k ∩ exact top-k| / k. Our index is loaded with pipeline.index.store.load_index and "
    "its manifest's search_params (if any) applied with faiss.ParameterSpace; autofaiss's with faiss.read_index "
    "and its infos.json index_param (load times differ in kind: load_index memory-maps where it can, "
    "read_index reads the whole file; 'index file MB' of ours includes its data_files). faiss threads at their default. Latency is measured after both indexes "
    "are built, in --latency-rounds rounds interleaved between them (ours, autofaiss, autofaiss, ours): a "
    "round is one query per search call (after a 10-query warm-up) for --single-queries queries, then one "
    "batched call with all queries at k=100; mean/p99 over all rounds' single queries, batched = median. On a "
    "loaded 2-core machine OpenMP makes single-query latency of exhaustive (Flat) search swing by 10x; the "
    "load average around the measurement is recorded.",
]


def _fmt(v, spec: str = ".3g", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def rss_growth(scales: list[dict]) -> dict:
    """Peak-RSS ratios, largest N over smallest N, for every side that has both."""
    if len(scales) < 2:
        return {}
    lo, hi = min(scales, key=lambda s: s["n_rows"]), max(scales, key=lambda s: s["n_rows"])
    out = {"n_small": lo["n_rows"], "n_large": hi["n_rows"], "rows_ratio": hi["n_rows"] / lo["n_rows"]}
    out["label_pipeline"] = ratio(hi["label"]["pipeline"]["median_peak_rss_mb"],
                                   lo["label"]["pipeline"]["median_peak_rss_mb"])
    out["label_bare"] = ratio(hi["label"]["bare"]["median_peak_rss_mb"], lo["label"]["bare"]["median_peak_rss_mb"])
    out["index_ours"] = ratio(hi["index"]["ours"]["peak_rss_mb"], lo["index"]["ours"]["peak_rss_mb"])
    if hi["index"].get("autofaiss") and lo["index"].get("autofaiss"):
        out["index_autofaiss"] = ratio(hi["index"]["autofaiss"]["peak_rss_mb"], lo["index"]["autofaiss"]["peak_rss_mb"])
    return out


def interpretation(result: dict) -> str:
    parts = []
    for s in result["scales"]:
        lb, ix = s["label"], s["index"]
        ok = lb["ratio"] >= GOALS["label_ratio_min"]
        parts.append(f"N={s['n_rows']:,}: zsl label ran at {lb['ratio']:.2f}x the bare script "
                     f"({lb['pipeline']['median_rows_per_s']:,.0f} vs {lb['bare']['median_rows_per_s']:,.0f} rows/s, "
                     f"goal >= {GOALS['label_ratio_min']}: {'met' if ok else 'MISSED'}), peak RSS "
                     f"{lb['pipeline']['median_peak_rss_mb']:,.0f} vs {lb['bare']['median_peak_rss_mb']:,.0f} MB.")
        o, a = ix["ours"], ix.get("autofaiss")
        txt = (f"Our index ({o['factory']}, {o.get('search_params') or 'no search params'}) built in "
               f"{o['build_seconds']:.1f}s, peak RSS {o['peak_rss_mb']:,.0f} MB, recall@10 {o.get('recall_at_10', 0):.3f}, "
               f"single query {o['single_query_mean_ms']:.2f} ms mean / {o['single_query_p99_ms']:.2f} ms p99")
        if a:
            txt += (f"; autofaiss ({a['factory']}, {a.get('search_params')}) built in {a['build_seconds']:.1f}s "
                    f"from pre-projected vectors, peak RSS {a['peak_rss_mb']:,.0f} MB, recall@10 "
                    f"{a.get('recall_at_10', 0):.3f}, single query {a['single_query_mean_ms']:.2f} ms mean / "
                    f"{a['single_query_p99_ms']:.2f} ms p99")
        parts.append(txt + ".")
    g = result.get("rss_growth") or {}
    if g.get("label_pipeline") is not None:
        ok = g["label_pipeline"] <= GOALS["label_rss_growth_max"]
        parts.append(f"zsl label peak RSS grew {g['label_pipeline']:.2f}x from N={g['n_small']:,} to "
                     f"N={g['n_large']:,} ({g['rows_ratio']:.3g}x the rows; goal <= {GOALS['label_rss_growth_max']}: "
                     f"{'met' if ok else 'MISSED'}).")
        if g["n_small"] < result["parameters"]["shard_rows"]:
            parts.append(f"(At N={g['n_small']:,} the shards hold fewer than --shard-rows "
                         f"{result['parameters']['shard_rows']:,} rows, so this growth also measures the shard size, "
                         f"which bounds the memory of a streaming job; compare Ns with full shards.)")
    ex = result.get("extraction")
    if ex:
        r = ex.get("ratio_steady")
        if r is None:
            parts.append("Extraction: too few shards/batches for a steady-state rate.")
        else:
            ok = r >= GOALS["extract_steady_ratio_min"]
            fc = ex["fixed_costs_s"]
            parts.append(f"Extraction steady state ({ex['n_images']:,} images): the pipeline ran at {r:.2f}x the bare "
                         f"loop ({ex['pipeline']['median_steady_images_per_s']:.1f} vs "
                         f"{ex['bare']['median_steady_images_per_s']:.1f} images/s; goal >= "
                         f"{GOALS['extract_steady_ratio_min']}: {'met' if ok else 'MISSED'}); fixed costs: Ray start "
                         f"{fc['ray_init']:.1f}s, actor start + model load + ramp "
                         f"{_fmt(fc['pipeline_actor_start_model_load_and_ramp'], '.1f')}s per run "
                         f"(bare encoder load {fc['bare_encoder_load']:.1f}s); overall {ex['ratio_total']:.2f}x.")
    return " ".join(parts)


def markdown(result: dict) -> str:
    """SCALE.md: labeling, index and extraction tables, the interpretation and the notes."""
    p = result["parameters"]
    lines = [
        "# Scale benchmark: `zsl label` / `zsl index` vs bare loops and autofaiss",
        "",
        f"Generated by `python -m benchmarks.bench_scale` on {result['date']} "
        f"({result['machine']['cpu_count']} CPUs, {result['machine']['platform']}); "
        f"{p['classes']} classes, {DIM}-d features, {p['shard_rows']:,} rows per shard, index budget "
        f"`--max-memory {p['max_memory']}`, {p['queries']:,} held-out queries. Nothing here is typed by hand.",
        "",
        "## Labeling (subprocesses; medians over interleaved repeats)",
        "",
        f"| rows | repeats | `zsl label` rows/s | bare rows/s | ratio (goal ≥ {GOALS['label_ratio_min']}) | "
        "ratio in-process | `zsl label` peak RSS MB | bare peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += _label_lines(result)
    lines += ["", "## Index: ours (`zsl index`) vs autofaiss, same vectors, same queries, exact ground truth", ""]
    for s in result["scales"]:
        lines += _index_lines(s)
    lines += _extraction_lines(result.get("extraction"))
    lines += ["## Interpretation", "", result["interpretation"], "", "## Notes", "",
              *[f"- {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def _label_lines(result: dict) -> list[str]:
    """The labeling table's rows, then the peak-RSS growth."""
    lines = []
    for s in result["scales"]:
        lb = s["label"]
        lines.append(f"| {s['n_rows']:,} | {lb['repeats']} | {lb['pipeline']['median_rows_per_s']:,.0f} | "
                     f"{lb['bare']['median_rows_per_s']:,.0f} | {lb['ratio']:.3f} | {_fmt(lb['ratio_inprocess'], '.3f')} | "
                     f"{lb['pipeline']['median_peak_rss_mb']:,.0f} | {lb['bare']['median_peak_rss_mb']:,.0f} |")
    g = result.get("rss_growth") or {}
    if g:
        lines += ["", f"Peak-RSS growth from {g['n_small']:,} to {g['n_large']:,} rows: `zsl label` "
                      f"{_fmt(g.get('label_pipeline'), '.2f')}x (goal ≤ {GOALS['label_rss_growth_max']}), bare "
                      f"{_fmt(g.get('label_bare'), '.2f')}x, `zsl index` {_fmt(g.get('index_ours'), '.2f')}x, autofaiss "
                      f"{_fmt(g.get('index_autofaiss'), '.2f')}x."]
    return lines


def _index_lines(s: dict) -> list[str]:
    """One scale's ours-vs-autofaiss table."""
    o, a = s["index"]["ours"], s["index"].get("autofaiss") or {}
    rows = [
        ("index (factory / key)", f"`{o.get('factory')}`", f"`{a['factory']}`" if a else "—"),
        ("search params", f"`{o.get('search_params')}`" if o.get("search_params") else "—",
         f"`{a['search_params']}`" if a.get("search_params") else "—"),
        ("effective params", json.dumps(o.get("effective_params")), json.dumps(a["effective_params"]) if a else "—"),
        ("build s (total)", _fmt(o["build_seconds"], ".1f"), _fmt(a.get("build_seconds"), ".1f")),
        ("build s minus projection (ours) / minus its fast-metrics step (autofaiss)",
         _fmt(o.get("build_seconds_minus_projection"), ".1f"), _fmt(a.get("build_seconds_minus_fast_metrics"), ".1f")),
        ("build peak RSS MB", _fmt(o["peak_rss_mb"], ",.0f"), _fmt(a.get("peak_rss_mb"), ",.0f")),
        ("index file MB", _fmt(o["index_file_bytes"] / 2**20, ",.1f"),
         _fmt(a["index_file_bytes"] / 2**20, ",.1f") if a else "—"),
        ("estimated MB (ours) / file", f"{_fmt((o.get('estimated_bytes') or 0) / 2**20, ',.1f')} "
         f"({_fmt(o.get('estimated_over_file'), '.2f')}x)", "—"),
        ("load s", _fmt(o["load_seconds"], ".3f"), _fmt(a.get("load_seconds"), ".3f")),
        *[(f"recall@{k}", _fmt(o.get(f"recall_at_{k}"), ".4f"), _fmt(a.get(f"recall_at_{k}"), ".4f"))
          for k in RECALL_KS],
        (f"single query mean ms (k={o['latency_k']})", _fmt(o["single_query_mean_ms"], ".3f"),
         _fmt(a.get("single_query_mean_ms"), ".3f")),
        ("single query p99 ms", _fmt(o["single_query_p99_ms"], ".3f"), _fmt(a.get("single_query_p99_ms"), ".3f")),
        (f"batched ms/query ({o['batched_queries']} queries, k={o['batched_k']})",
         _fmt(o["batched_ms_per_query"], ".4f"), _fmt(a.get("batched_ms_per_query"), ".4f")),
    ]
    # autofaiss logs nested steps; show the ones that take time and do not overlap
    rows.append(("stage timings s", _stage_timings(o.get("timings")),
                 _stage_timings(a.get("timings"), ("train", "hyperparameters", "fast metrics", "whole pipeline"))))
    if isinstance(o.get("tuning"), dict):
        rows.append(("tuning (ours, from its manifest)", ", ".join(
            f"{k} {_fmt(v, '.3g')}" for k, v in o["tuning"].items()
            if v not in (None, "") and not isinstance(v, (dict, list))), "—"))
    if o.get("loadavg_before"):
        rows.append(("1-min load average before → after the latency rounds",
                     f"{o['loadavg_before'][0]:.1f} → {o['loadavg_after'][0]:.1f}", "(the same rounds)" if a else "—"))
    return [f"### {s['n_rows']:,} rows ({s['data']['n_shards']} shards)", "",
            "| | ours | autofaiss |", "|---|---:|---:|", *[f"| {a_} | {b_} | {c_} |" for a_, b_, c_ in rows], ""]


def _stage_timings(t, keep=None) -> str:
    """``step seconds, ...`` of a timings dict (only steps whose name holds one of ``keep``)."""
    if not isinstance(t, dict) or not t:
        return "—"
    return ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in t.items() if isinstance(v, (int, float))
                     and (keep is None or any(w in k.lower() for w in keep))) or "—"


def _extraction_lines(ex: dict | None) -> list[str]:
    """The extraction steady-state table (nothing when it was not measured)."""
    if not ex:
        return []
    fc = ex["fixed_costs_s"]
    return [
        f"## Extraction steady state ({ex['n_images']:,} animal-mnist images, shard size {ex['shard_size']}, "
        f"batch {ex['batch_size']})", "",
        "| | pipeline (`run_extract`, Ray up) | bare loop |", "|---|---:|---:|",
        f"| images/s, steady state | {_fmt(ex['pipeline']['median_steady_images_per_s'], '.1f')} | "
        f"{_fmt(ex['bare']['median_steady_images_per_s'], '.1f')} |",
        f"| images/s, whole run | {ex['pipeline']['median_images_per_s']:.1f} | {ex['bare']['median_images_per_s']:.1f} |",
        f"| fixed costs s | actor start + model load + ramp {_fmt(fc['pipeline_actor_start_model_load_and_ramp'], '.1f')}; "
        f"Ray start {fc['ray_init']:.1f} (once) | encoder load {fc['bare_encoder_load']:.1f}; ramp "
        f"{_fmt(fc['bare_ramp'], '.1f')} |",
        f"| ratio steady (goal ≥ {GOALS['extract_steady_ratio_min']}) | {_fmt(ex['ratio_steady'], '.3f')} | |",
        f"| ratio whole run | {ex['ratio_total']:.3f} | |", ""]


def repo_relative(obj):
    """``obj`` with paths inside the repository written relative to it (results are committed; the
    machine's checkout path means nothing elsewhere)."""
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [repo_relative(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(f"{REPO}/"):
        return obj[len(f"{REPO}/"):]
    return obj
