"""The GPU check cannot rot: `infra/device/run-check.sh` runs benchmarks/device_check.py in its CPU
mode, tiny, with ray, faiss and pydantic made unimportable (the borrowed GPU machines have none of
them), and `make device-check`'s preparation stays within what one command may carry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = '''import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "faiss", "pydantic", "pydantic_core"):
            raise ImportError(name + " is not on the GPU machine")
sys.meta_path.insert(0, _Absent())
'''


@pytest.mark.timeout(400)
def test_the_device_check_runs_without_ray_faiss_or_pydantic(tmp_path):
    (tmp_path / "absent").mkdir()
    (tmp_path / "absent" / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "absent"), "PYTHON": sys.executable, "MODE": "cpu",
           "OUT": str(tmp_path / "out"), "TQDM_DISABLE": "1"}
    r = subprocess.run(["bash", "infra/device/run-check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert all(res["env"][m].startswith("missing") for m in ("ray", "faiss", "pydantic")), res["env"]
    for section in ("encode", "agree", "decode", "search"):
        assert "error" not in res[section], (section, res[section])
    assert {k.split("|")[0] for k in res["encode"] if k != "seconds"} == {"effnet-lite0", "open_clip:ViT-B-32"}
    assert all(v["images_per_s"] > 0 for k, v in res["encode"].items() if k != "seconds")
    assert res["agree"]["effnet-lite0|fp32"]["max_abs_diff"] < 1e-5
    assert res["agree"]["open_clip:ViT-B-32|fp32"]["min_cosine"] > 0.9999
    assert res["decode"]["cpu_pillow_images_per_s"] > 0 and res["decode"]["torchvision_decode_jpeg_images_per_s"] > 0
    assert res["search"]["recall_at_10_vs_numpy"] == 1.0 and "finished" in res


def test_what_travels_fits_one_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.device_prepare", "--out", str(tmp_path / "dev"),
                        "--no-wheels", "--images", "40"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "in all (40 JPEGs" in r.stdout and "infra/device/run-check.sh" in r.stdout
    with tarfile.open(tmp_path / "dev" / "jpegs.tar") as tar:
        names = tar.getnames()
        first = tar.extractfile(names[0]).read()
    assert len(names) == 40 and first[:3] == b"\xff\xd8\xff"
