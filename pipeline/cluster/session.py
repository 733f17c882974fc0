"""Connecting to a Ray cluster, or starting a local one sized to this machine."""

from __future__ import annotations

import logging
import os
import tempfile

LOG = logging.getLogger(__name__)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or start a local cluster sized to this machine (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=True,
                  logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray's session files stay out of the working tree (and socket paths short).
        temp_dir = os.environ.get("ZSL_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "zsl-ray"))
        ray.init(num_cpus=num_cpus or os.cpu_count(), _temp_dir=temp_dir, **kwargs)
