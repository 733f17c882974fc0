"""The ``zsl`` command line: one thin entry point per job.

Each command builds its typed config from ``conf/<job>.yaml`` (plus ``--config FILE`` and
``--set key=value`` overrides, then flags), sets up logging, and calls the library.
Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Zero-shot labeling and text retrieval of images at scale.")
LOG = logging.getLogger("zsl")
CONF_DIR = Path(os.environ.get("ZSL_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


class BadInput(Exception):
    """Reported as a one-line message with exit status 2."""


def _setup_logging() -> dict:
    base = _read_yaml(CONF_DIR / "base.yaml") if (CONF_DIR / "base.yaml").exists() else {}
    level = os.environ.get("ZSL_LOG_LEVEL", base.get("log_level", "INFO"))
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    else:
        root.setLevel(level)
    for noisy in ("ray", "ray.data", "sentence_transformers", "httpx", "urllib3", "filelock", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return base


def _read_yaml(path: Path | str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise BadInput(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"config file {path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise BadInput(f"config file {path}: expected a mapping of key: value")
    return data


def _overrides(sets: list[str] | None) -> dict:
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise BadInput(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def load_config(job: str, flags: dict[str, Any], config: Path | None = None, sets: list[str] | None = None):
    """The job's typed config from ``conf/<job>.yaml``, ``--config FILE``, ``--set k=v`` and the flags given,
    later layers winning; every error names the key and the layer it came from."""
    from pipeline.core.config import build_config

    conf_file = CONF_DIR / f"{job}.yaml"
    layers = [(_shown(conf_file), _read_yaml(conf_file) if conf_file.exists() else {})]
    if config:
        layers.append((str(config), _read_yaml(config)))
    layers += [("--set", _overrides(sets)), ("the command line", flags)]
    return build_config(job, *layers)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def names_or_file(value: str | None, key: str) -> list[str] | None:
    """``a,b,c`` or a file: text (one name per line), or JSON (a list, or a dict with ``key``)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                if key not in data:
                    raise BadInput(f"{value}: no '{key}' list in the JSON file")
                data = data[key]
            return [str(x) for x in data]
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise BadInput(f"--{key}: no class names given")
    return names


