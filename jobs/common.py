"""What every ``zsl`` command shares: config layering, logging, bad-input handling, shared options.

A command builds its typed config from ``conf/<job>.yaml`` (plus ``--config FILE`` and
``--set key=value`` overrides, then flags), sets up logging, and calls the library.
Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import typer
import yaml

LOG = logging.getLogger("zsl")
CONF_DIR = Path(os.environ.get("ZSL_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))

ConfigOpt = typer.Option(None, "--config", help="Extra YAML config file (overrides conf/<job>.yaml).")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set key=value (repeatable).")
OverwriteOpt = typer.Option(None, "--overwrite/--no-overwrite",
                            help="Replace an output made from other inputs or settings (default: refuse).")
AddressOpt = typer.Option(None, help="Ray cluster address: run the per-shard work there.")
WorkersOpt = typer.Option(None, help="Ray workers (default: the cluster's CPUs - 1).")


#: Exit status of a command that finished but left some items out (``zsl label``/``index``: feature shards that
#: cannot be read, listed on stderr and in the manifest's ``failed_shards``; a rerun retries them).
#: Bad config or input, with nothing changed, is status 2 (:func:`run_guarded`).
EXIT_PARTIAL = 3


class BadInput(Exception):
    """Reported as a one-line message with exit status 2."""


def setup_logging() -> dict:
    """Log to stderr at ``$ZSL_LOG_LEVEL`` (else ``conf/base.yaml``'s ``log_level``); returns base.yaml."""
    base = read_yaml(CONF_DIR / "base.yaml") if (CONF_DIR / "base.yaml").exists() else {}
    level = os.environ.get("ZSL_LOG_LEVEL", base.get("log_level", "INFO"))
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    else:
        root.setLevel(level)
    for noisy in ("ray", "ray.data", "sentence_transformers", "httpx", "urllib3", "filelock", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return base


def read_yaml(path: Path | str) -> dict:
    """A YAML mapping; a missing file, bad YAML or a non-mapping is :class:`BadInput` naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise BadInput(f"config file {path} not found") from None
    except yaml.YAMLError as exc:
        raise BadInput(f"config file {path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise BadInput(f"config file {path}: expected a mapping of key: value")
    return data


def key_values(items: list[str] | None, option: str = "--set", key: str = "key") -> dict:
    """``key=value`` options (values read as YAML) -> {key: value}; ``option`` and ``key`` name them in errors."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise BadInput(f"{option} {item!r}: expected {key}=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def load_config(job: str, flags: dict[str, Any], config: Path | None = None, sets: list[str] | None = None):
    """The job's typed config from ``conf/<job>.yaml``, ``--config FILE``, ``--set k=v`` and the flags given,
    later layers winning; every error names the key and the layer it came from."""
    from pipeline.core.config import build_config

    conf_file = CONF_DIR / f"{job}.yaml"
    layers = [(_shown(conf_file), read_yaml(conf_file) if conf_file.exists() else {})]
    if config:
        layers.append((str(config), read_yaml(config)))
    layers += [("--set", key_values(sets)), ("the command line", flags)]
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
    if Path(value).is_file():
        from pipeline.core.fs import read_names

        try:
            return read_names(value, key)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise BadInput(f"--{key}: no class names given")
    return names


def run_guarded(fn: Callable[[], None]) -> None:
    """Set up logging and run a command body; bad input exits with status 2 and one line on stderr."""
    from pipeline.core.config import ConfigError

    setup_logging()
    try:
        fn()
    except (BadInput, ConfigError, ValueError, FileNotFoundError, PermissionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        typer.echo(f"zsl: error: {msg}", err=True)
        raise typer.Exit(2) from None


def run_job(job: str, flags: dict | Callable[[], dict], config: Path | None, sets: list[str] | None,
            body: Callable[[Any], None]) -> None:
    """``body(cfg)`` with the job's layered config, under :func:`run_guarded`. ``flags`` may be a function
    returning them, so that reading the flags (class-name files, ``name=value`` lists) reports bad input too."""
    def go() -> None:
        body(load_config(job, flags() if callable(flags) else flags, config, sets))
    run_guarded(go)



def exit_partial(failed: dict[str, str]) -> None:
    """List ``failed`` (item -> why) on stderr and exit :data:`EXIT_PARTIAL` when there are any."""
    if failed:
        for item, why in list(failed.items())[:20]:
            typer.echo(f"zsl: failed: {item}: {why}", err=True)
        typer.echo(f"zsl: {len(failed)} item(s) failed; the others are done, and a rerun retries these", err=True)
        raise typer.Exit(EXIT_PARTIAL)
