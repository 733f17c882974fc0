"""autofaiss next to our index: ``autofaiss build_index`` (pinned, in its own venv ``.venv-tools/autofaiss``,
made here when missing) over the same projected vectors, timed with the peak RSS of its process tree,
then loaded here and measured as ours is (same queries, same exact ground truth)."""

from __future__ import annotations

import gc
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.scale_data import measure_recall
from benchmarks.scale_index import apply_params, effective_params
from benchmarks.scale_memory import mb, run_measured, self_rss
from pipeline.core.timing import timed

LOG = logging.getLogger("zsl.bench_scale")
AUTOFAISS_VERSION = "2.18.0"
AUTOFAISS_VENV = Path(__file__).resolve().parents[1] / ".venv-tools" / "autofaiss"  # made by `make tools`
AUTOFAISS_PINS = (f"autofaiss=={AUTOFAISS_VERSION}", "numpy<2", "pyarrow<17")


def ensure_autofaiss(venv: Path, *, log: Path) -> dict:
    """autofaiss ``AUTOFAISS_VERSION`` in its own venv: reused when it imports, else (re)created."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import importlib.metadata as m, faiss, autofaiss, numpy; "
             "print(m.version('autofaiss'), faiss.__version__, numpy.__version__)"]

    def check() -> list[str] | None:
        if not py.exists():
            return None
        r = subprocess.run(probe, capture_output=True, text=True)
        parts = r.stdout.split()
        return parts if r.returncode == 0 and parts and parts[0] == AUTOFAISS_VERSION else None

    with timed() as clock:
        found = check()
        created = found is None
        if created:
            _create_venv(venv, log=log)
            found = check()
            if found is None:
                raise RuntimeError(f"{venv}: autofaiss {AUTOFAISS_VERSION} does not import after installing it")
    return {"venv": str(venv), "autofaiss": found[0], "faiss": found[1], "numpy": found[2], "created": created,
            "seconds": round(clock.seconds, 1), "pins": list(AUTOFAISS_PINS)}


def _create_venv(venv: Path, *, log: Path) -> None:
    """A fresh venv at ``venv`` with ``AUTOFAISS_PINS`` installed by pip (its output in ``log``)."""
    LOG.info("creating %s with %s (pip, a minute or so)", venv, " ".join(AUTOFAISS_PINS))
    shutil.rmtree(venv, ignore_errors=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        for cmd in ([sys.executable, "-m", "venv", str(venv)],
                    [str(venv / "bin" / "pip"), "install", "--quiet", *AUTOFAISS_PINS]):
            r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed (status {r.returncode}); see {log}:\n"
                                   f"{log.read_text(errors='replace')[-2000:]}")


def autofaiss_command(venv: Path, emb_dir: str, out: Path, *, max_memory: str, memory_available: str) -> list[str]:
    return [str(venv / "bin" / "autofaiss"), "build_index", f"--embeddings={emb_dir}",
            f"--index_path={out / 'knn.index'}", f"--index_infos_path={out / 'infos.json'}", "--metric_type=ip",
            f"--max_index_memory_usage={max_memory}", f"--current_memory_available={memory_available}"]


def autofaiss_timings(log: str) -> dict:
    """Seconds of autofaiss's top-level steps, from its ``>>> Finished "STEP" in N secs`` log lines."""
    out: dict = {}
    for m in re.finditer(r'>>> Finished "([^"]+)" in ([0-9.]+) secs', log):
        name = re.sub(r" /\S+", "", m.group(1)).strip(" ->")  # drop paths ("... for index /tmp/...")
        out[name] = out.get(name, 0.0) + float(m.group(2))
    return out


def bench_autofaiss(venv: Path, data: dict, work: Path, Q, gt_ids, *, max_memory: str, memory_available: str,
                    env: dict, poll_s: float) -> tuple[dict, object]:
    """``autofaiss build_index`` of the projected vectors (wall time, peak RSS), load time and recall."""
    import faiss

    from pipeline.core.units import parse_memory

    out = work / "index-autofaiss"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = autofaiss_command(venv, data["emb_dir"], out, max_memory=max_memory, memory_available=memory_available)
    m = run_measured(cmd, log=work / "logs" / "autofaiss.log", env=env, cwd=str(out), poll_s=poll_s,
                     what="autofaiss build_index")
    infos = json.loads((out / "infos.json").read_text()) if (out / "infos.json").exists() else {}
    timings = autofaiss_timings((work / "logs" / "autofaiss.log").read_text(errors="replace"))
    gc.collect()
    rss0 = self_rss()
    with timed() as load:
        index = faiss.read_index(str(out / "knn.index"))
    gc.collect()
    rss_delta = self_rss() - rss0
    params = infos.get("index_param")
    params_error = apply_params(index, params)
    res = {
        "factory": infos.get("index_key"), "search_params": params, "effective_params": effective_params(index),
        "search_params_error": params_error, "infos": infos, "command": cmd, "timings": timings,
        "build_seconds": m["seconds"], "peak_rss_mb": mb(m["peak_rss_bytes"]),
        "polled_tree_peak_rss_mb": mb(m["polled_tree_peak_rss_bytes"]),
        "root_hwm_mb": mb(m["root_hwm_bytes"]),
        "index_file_bytes": (out / "knn.index").stat().st_size, "max_memory_bytes": parse_memory(max_memory),
        "load_seconds": load.seconds, "loaded_rss_delta_mb": mb(rss_delta), "ntotal": int(index.ntotal),
        "load": "faiss.read_index(path) (read into memory)",
    }
    metrics_s = timings.get("Compute fast metrics")
    res["build_seconds_minus_fast_metrics"] = m["seconds"] - metrics_s if metrics_s is not None else None
    res["within_budget"] = res["index_file_bytes"] <= res["max_memory_bytes"]
    if index.ntotal != data["n_rows"]:
        raise RuntimeError(f"autofaiss index holds {index.ntotal} vectors, expected {data['n_rows']}")
    res.update(measure_recall(index, Q, gt_ids))
    return res, index