def _run(fn) -> None:
    """Run a job body; turn bad input into exit code 2 with one line on stderr."""
    from pipeline.core.config import ConfigError

    _setup_logging()
    try:
        fn()
    except (BadInput, ConfigError, ValueError, FileNotFoundError, PermissionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        typer.echo(f"zsl: error: {msg}", err=True)
        raise typer.Exit(2) from None


from jobs.options import ConfigOpt, OverwriteOpt, SetOpt  # noqa: E402


@app.command()
def extract(
    input: Optional[str] = typer.Option(None, help=(
        "Image folder, img2dataset output (files / webdataset / parquet), .tar shards or Parquet with image "
        "bytes; any fsspec URI; brace patterns like shards/{00000..00099}.tar.")),
    output: Optional[str] = typer.Option(None, help="Output directory for feature shards."),
    encoder: Optional[str] = typer.Option(None, help="'effnet-lite0' (default) or 'open_clip:<arch>'."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip checkpoint path or pretrained tag."),
    input_format: Optional[str] = typer.Option(None, help="auto (says which it chose) | folder | files | webdataset | parquet"),
    label_field: Optional[str] = typer.Option(None, help="json sidecar key (files, webdataset) or Parquet column of the label."),
    shard_size: Optional[int] = typer.Option(None, help="Images per shard (folder input)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per encoder batch."),
    num_actors: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, else CPUs-1)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local cluster)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N shards."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Extract image features with Ray (decode on CPU tasks, encode in an actor pool), shard by shard."""
    def body():
        from pipeline.stages.extract import run_extract

        cfg = load_config("extract", dict(input=input, output=output, encoder=encoder, pretrained=pretrained,
                                          input_format=input_format, label_field=label_field,
                                          shard_size=shard_size, batch_size=batch_size,
                                          num_actors=num_actors, address=address, limit=limit, device=device,
                                          overwrite=overwrite), config, set)
        m = run_extract(cfg)
        typer.echo(f"extracted {m.n_images} images ({m.n_errors} errors) in {m.n_shards} shards "
                   f"with {m.model_id} ({m.dim}-d) -> {cfg.output}")
    _run(body)


@app.command()
def classes(
    input: Optional[str] = typer.Option(None, help="Class table: CSV / YAML / Parquet with name[, description][, attributes]."),
    output: Optional[str] = typer.Option(None, help="Output directory for the embedded class set."),
    text_model: Optional[str] = typer.Option(None, help="'minilm' (default) or 'open_clip:<arch>'."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip checkpoint path or tag."),
    attribute_normalization: Optional[str] = typer.Option(None, help="l2 | zscore | none"),
    missing_attributes: Optional[str] = typer.Option(None, help="error | column_mean | zero"),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Embed classes from names, descriptions (prompt templates) and attribute tables."""
    def body():
        from pipeline.stages.classes import run_classes

        cfg = load_config("classes", dict(input=input, output=output, text_model=text_model, pretrained=pretrained,
                                          attribute_normalization=attribute_normalization,
                                          missing_attributes=missing_attributes, overwrite=overwrite), config, set)
        m = run_classes(cfg)
        typer.echo(f"embedded {m.n_classes} classes ({m.text_model}, {len(m.attribute_names)} attributes)"
                   f" -> {cfg.output}")
    _run(body)


def _params(items: list[str] | None) -> dict | None:
    if not items:
        return None
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise BadInput(f"--param {item!r}: expected name=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@app.command()
def train(
    features: Optional[str] = typer.Option(None, help="`zsl extract` output with labelled training images."),
    classes: Optional[str] = typer.Option(None, help="`zsl classes` output."),
    seen: Optional[str] = typer.Option(None, help="Seen classes: a,b,c or a file (lines, or JSON with a 'seen' list)."),
    method: Optional[str] = typer.Option(None, help="A ZSL method: `zsl methods` lists them."),
    output: Optional[str] = typer.Option(None, help="Model directory to write."),
    semantics: Optional[str] = typer.Option(None, help="text | attributes | glove, or a '+' combination."),
    param: Optional[list[str]] = typer.Option(None, "--param", help="Method hyper-parameter name=value (repeatable)."),
    members: Optional[str] = typer.Option(None, help="Ensemble members, e.g. devise,eszsl."),
    bridge: Optional[str] = typer.Option(None, help="A `zsl bridge` model to combine with (weight chosen on held-out seen classes)."),
    bridge_mode: Optional[str] = typer.Option(None, help="scores (mix, w tuned) | features (learn from [x, bridge(x)])."),
    tune: Optional[bool] = typer.Option(None, "--tune/--no-tune", help="Choose hyper-parameters on held-out seen classes."),
    calibration: Optional[bool] = typer.Option(None, "--calibration/--no-calibration",
                                               help="Tune calibrated stacking on held-out seen classes."),
    epochs: Optional[int] = typer.Option(None, help="Shortcut for --param epochs=N."),
    seed: Optional[int] = typer.Option(None),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Train a ZSL model on seen classes (hyper-parameters and GZSL calibration tuned on held-out seen classes)."""
    def body():
        from pipeline.stages.train import run_train

        params = _params(param) or {}
        if epochs is not None:
            params["epochs"] = epochs
        cfg = load_config("train", dict(features=features, classes=classes, seen=names_or_file(seen, "seen"),
                                        method=method, output=output, semantics=semantics, params=params or None,
                                        members=names_or_file(members, "members"), bridge=bridge,
                                        bridge_mode=bridge_mode, tune=tune,
                                        calibration=calibration, seed=seed, overwrite=overwrite), config, set)
        m = run_train(cfg)
        typer.echo(f"trained {m.method} on {m.n_train} images of {len(m.seen)} seen classes "
                   f"(gamma={m.gamma:.4f}) -> {cfg.output}")
    _run(body)


@app.command()
def methods() -> None:
    """List the ZSL methods and their hyper-parameters (defaults, and the --tune grid)."""
    def body():
        from pipeline.zsl.models import METHODS, method_params

        for name in sorted(METHODS):
            params = ", ".join(f"{k}={v!r}" for k, v in method_params(name).items())
            grid = METHODS[name].grid
            typer.echo(f"{name:9s} {params}" + (f"\n{'':9s} tune grid: {grid}" if grid else ""))
    _run(body)


def _pct(v) -> str:
    return "  n/a" if v is None or v != v else f"{100 * v:5.1f}"


def print_table(rows: list[dict]) -> None:
    typer.echo(f"{'method':<10} {'semantics':<16} {'ZSL-U':>6} | {'S':>6} {'U':>6} {'H':>6} | {'S(cal)':>6} "
               f"{'U(cal)':>6} {'H(cal)':>6} {'gamma':>7} | {'AUSUC':>6}")
    for r in rows:
        line = (f"{r['method']:<10} {r['semantics']:<16} {_pct(r['zsl']):>6} | {_pct(r['S']):>6} {_pct(r['U']):>6} "
                f"{_pct(r['H']):>6} | {_pct(r['S_cal']):>6} {_pct(r['U_cal']):>6} {_pct(r['H_cal']):>6} "
                f"{r['gamma']:7.3f} | {_pct(r['ausuc']):>6}")
        if "zsl_trans" in r:
            line += f" | transductive ZSL-U {_pct(r['zsl_trans'])} H(cal) {_pct(r['H_cal_trans'])}"
        typer.echo(line)


@app.command()
def evaluate(
    model: Optional[list[str]] = typer.Option(None, help="Model directory (repeat to compare several side by side)."),
    features: Optional[str] = typer.Option(None, help="Held-out test features."),
    classes: Optional[str] = typer.Option(None),
    unseen: Optional[str] = typer.Option(None, help="Unseen classes: a,b,c or a file (lines, or JSON with 'unseen')."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the metrics as JSON here."),
    html: Optional[str] = typer.Option(None, help="Write an HTML report with plots here."),
    transductive: Optional[bool] = typer.Option(None, "--transductive/--inductive",
                                                help="Also report transductive results (reported separately)."),
    allow_train_features: Optional[bool] = typer.Option(None, "--allow-train-features",
                                                        help="Allow evaluating on the training features."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Standard ZSL / GZSL evaluation: per-class mean top-1, seen/unseen/H, calibrated stacking, AUSUC."""
    def body():
        from pipeline.stages.evaluate import run_evaluate_all

        cfg = load_config("evaluate", dict(models=list(model) if model else None, features=features, classes=classes,
                                           unseen=names_or_file(unseen, "unseen"), json_path=json_path, html=html,
                                           transductive=transductive, allow_train_features=allow_train_features),
                          config, set)
        print_table(run_evaluate_all(cfg)["table"])
    _run(body)


AddressOpt = typer.Option(None, help="Ray cluster address: run the per-shard work there.")
WorkersOpt = typer.Option(None, help="Ray workers (default: the cluster's CPUs - 1).")


@app.command()
def label(
    model: Optional[str] = typer.Option(None), features: Optional[str] = typer.Option(None),
    classes: Optional[str] = typer.Option(None), output: Optional[str] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k"),
    calibrated: Optional[bool] = typer.Option(None, "--calibrated/--uncalibrated"),
    address: Optional[str] = AddressOpt, num_workers: Optional[int] = WorkersOpt,
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Bulk-label features: top-k classes with scores per image, shard by shard (resumable)."""
    def body():
        from pipeline.stages.label import run_label

        cfg = load_config("label", dict(model=model, features=features, classes=classes, output=output,
                                        top_k=top_k, calibrated=calibrated, address=address,
                                        num_workers=num_workers, overwrite=overwrite), config, set)
        m = run_label(cfg)
        typer.echo(f"labeled {m.n_labeled_this_run} images in {m.n_shards} shards against "
                   f"{len(m.classes)} classes -> {cfg.output}")
    _run(body)


@app.command()
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
    to a recall target); on a feature directory that gained shards, add only their vectors."""
    def body():
        from pipeline.stages.index import run_index

        cfg = load_config("index", dict(features=features, model=model, output=output, max_memory=max_memory,
                                        index_factory=index_factory, nprobe=nprobe, search_params=search_params,
                                        target_recall=target_recall, max_query_ms=max_query_ms, use_gpu=use_gpu,
                                        address=address, num_workers=num_workers, partitions=partitions,
                                        overwrite=overwrite), config, set)
        m = run_index(cfg)
        tuned = (f"; {m.search_params or 'exact'}: recall@10 {m.tuning.recall_at_10:.3f}, "
                 f"{m.tuning.latency_ms_mean:.2f} ms/query" if m.tuning else "")
        typer.echo(f"indexed {m.ntotal} images with {m.factory} ({m.index_bytes / 2**20:.1f} MiB, "
                   f"{m.build}){tuned} -> {cfg.output}")
    _run(body)


@app.command()
def serve(
    index: Optional[list[str]] = typer.Option(None, help="`zsl index` output, or NAME=DIR (repeatable)."),
    labels: Optional[list[str]] = typer.Option(None, help=(
        "`zsl label` output of an index's features, or NAME=DIR (repeatable): hits carry the predicted label.")),
    host: Optional[str] = typer.Option(None, help="Interface (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    ray: Optional[bool] = typer.Option(None, "--ray", help="Serve with Ray Serve, one replica per node."),
    address: Optional[str] = AddressOpt,
    replicas: Optional[int] = typer.Option(None, help="Ray Serve replicas (default: one per node)."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Serve text-to-image retrieval over HTTP (FastAPI + uvicorn, or Ray Serve) with a web page at /."""
    def body():
        from pipeline.stages.serve import run_serve

        indexes = _named_dirs("--index", index, lambda d: Path(d.rstrip("/")).name or "index")
        default = next(iter(indexes)) if indexes and len(indexes) == 1 else None

        def label_name(d: str) -> str:
            if default is None:
                raise ValueError(f"--labels {d}: say which index it labels with NAME=DIR "
                                 f"({'several --index are given' if indexes else 'the indexes come from the config'})")
            return default
        cfg = load_config("serve", dict(indexes=indexes, labels=_named_dirs("--labels", labels, label_name),
                                        host=host, port=port, ray=ray, address=address, replicas=replicas),
                          config, set)
        typer.echo(f"zsl serve: http://{cfg.host}:{cfg.port}/ (API docs at /docs); Ctrl-C stops")
        run_serve(cfg)
    _run(body)


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


@app.command()
def search(
    text: Optional[str] = typer.Argument(None, help="Free-text query."),
    index: Optional[str] = typer.Option(None, help="`zsl index` output."),
    k: Optional[int] = typer.Option(None, "-k", "--k", help="Number of hits (default: conf/search.yaml)."),
    mode: Optional[str] = typer.Option(None, help="image (default) | caption | both (needs `zsl embed-text`)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Retrieve images by free text."""
    def body():
        from pipeline.stages.search import run_search

        cfg = load_config("search", dict(index=index, text=text, k=k, mode=mode), config, set)
        out = run_search(cfg)
        if as_json:
            typer.echo(json.dumps(out, indent=2))
        else:
            for h in out["hits"]:
                typer.echo(f"{h['rank']:3d}  {h['score']:.4f}  {h['uri']}" + (f"  [{h['label']}]" if h["label"] else ""))
    _run(body)


@app.command("add-classes")
def add_classes_cmd(
    model: Optional[str] = typer.Option(None, help="Trained model directory (checked against the classes)."),
    classes: Optional[str] = typer.Option(None, help="`zsl classes` output to extend (updated in place)."),
    input: Optional[str] = typer.Option(None, help="Class table with the new classes (names/descriptions/attributes)."),
    relabel: Optional[str] = typer.Option(None, help="A `zsl label` output to re-label (in place) against the enlarged set."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Add classes from names/descriptions/attributes; optionally re-label existing features (no re-extraction)."""
    def body():
        from pipeline.stages.label import run_add_classes

        cfg = load_config("add-classes", dict(model=model, classes=classes, input=input, relabel=relabel), config, set)
        cm, added, lm = run_add_classes(cfg)
        typer.echo(f"added {len(added)} classes ({', '.join(added) or 'all were there already'}); "
                   f"{cm.n_classes} classes in {cfg.classes}")
        if lm is not None:
            typer.echo(f"re-labeled {lm.n_labeled_this_run} images against {len(lm.classes)} classes -> {cfg.relabel}")
    _run(body)


@app.command()
def report(
    evaluation: Optional[list[str]] = typer.Option(None, help="`zsl evaluate --json` files (repeatable)."),
    search_json: Optional[list[str]] = typer.Option(None, "--search", help="`zsl search --json` files (repeatable)."),
    output: Optional[str] = typer.Option(None, help="HTML file to write."),
    title: Optional[str] = typer.Option(None),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Write one HTML report: metrics table, per-class accuracy, seen-unseen curves, search galleries."""
    def body():
        from pipeline.stages.report import run_report

        cfg = load_config("report", dict(evaluation=evaluation or None, search=search_json or None, output=output,
                                         title=title), config, set)
        typer.echo(f"report: {run_report(cfg)}")
    _run(body)


@app.command("demo-data")
def demo_data(
    output: Optional[str] = typer.Option(None, help="Folder to write the demo image folders and class table into."),
    per_class: Optional[int] = typer.Option(None, help="Images per class in each of train/test."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Write the embedded demo data (animal-mnist silhouettes) as image folders."""
    def body():
        from pipeline.inputs.demo_data import write_demo_data

        cfg = load_config("demo-data", dict(output=output, per_class=per_class), config, set)
        info = write_demo_data(cfg.output, per_class=cfg.per_class, seed=cfg.seed)
        typer.echo(f"demo data: {info['n_train']} train / {info['n_test']} test images of {len(info['classes'])} "
                   f"classes -> {cfg.output}")
    _run(body)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; return the exit status (tests call this).

    Typer runs in standalone mode, so usage errors print click's message and exit 2 exactly as the
    console script does; the SystemExit is turned into a return value.
    """
    try:
        app(args=list(argv if argv is not None else sys.argv[1:]), prog_name="zsl", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


from jobs.interop import register as _register_interop  # noqa: E402

_register_interop(app)  # embed-text, export, import, corpus, bridge


if __name__ == "__main__":
    run()
