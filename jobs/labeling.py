"""``zsl train``, ``methods``, ``evaluate``, ``label``, ``add-classes``, ``report``: zero-shot labeling."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import (AddressOpt, ConfigOpt, OverwriteOpt, SetOpt, WorkersOpt, exit_partial, key_values,
                         names_or_file, run_guarded, run_job)


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
    def flags() -> dict:
        params = key_values(param, "--param", "name")
        if epochs is not None:
            params["epochs"] = epochs
        return dict(features=features, classes=classes, seen=names_or_file(seen, "seen"), method=method,
                    output=output, semantics=semantics, params=params or None,
                    members=names_or_file(members, "members"), bridge=bridge, bridge_mode=bridge_mode, tune=tune,
                    calibration=calibration, seed=seed, overwrite=overwrite)

    def body(cfg):
        from pipeline.stages.train import run_train

        m = run_train(cfg)
        typer.echo(f"trained {m.method} on {m.n_train} images of {len(m.seen)} seen classes "
                   f"(gamma={m.gamma:.4f}) -> {cfg.output}")
    run_job("train", flags, config, set, body)


def methods() -> None:
    """List the ZSL methods and their hyper-parameters (defaults, and the --tune grid)."""
    def body():
        from pipeline.zsl.models import METHODS, method_params

        for name in sorted(METHODS):
            params = ", ".join(f"{k}={v!r}" for k, v in method_params(name).items())
            grid = METHODS[name].grid
            typer.echo(f"{name:9s} {params}" + (f"\n{'':9s} tune grid: {grid}" if grid else ""))
    run_guarded(body)


def _pct(v) -> str:
    return "  n/a" if v is None or v != v else f"{100 * v:5.1f}"


def print_table(rows: list[dict]) -> None:
    """The evaluation table: one line per model (ZSL, GZSL raw and calibrated, AUSUC)."""
    typer.echo(f"{'method':<10} {'semantics':<16} {'ZSL-U':>6} | {'S':>6} {'U':>6} {'H':>6} | {'S(cal)':>6} "
               f"{'U(cal)':>6} {'H(cal)':>6} {'gamma':>7} | {'AUSUC':>6}")
    for r in rows:
        line = (f"{r['method']:<10} {r['semantics']:<16} {_pct(r['zsl']):>6} | {_pct(r['S']):>6} {_pct(r['U']):>6} "
                f"{_pct(r['H']):>6} | {_pct(r['S_cal']):>6} {_pct(r['U_cal']):>6} {_pct(r['H_cal']):>6} "
                f"{r['gamma']:7.3f} | {_pct(r['ausuc']):>6}")
        if "zsl_trans" in r:
            line += f" | transductive ZSL-U {_pct(r['zsl_trans'])} H(cal) {_pct(r['H_cal_trans'])}"
        typer.echo(line)


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
    def flags() -> dict:
        return dict(models=list(model) if model else None, features=features, classes=classes,
                    unseen=names_or_file(unseen, "unseen"), json_path=json_path, html=html,
                    transductive=transductive, allow_train_features=allow_train_features)

    def body(cfg):
        from pipeline.stages.evaluate import run_evaluate_all

        print_table(run_evaluate_all(cfg)["table"])
    run_job("evaluate", flags, config, set, body)


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
    failed: dict = {}

    def body(cfg):
        from pipeline.stages.label import run_label

        m = run_label(cfg)
        typer.echo(f"labeled {m.n_labeled_this_run} images in {m.n_shards} shards against "
                   f"{len(m.classes)} classes -> {cfg.output}")
        _echo_diff(cfg.output, m)
        failed.update(m.failed_shards)
    run_job("label", dict(model=model, features=features, classes=classes, output=output, top_k=top_k,
                          calibrated=calibrated, address=address, num_workers=num_workers, overwrite=overwrite),
            config, set, body)
    exit_partial(failed)


def _echo_diff(output: str, m) -> None:
    """The moves of a relabel's label diff, one line."""
    if not m.last_diff or m.n_labeled_this_run == 0:
        return
    import json
    from pathlib import Path as _P

    summary = _P(output, m.last_diff, "summary.json")
    if summary.exists():
        d = json.loads(summary.read_text())
        moves = ", ".join(f"{p['old']} -> {p['new']} {p['n']}" for p in d["pairs"][:6])
        typer.echo(f"label diff {m.last_diff}: {d['moved']} of {d['compared']} images changed label"
                   + (f" ({moves}{', ...' if len(d['pairs']) > 6 else ''})" if moves else ""))


def add_classes(
    model: Optional[str] = typer.Option(None, help="Trained model directory (checked against the classes)."),
    classes: Optional[str] = typer.Option(None, help="`zsl classes` output to extend (updated in place)."),
    input: Optional[str] = typer.Option(None, help="Class table with the new classes (names/descriptions/attributes)."),
    relabel: Optional[str] = typer.Option(None, help="A `zsl label` output to re-label (in place) against the enlarged set."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Add classes from names/descriptions/attributes; optionally re-label existing features (no re-extraction)."""
    def body(cfg):
        from pipeline.stages.label import run_add_classes

        cm, added, lm = run_add_classes(cfg)
        typer.echo(f"added {len(added)} classes ({', '.join(added) or 'all were there already'}); "
                   f"{cm.n_classes} classes in {cfg.classes}")
        if lm is not None:
            typer.echo(f"re-labeled {lm.n_labeled_this_run} images against {len(lm.classes)} classes -> {cfg.relabel}")
            _echo_diff(cfg.relabel, lm)
    run_job("add-classes", dict(model=model, classes=classes, input=input, relabel=relabel), config, set, body)


def report(
    evaluation: Optional[list[str]] = typer.Option(None, help="`zsl evaluate --json` files (repeatable)."),
    search_json: Optional[list[str]] = typer.Option(None, "--search", help="`zsl search --json` files (repeatable)."),
    output: Optional[str] = typer.Option(None, help="HTML file to write."),
    title: Optional[str] = typer.Option(None),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Write one HTML report: metrics table, per-class accuracy, seen-unseen curves, search galleries."""
    def body(cfg):
        from pipeline.stages.report import run_report

        typer.echo(f"report: {run_report(cfg)}")
    run_job("report", dict(evaluation=evaluation or None, search=search_json or None, output=output, title=title),
            config, set, body)
