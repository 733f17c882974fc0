"""``make bench-serve``: load test of ``zsl serve`` on loopback, bounded in requests and seconds.

Builds a ``--rows`` image index (synthetic feature shards in the real format and an ESZSL text model,
as ``benchmarks.bench_scale`` makes them; the text encoder is the real offline MiniLM), starts
``zsl serve`` as a subprocess on a free 127.0.0.1 port, then runs ``--clients`` concurrent clients
(keep-alive HTTP connections) sending text queries for ``--seconds`` seconds (at most
``--max-requests``), in two phases against the same server:

- ``zipf``: queries drawn from a pool of ``--pool`` distinct phrases with Zipf(1.0) frequencies, as
  query logs are; the server's query cache answers the repeats (its hit rate is reported);
- ``unique``: every query a phrase never sent before (the cache cannot help): the cold text path.

Each ``--server`` setting (default: the text model on PyTorch, then on ONNX Runtime) gets a fresh
server on the same index with the same query streams, so the settings are compared side by side.
Reports QPS, p50/p99 latency, errors and the server's RSS before and after each phase, to
``benchmarks/results/serve.json``.

Then the ``mixed`` phase (:mod:`benchmarks.serve_mixed`), ``--mixed-repeats`` runs on one fresh server:
``--mixed-clients`` clients mixing text, image, thumbnail and label-filtered queries with a ``/health``
prober; the index's features pose as EfficientNet-Lite0's (image queries run the real encoder) and its
uris cycle over ``--images`` real JPEGs (thumbnails). Traffic never leaves 127.0.0.1.
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

from benchmarks.serve_mixed import GOALS, Mix, medians, mixed_phase, write_images

LOG = logging.getLogger("zsl.bench_serve")
RESULTS = Path(__file__).resolve().parent / "results"
ADJ = ["striped", "spotted", "small", "large", "grey", "brown", "black", "white", "young", "old", "wild",
       "sleeping", "running", "swimming", "hungry", "furry", "tiny", "huge", "curious", "shy", "fast", "slow",
       "noisy", "quiet", "wet", "muddy", "golden", "pale", "dark", "friendly"]
NOUN = ["zebra", "horse", "dog", "cat", "bird", "cow", "sheep", "giraffe", "elephant", "bear", "monkey",
        "tiger", "lion", "wolf", "fox", "deer", "rabbit", "mouse", "owl", "eagle", "duck", "goose", "fish",
        "whale", "dolphin", "seal", "otter", "beaver", "camel", "llama", "goat", "pig", "donkey", "mule",
        "okapi", "hippo", "rhino", "bat", "squirrel", "hedgehog"]
WHERE = ["", " in a tree", " on a farm", " in the snow", " near water", " in a field", " at night",
         " in a zoo", " with its young", " eating grass", " playing", " in the desert", " on a rock", " in a forest"]


def phrases(seed: int) -> list[str]:
    """Every 'a(n) <adj> <noun><where>' phrase (16,800), shuffled by ``seed``."""
    out = [f"a {a} {n}{w}" for a in ADJ for n in NOUN for w in WHERE]
    np.random.default_rng(seed).shuffle(out)
    return out


class Queries:
    """Thread-safe query source: Zipf(1.0) over a fixed pool, or each phrase once."""

    def __init__(self, pool: list[str], zipf: bool, seed: int) -> None:
        self.pool, self.zipf, self.i = pool, zipf, 0
        self.rng = np.random.default_rng(seed)
        w = np.cumsum(1.0 / np.arange(1, len(pool) + 1))
        self.cdf = w / w[-1]
        self.lock = threading.Lock()

    def __call__(self) -> str:
        with self.lock:
            if self.zipf:
                return self.pool[min(int(np.searchsorted(self.cdf, self.rng.random())), len(self.pool) - 1)]
            self.i += 1
            return self.pool[(self.i - 1) % len(self.pool)]


N_CLASSES = 1000
#: The mixed phase's texts: every phrase after each prefix (84,000, none sent by the text phases).
MIXED_PREFIXES = ["a photo of ", "a picture of ", "an image of ", "a drawing of ", "a close-up of "]
NOTES = ("text queries (MiniLM on CPU, 5 prompt templates per query, batched across concurrent requests) + FAISS "
         "search, k=10, keep-alive connections from client threads in this process, loopback only; 'zipf': a "
         "pool of distinct phrases with Zipf(1.0) frequencies (the server's query cache answers repeats), "
         "'unique': every query new (cold path); one fresh server per setting (text_workers=0: one text thread "
         "per core), same index, same query streams; 'mixed': see benchmarks/serve_mixed.py (503s of the image "
         "pool, with Retry-After, are counted apart from errors)")

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
            next_query) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.perf_counter() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        body = json.dumps({"text": next_query(), "k": 10})
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


def _cache_counts(port: int) -> tuple[int, int]:
    """(hits, misses) of the server's query cache, from /metrics."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    get = lambda name: sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(name))  # noqa: E731
    return get("zsl_query_cache_hits_total"), get("zsl_query_cache_misses_total")


