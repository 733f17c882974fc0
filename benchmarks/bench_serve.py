"""``make bench-serve``: load test of ``zsl serve`` on loopback, bounded in requests and seconds.

Builds a ``--rows`` image index (synthetic feature shards in the real format and an ESZSL text model,
as ``benchmarks.bench_scale`` makes them; the text encoder is the real offline MiniLM), starts
``zsl serve`` as a subprocess on a free 127.0.0.1 port, then runs ``--clients`` concurrent clients
(keep-alive HTTP connections) sending text queries for ``--seconds`` seconds (at most
``--max-requests``). Reports QPS, p50/p99 latency, errors and the server's RSS before and after,
to ``benchmarks/results/serve.json``. Traffic never leaves 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import typer

LOG = logging.getLogger("zsl.bench_serve")
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ["zebra", "a striped animal", "an animal with a long neck", "a small pet with whiskers", "a bird",
         "something that swims", "a large grey animal", "a horse", "a dog playing", "a cat sleeping",
         "an animal with hooves", "a spotted cat", "a monkey in a tree", "a farm animal", "a wild animal"]
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(port: int, stop_at: float, budget: list[int], lock: threading.Lock, out: list, errors: list,
            seed: int) -> None:
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.perf_counter() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        body = json.dumps({"text": WORDS[rng.integers(len(WORDS))], "k": 10})
        t = time.perf_counter()
        try:
            conn.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200 and len(json.loads(data)["hits"]) == 10
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        (out if ok else errors).append(time.perf_counter() - t)
    conn.close()


@app.command()
def main(rows: int = typer.Option(100_000), clients: int = typer.Option(8), seconds: float = typer.Option(20.0),
         max_requests: int = typer.Option(20_000), output: Path = typer.Option(RESULTS / "serve.json"),
         keep: bool = typer.Option(False)) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from benchmarks.bench_scale import World, make_scale_data

    work = Path(tempfile.mkdtemp(prefix="zsl-bench-serve-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    server = None
    try:
        LOG.info("building a %d-image index", rows)
        world = World(work, n_classes=1000, n_seen=800, latent_rank=8, noise=0.5, train_per_class=20,
                      shard_rows=100_000, seed=0)
        data = make_scale_data(world, work / "data", rows)
        subprocess.run([sys.executable, "-m", "jobs.cli", "index", "--features", data["features_dir"], "--model",
                        world.model_dir, "--output", str(work / "index"), "--max-memory", "2G"], check=True, env=env)
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--index", str(work / "index"),
                                   "--port", str(port), "--set", f"thumbnail_cache={work / 'thumbs'}"], env=env)
        t0 = time.perf_counter()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError("zsl serve did not come up")
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        # warm-up, then RSS before
        _client(port, time.perf_counter() + 2, [50], threading.Lock(), [], [], 99)
        rss_before = _rss_mb(server.pid)
        lat: list[float] = []
        errs: list[float] = []
        budget, lock = [max_requests], threading.Lock()
        stop_at = time.perf_counter() + seconds
        start = time.perf_counter()
        threads = [threading.Thread(target=_client, args=(port, stop_at, budget, lock, lat, errs, i))
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        rss_after = _rss_mb(server.pid)
        ms = np.asarray(lat) * 1000
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(), "rows": rows, "clients": clients,
            "seconds": round(wall, 2), "requests": len(lat) + len(errs), "errors": len(errs),
            "qps": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2),
            "server_ready_s": round(ready_s, 2), "server_rss_mb_before": round(rss_before, 1),
            "server_rss_mb_after": round(rss_after, 1),
            "index": json.loads((work / "index" / "manifest.json").read_text())["factory"],
            "notes": "text queries (MiniLM on CPU, batched across concurrent requests) + FAISS search, k=10, "
                     "keep-alive connections from client threads in this process, loopback only",
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(output)
    typer.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
