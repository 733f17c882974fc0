"""``zsl index``, ``zsl serve``, ``zsl search``: text-to-image retrieval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import typer

from jobs.common import EXIT_PARTIAL, AddressOpt, ConfigOpt, OverwriteOpt, SetOpt, WorkersOpt, run_job


def index(
    features: Optional[str] = typer.Option(None), model: Optional[str] = typer.Option(None),
    output: Optional[str] = typer.Option(None),
    max_memory: Optional[str] = typer.Option(None, help="Index memory budget, e.g. 512M, 16G."),
    index_factory: Optional[str] = typer.Option(None, help="Force a FAISS index_factory string."),
    nprobe: Optional[int] = typer.Option(None, help="Fix IVF nprobe instead of tuning it."),
    search_params: Optional[str] = typer.Option(None, help="Fix faiss search parameters, e.g. efSearch=128."),
    target_recall: Optional[float] = typer.Option(None, help="Tune search parameters to this recall@k (0.95)."),
    max_query_ms: Optional[float] = typer.Option(None, help="Instead: best recall within this latency per query."),
    use_gpu: Optional[str] = typer.Option(None, help="auto | yes | no"),
    address: Optional[str] = AddressOpt, num_workers: Optional[int] = WorkersOpt,
    partitions: Optional[int] = typer.Option(None, help="IVF: build this many partitions apart, merge on disk."),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Build a FAISS index of images in the model's text space (chosen under a memory budget, tuned
    to a recall target); on a feature directory that gained shards, add only their vectors.

    Exit status 0 when every feature shard is indexed, 3 when the run finished but some shards
    cannot be read (listed; the index holds the others, a rerun retries them), 2 on bad config or
    input, or when no shard can be read (nothing changed).
    """
    def body(cfg):
        from pipeline.stages.index import run_index

        m = run_index(cfg)
        tuned = (f"; {m.search_params or 'exact'}: recall@10 {m.tuning.recall_at_10:.3f}, "
                 f"{m.tuning.latency_ms_mean:.2f} ms/query" if m.tuning else "")
        typer.echo(f"indexed {m.ntotal} images with {m.factory} ({m.index_bytes / 2**20:.1f} MiB, "
                   f"{m.build}){tuned} -> {cfg.output}")
        typer.echo(f"index: {m.last_run_summary()}")
        if m.failed_shards:
            for name, why in m.failed_shards.items():
                typer.echo(f"zsl: feature shard {name} not indexed: {why}", err=True)
            typer.echo(f"zsl: {len(m.failed_shards)} of {len(m.failed_shards) + len(m.shards)} feature shards not "
                       "indexed; rerun to try them again", err=True)
            raise typer.Exit(EXIT_PARTIAL)
    run_job("index", dict(features=features, model=model, output=output, max_memory=max_memory,
                          index_factory=index_factory, nprobe=nprobe, search_params=search_params,
                          target_recall=target_recall, max_query_ms=max_query_ms, use_gpu=use_gpu,
                          address=address, num_workers=num_workers, partitions=partitions, overwrite=overwrite),
            config, set, body)


def serve(
    index: Optional[list[str]] = typer.Option(None, help="`zsl index` output, or NAME=DIR (repeatable)."),
    labels: Optional[list[str]] = typer.Option(None, help=(
        "`zsl label` output of an index's features, or NAME=DIR (repeatable): hits carry the predicted label.")),
    host: Optional[str] = typer.Option(None, help="Interface (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    ray: Optional[bool] = typer.Option(None, "--ray", help="Serve with Ray Serve, one replica per node."),
    address: Optional[str] = AddressOpt,
    replicas: Optional[int] = typer.Option(None, help="Ray Serve replicas (default: one per node)."),
    reload_interval: Optional[float] = typer.Option(None, "--reload-interval", help=(
        "Seconds between checks for new index versions, swapped in while serving (default 5; 0: on SIGHUP only).")),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Serve text-to-image retrieval over HTTP (FastAPI + uvicorn, or Ray Serve) with a web page at /.
    New versions of the indexes (`zsl index` adding shards or rebuilding) are served as they appear."""
    def flags() -> dict:
        indexes = _named_dirs("--index", index, lambda d: Path(d.rstrip("/")).name or "index")
        return dict(indexes=indexes, labels=_named_dirs("--labels", labels, _labels_name(indexes)), host=host,
                    port=port, ray=ray, address=address, replicas=replicas, reload_interval_s=reload_interval)

    def body(cfg):
        from pipeline.stages.serve import run_serve

        typer.echo(f"zsl serve: http://{cfg.host}:{cfg.port}/ (API docs at /docs); Ctrl-C stops")
        run_serve(cfg)
    run_job("serve", flags, config, set, body)


def _labels_name(indexes: dict[str, str] | None) -> Callable[[str], str]:
    """Names a bare ``--labels DIR`` after the one ``--index``; with several (or none given) it must be named."""
    default = next(iter(indexes)) if indexes and len(indexes) == 1 else None

    def name(d: str) -> str:
        if default is None:
            raise ValueError(f"--labels {d}: say which index it labels with NAME=DIR "
                             f"({'several --index are given' if indexes else 'the indexes come from the config'})")
        return default
    return name


def _named_dirs(option: str, items: Optional[list[str]], default_name) -> dict[str, str] | None:
    """``[NAME=]DIR`` options -> {name: dir}; ``default_name(dir)`` names a bare DIR."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        name, sep, d = item.partition("=")
        name, d = (name, d) if sep else (default_name(item), item)
        if name in out:
            raise ValueError(f"{option} {item}: the name {name!r} is given twice; use NAME=DIR")
        out[name] = d
    return out


def search(
    text: Optional[str] = typer.Argument(None, help="Free-text query."),
    index: Optional[str] = typer.Option(None, help="`zsl index` output."),
    k: Optional[int] = typer.Option(None, "-k", "--k", help="Number of hits (default: conf/search.yaml)."),
    mode: Optional[str] = typer.Option(None, help="image (default) | caption | both (needs `zsl embed-text`)."),
    label: Optional[list[str]] = typer.Option(None, "--label", help=(
        "Only images with this (true) label (repeatable: any of them); exact among them, rare labels too.")),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Retrieve images by free text."""
    def body(cfg):
        from pipeline.stages.search import run_search

        out = run_search(cfg)
        if as_json:
            typer.echo(json.dumps(out, indent=2))
            return
        for h in out["hits"]:
            typer.echo(f"{h['rank']:3d}  {h['score']:.4f}  {h['uri']}" + (f"  [{h['label']}]" if h["label"] else ""))
    run_job("search", dict(index=index, text=text, k=k, mode=mode, labels=label or None), config, set, body)
