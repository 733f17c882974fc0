"""`zsl serve --ray`: the same app as a Ray Serve deployment (one replica per node) on a local Ray
instance, answering over HTTP on a free loopback port."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("ray.serve")


def test_the_rayservice_import_path_builds_the_one_deployment():
    """infra/rayservice-serve.yaml's import_path builds the deployment of pipeline.cluster.ray_serve, under
    the name its deployments section configures (no Ray started)."""
    import importlib
    from pathlib import Path

    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "infra" / "rayservice-serve.yaml").read_text())
    (app_cfg,) = yaml.safe_load(spec["spec"]["serveConfigV2"])["applications"]
    module, attr = app_cfg["import_path"].split(":")
    app = getattr(importlib.import_module(module), attr)()
    assert type(app).__name__ == "Application"
    assert app._bound_deployment.name in {d["name"] for d in app_cfg["deployments"]}
    assert app._bound_deployment._replica_config.max_replicas_per_node == 1


@pytest.mark.slow  # ~30 s: Ray + Serve start-up
def test_ray_serve_deployment_answers(serve_world, tmp_path, free_port):
    import ray
    from ray import serve

    from pipeline.core.config import ServeConfig
    from pipeline.stages.serve import ray_app, run_serve

    assert type(ray_app()).__name__ == "Application"  # what infra/rayservice-serve.yaml imports

    s, root, _, _ = serve_world
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/zr-serve-{os.getpid()}")
    port = free_port()
    try:
        cfg = ServeConfig(indexes={"animals": str(root / "moved")}, port=port, preload_text=False,
                          thumbnail_cache=str(tmp_path / "thumbs"), ray=True)
        run_serve(cfg, blocking=False)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = json.loads(urllib.request.urlopen(base + "/health", timeout=2).read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert health == {"status": "ok", "indices": ["animals"]}
        q = s.text_queries(["okapi"])[0].tolist()
        req = urllib.request.Request(base + "/search", data=json.dumps({"embedding": q, "k": 3}).encode(),
                                     headers={"Content-Type": "application/json"})
        hits = json.loads(urllib.request.urlopen(req, timeout=10).read())["hits"]
        assert [h["label"] for h in hits] == ["okapi"] * 3
        assert np.isfinite([h["score"] for h in hits]).all()
    finally:
        serve.shutdown()
        ray.shutdown()