def _indices(port: int) -> list[dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/indices")
    return json.loads(c.getresponse().read())


def _start_server(work: Path, setting: str, env: dict) -> tuple[subprocess.Popen, int, float]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--index", str(work / "index"),
                               "--port", str(port), "--set", f"thumbnail_cache={work / 'thumbs'}",
                               *(a for kv in setting.split(",") if kv for a in ("--set", kv))], env=env)
    t0 = time.perf_counter()
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return server, port, time.perf_counter() - t0
        except OSError:
            pass
        if server.poll() is not None or time.perf_counter() - t0 > 120:
            server.kill()
            raise RuntimeError("zsl serve did not come up")
        time.sleep(0.2)


def _phase(server: subprocess.Popen, port: int, source, clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` threads sending ``source()`` texts for ``seconds`` (at most ``max_requests``)."""
    hits0 = _cache_counts(port)
    rss_before = _rss_mb(server.pid)
    lat: list[float] = []
    errs: list[float] = []
    budget, lock = [max_requests], threading.Lock()
    stop_at = time.perf_counter() + seconds
    start = time.perf_counter()
    threads = [threading.Thread(target=_client, args=(port, stop_at, budget, lock, lat, errs, source))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    hits1 = _cache_counts(port)
    ms = np.asarray(lat) * 1000
    looked = (hits1[0] - hits0[0]) + (hits1[1] - hits0[1])
    return {
        "seconds": round(wall, 2), "requests": len(lat) + len(errs), "errors": len(errs),
        "qps": round(len(lat) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2),
        "cache_hit_rate": round((hits1[0] - hits0[0]) / looked, 3) if looked else None,
        "server_rss_mb_before": round(rss_before, 1), "server_rss_mb_after": round(_rss_mb(server.pid), 1),
    }


def _build(work: Path, rows: int, images: int, env: dict) -> None:
    """The ``rows``-image index under ``work/index`` (kept when ``work`` already holds one): synthetic
    features posing as EfficientNet-Lite0's (so image queries encode with the real model), whose uris
    cycle over ``images`` real JPEGs (for thumbnails)."""
    from benchmarks.scale_data import World, make_scale_data

    if (work / "index" / "manifest.json").exists():
        LOG.info("reusing the index in %s", work)
        return
    LOG.info("building a %d-image index", rows)
    files = write_images(work / "images", images, seed=0)
    world = World(work, n_classes=N_CLASSES, n_seen=800, latent_rank=8, noise=0.5, train_per_class=20,
                  shard_rows=100_000, seed=0)
    data = make_scale_data(world, work / "data", rows, uri_of=lambda i: str(files[i % len(files)]),
                           config={"encoder": "effnet-lite0", "pretrained": None, "input": str(work / "images")})
    subprocess.run([sys.executable, "-m", "jobs.cli", "index", "--features", data["features_dir"], "--model",
                    world.model_dir, "--output", str(work / "index"), "--max-memory", "2G"], check=True, env=env)


def _text_phases(work: Path, setting: str, env: dict, *, words: list[str], pool: int, clients: int,
                 seconds: float, max_requests: int) -> dict:
    """The zipf and unique text phases on a fresh server with ``setting``."""
    proc, port, ready_s = _start_server(work, setting, env)
    try:
        # warm-up (phrases used by neither phase)
        _client(port, time.perf_counter() + 2, [50], threading.Lock(), [], [], Queries(words[-100:], False, 0))
        res = {"setting": setting, "server_ready_s": round(ready_s, 2), "phases": {}}
        sources = {"zipf": Queries(words[:pool], True, 1), "unique": Queries(words[pool:-100], False, 2)}
        for phase, source in sources.items():
            res["phases"][phase] = _phase(proc, port, source, clients, seconds, max_requests)
            LOG.info("%s %s: %s", setting, phase, res["phases"][phase])
        res["text_backend"] = _indices(port)[0].get("text_backend")
        return res
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _labels(index: Path) -> list[str]:
    """The labels the index's rows carry (the filtered queries' labels: each has rows)."""
    import pyarrow.parquet as pq

    return sorted(set(pq.read_table(index / "ids.parquet", columns=["label"]).column(0).to_pylist()))


def _mixed(work: Path, setting: str, env: dict, *, words: list[str], rows: int, clients: int, seconds: float,
           repeats: int, max_requests: int, kinds: dict[str, float] | None = None, honour: bool = True) -> dict:
    """``repeats`` runs of the mixed phase (:mod:`benchmarks.serve_mixed`) on a fresh server with
    ``setting``, after a 3 s warm-up (the image encoder and the label sets load); every text new."""
    texts = Queries([f"{pre}{p}" for pre in MIXED_PREFIXES for p in words], False, 3)
    mix = Mix(texts=texts, images=sorted((work / "images").glob("*.jpg")),
              labels=_labels(work / "index"), rows=rows, kinds=kinds)
    proc, port, ready_s = _start_server(work, setting, env)
    try:
        mixed_phase(port, proc.pid, mix, clients=8, seconds=3, max_requests=max_requests, seed=999)
        runs = []
        for r in range(repeats):
            runs.append(mixed_phase(port, proc.pid, mix, clients=clients, seconds=seconds,
                                    max_requests=max_requests, seed=r, honour_retry_after=honour))
            LOG.info("mixed run %d: %s", r, json.dumps(runs[-1]["goals"]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"setting": setting, "server_ready_s": round(ready_s, 2), "clients": clients, "seconds": seconds,
            "mix": mix.weights, "clients_honour_retry_after": honour, "goal": GOALS, "query_image_bytes_mean": mix.image_bytes, "median": medians(runs),
            "errors_all_runs": sum(r["goals"]["errors"] for r in runs), "runs": runs}


@app.command()
def main(rows: int = typer.Option(100_000), clients: int = typer.Option(8), seconds: float = typer.Option(20.0),
         max_requests: int = typer.Option(20_000), output: Path = typer.Option(RESULTS / "serve.json"),
         pool: int = typer.Option(5_000, help="Distinct phrases of the zipf phase."),
         server: list[str] = typer.Option(["text_backend=torch", "text_backend=onnx"], help=(
             "Server settings to compare, one fresh server each: `zsl serve --set` KEY=VALUE[,KEY=VALUE]")),
         text_phases: bool = typer.Option(True, "--text-phases/--no-text-phases",
                                          help="Run the zipf and unique phases."),
         mixed_clients: int = typer.Option(50), mixed_seconds: float = typer.Option(20.0),
         mixed_repeats: int = typer.Option(3, help="Runs of the mixed phase (0: none)."),
         mixed_server: str = typer.Option("", help="`--set` settings of the mixed phase's server (default: none)."),
         honour_retry_after: bool = typer.Option(True, "--honour-retry-after/--ignore-retry-after", help=(
             "Mixed-phase clients wait a 503's Retry-After before their next request (else: at once).")),
         mixed_kinds: str = typer.Option("", help="KIND=WEIGHT,... of the mixed phase (default: serve_mixed.KINDS)."),
         images: int = typer.Option(64, help="Distinct JPEGs the index's uris cycle over."),
         work_dir: Path | None = typer.Option(None, "--work",
                                              help="Scratch folder, kept (its index reused when it holds one)."),
         keep: bool = typer.Option(False)) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = work_dir or Path(tempfile.mkdtemp(prefix="zsl-bench-serve-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    try:
        _build(work, rows, images, env)
        words = phrases(0)
        result = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(), "rows": rows, "clients": clients,
            "pool": pool, "index": json.loads((work / "index" / "manifest.json").read_text())["factory"],
            "notes": NOTES, "servers": {},
        }
        for setting in server if text_phases else []:
            result["servers"][setting] = _text_phases(work, setting, env, words=words, pool=pool, clients=clients,
                                                      seconds=seconds, max_requests=max_requests)
        if mixed_repeats:
            result["mixed"] = _mixed(work, mixed_server, env, words=words, rows=rows, clients=mixed_clients,
                                     seconds=mixed_seconds, repeats=mixed_repeats, max_requests=max_requests,
                                     kinds={k: float(w) for k, w in (kv.split("=") for kv in mixed_kinds.split(",") if kv)}
                                     or None, honour=honour_retry_after)
    finally:
        if not keep and work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(output)
    typer.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
