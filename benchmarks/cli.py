"""The one way a benchmark harness runs its typer app in-process (``main(argv)``): the offline
environment the pipeline needs, the project's logging, and an exit status instead of ``SystemExit``."""

from __future__ import annotations

import os
import sys

import typer

#: what every harness (and the ``zsl`` commands it starts) runs with: no network, no telemetry
OFFLINE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str) -> int:
    """Run ``app`` on ``argv`` (default: the command line); the exit status (2 for usage errors).
    Standalone mode lets click/typer report usage errors themselves, whichever click they bundle
    (typer >= 0.2x vendors its own, whose exceptions are not ``click.ClickException``)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from jobs.common import setup_logging

    setup_logging()
    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=list(argv if argv is not None else sys.argv[1:]), prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
