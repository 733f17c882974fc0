"""Options every ``zsl`` command shares."""

from __future__ import annotations

import typer

ConfigOpt = typer.Option(None, "--config", help="Extra YAML config file (overrides conf/<job>.yaml).")
SetOpt = typer.Option(None, "--set", help="Override a config key: --set key=value (repeatable).")
OverwriteOpt = typer.Option(None, "--overwrite/--no-overwrite",
                            help="Replace an output made from other inputs or settings (default: refuse).")
