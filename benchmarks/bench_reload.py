"""``make bench-reload``: ``zsl serve`` follows its index under load, on loopback.

Builds a ``--rows`` image index from the first 4 of 5 synthetic feature shards (the real format; an
ESZSL text model; the real offline MiniLM encodes the text queries) and serves it with ``zsl serve
--reload-interval``. While ``--clients`` threads send text queries, it

1. **adds** the fifth shard (``zsl index`` on the grown feature directory: the ``add`` plan), then
2. **rebuilds** (``zsl index --overwrite``) from the same shards in another order, so every faiss
   id names another image than before,

and checks every reply against the id table of the version it names (``version`` in each reply;
each version's ``ids.parquet`` read once its ``zsl index`` run ended): 5xx and other errors, hits
whose uri is not their id's in that version, and whether the added images are found once their
version serves. The server's RSS is sampled throughout; at the end a fresh server on the final
index gets the same warm-up and load, and the two RSS figures are compared (the old versions are
released: within 10 %). Writes ``benchmarks/results/reload.json``. Traffic never leaves 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import typer

from benchmarks.bench_serve import _free_port, _rss_mb, phrases

LOG = logging.getLogger("zsl.bench_reload")
RESULTS = Path(__file__).resolve().parent / "results"
app = typer.Typer(add_completion=False)


class Load:
    """``clients`` threads sending new text queries until stopped; every reply kept (status,
    version, hits' (faiss_id, uri)), its latency too."""

    def __init__(self, port: int, clients: int, texts: list[str]) -> None:
        self.port, self.texts, self.next = port, texts, 0
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.replies: list[tuple[int, str | None, list[tuple[int, str]], float]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _text(self) -> str:
        with self.lock:
            self.next += 1
            return self.texts[self.next % len(self.texts)]

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stop.is_set():
            body = json.dumps({"text": self._text(), "k": 10})
            t = time.perf_counter()
            try:
                conn.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = json.loads(resp.read())
                status = resp.status
            except (OSError, http.client.HTTPException, ValueError):
                status, data = 0, {}
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            hits = [(h["faiss_id"], h["uri"]) for h in data.get("hits", [])] if status == 200 else []
            with self.lock:
                self.replies.append((status, data.get("version"), hits, time.perf_counter() - t))
        conn.close()


class RssSampler:
    """The server's RSS every 0.1 s (``peak`` and the samples between marks)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.samples, self.stop = pid, [], threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self.samples.append(_rss_mb(self.pid))

    def now(self, seconds: float = 2.0) -> float:
        """The median RSS over the next ``seconds``."""
        n0 = len(self.samples)
        time.sleep(seconds)
        return float(np.median(self.samples[n0:] or [_rss_mb(self.pid)]))


def _get(port: int, path: str):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    return json.loads(c.getresponse().read())


def _serve(index: Path, work: Path, env: dict, reload_s: float) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--index", f"idx={index}", "--port", str(port),
                             "--reload-interval", str(reload_s), "--set", f"thumbnail_cache={work / 'thumbs'}"],
                            env=env)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 180:
        try:
            if _get(port, "/health").get("status"):
                return proc, port
        except (OSError, ValueError):
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("zsl serve did not come up")


def _features(src: Path, out: Path, order: list[int], rows_per_shard: list[int]) -> str:
    """A feature directory whose shard ``i`` is ``src``'s shard ``order[i]``."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "features").mkdir(parents=True)
    for i, j in enumerate(order):
        shutil.copy(src / "features" / f"shard-{j:06d}.parquet", out / "features" / f"shard-{i:06d}.parquet")
    man = json.loads((src / "manifest.json").read_text())
    man.update(n_shards=len(order), n_images=sum(rows_per_shard[j] for j in order))
    (out / "manifest.json").write_text(json.dumps(man))
    return str(out)


def _snapshot(index: Path) -> tuple[str, np.ndarray]:
    """The finished index's version and its uri per faiss id."""
    from pipeline.index.store import read_ids, version_on_disk

    return version_on_disk(str(index)), np.asarray(read_ids(str(index)).column("uri").to_pylist(), object)


def _index(features: str, model: str, index: Path, env: dict, *extra: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.cli", "index", "--features", features, "--model", model,
                    "--output", str(index), "--max-memory", "2G", *extra], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _switch(port: int, version: str, timeout: float = 120) -> float:
    """Seconds until ``/indices`` names ``version``."""
    t0 = time.perf_counter()
    while _get(port, "/indices")[0]["version"] != version:
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"the server never switched to version {version}")
        time.sleep(0.05)
    return time.perf_counter() - t0


def _check(replies, versions: dict[str, np.ndarray], old_n: int) -> dict:
    """Errors, wrong uris and the new images found, over every reply."""
    wrong = unknown = 0
    per_version: dict[str, int] = {}
    new_found = 0
    for status, ver, hits, _ in replies:
        if status != 200:
            continue
        per_version[ver] = per_version.get(ver, 0) + 1
        uris = versions.get(ver)
        if uris is None:
            unknown += 1
            continue
        wrong += sum(uris[i] != u for i, u in hits)
        new_found += ver == list(versions)[1] and any(i >= old_n for i, _ in hits)
    status = [r[0] for r in replies]
    ms = np.asarray([r[3] for r in replies if r[0] == 200]) * 1000
    return {"requests": len(replies), "ok": status.count(200), "5xx": sum(s >= 500 for s in status),
            "other_errors": sum(s != 200 and s < 500 for s in status), "wrong_uris": int(wrong),
            "replies_of_unknown_versions": unknown, "replies_per_version": per_version,
            "added_version_replies_with_new_images": int(new_found),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


@app.command()
def main(rows: int = typer.Option(100_000), clients: int = typer.Option(4),
         settle: float = typer.Option(5.0, help="Seconds of load after each switch before RSS is read."),
         output: Path = typer.Option(RESULTS / "reload.json"), keep: bool = typer.Option(False)) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from benchmarks.scale_data import World, make_scale_data

    work = Path(tempfile.mkdtemp(prefix="zsl-bench-reload-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    try:
        world = World(work, n_classes=1000, n_seen=800, latent_rank=8, noise=0.5, train_per_class=20,
                      shard_rows=-(-rows // 5), seed=0)
        data = make_scale_data(world, work / "data", rows)
        src, idx = Path(data["features_dir"]), work / "index"
        per = [min(world.shard_rows, rows - i * world.shard_rows) for i in range(5)]
        first = _features(src, work / "served", [0, 1, 2, 3], per)
        build_s = _index(first, world.model_dir, idx, env)
        versions = dict([_snapshot(idx)])
        texts = phrases(0)
        result = _run(work, idx, env, world.model_dir, src, per, versions, texts, clients, settle)
        result.update(rows=rows, clients=clients, build_s=round(build_s, 1), cpus=os.cpu_count(),
                      date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    typer.echo(json.dumps(result, indent=2))


def _run(work, idx, env, model, src, per, versions, texts, clients, settle) -> dict:
    old_n = sum(per[:4])
    proc, port = _serve(idx, work, env, reload_s=0.5)
    rss = RssSampler(proc.pid)
    out: dict = {"steps": {}}
    try:
        with Load(port, clients, texts[:8000]) as load:
            out["rss_mb_first_version"] = round(rss.now(settle), 1)
            _features(src, work / "served", [0, 1, 2, 3, 4], per)  # the grown directory
            steps = [("add", lambda: _index(str(work / "served"), model, idx, env)),
                     ("overwrite", lambda: _index(_features(src, work / "shuffled", [4, 3, 2, 1, 0], per), model,
                                                  idx, env, "--overwrite"))]
            for name, run in steps:
                took = run()
                ver, uris = _snapshot(idx)
                versions[ver] = uris
                out["steps"][name] = {"index_s": round(took, 1), "switch_s": round(_switch(port, ver), 2),
                                      "version": ver, "ntotal": len(uris), "rss_mb_after": round(rss.now(settle), 1)}
                LOG.info("%s: %s", name, out["steps"][name])
        out["load"] = _check(load.replies, versions, old_n)
        out["rss_mb_peak"] = round(max(rss.samples), 1)
        out["rss_mb_reloaded"] = out["steps"]["overwrite"]["rss_mb_after"]
    finally:
        rss.stop.set()
        proc.terminate()
        proc.wait(60)
    fresh, fport = _serve(idx, work, env, reload_s=0)  # the final index, served from the start
    rss = RssSampler(fresh.pid)
    try:
        with Load(fport, clients, texts[8000:16000]):
            out["rss_mb_fresh_server"] = round(rss.now(settle * 2), 1)
    finally:
        rss.stop.set()
        fresh.terminate()
        fresh.wait(60)
    out["rss_ratio_reloaded_vs_fresh"] = round(out["rss_mb_reloaded"] / out["rss_mb_fresh_server"], 3)
    return out


if __name__ == "__main__":
    app()
