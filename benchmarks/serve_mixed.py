"""``make bench-serve``'s mixed phase: ``clients`` concurrent keep-alive clients, each sending a random
mix of text ``/search``, image queries (``/search`` with an image, and clip-retrieval's
``/knn-service``), thumbnail GETs (``/images/{id}``, random ids: mostly cache misses) and
label-filtered ``/search``, with a ``/health`` prober beside them; latency percentiles, errors and 503s
per kind, and whether the goals of the "Serve for real" issue are met.

A 503 with ``Retry-After`` is the image pool saying it is full (bounded on purpose): it is counted
apart, as ``busy_503``, not as an error; the client then waits the Retry-After, as asked, before its
next request (``honour_retry_after=False``: it sends the next one at once). Anything else than the
expected 200 is an error. Latency percentiles are over the answered (200) requests. The load
generator shares the machine with the server (and with whatever else runs there: each run records
the cores the server, the load generator and everything else used); 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

#: How often each kind is drawn by a client.
KINDS = {"text": 0.35, "filtered": 0.15, "image": 0.10, "knn_image": 0.10, "thumbnail": 0.30}
#: The issue's goals: no errors, text p99 while image queries run, /health p99 (ms).
GOALS = {"errors": 0, "text_p99_ms": 100.0, "health_p99_ms": 50.0}
HEALTH_EVERY_S = 0.05
JSON = {"Content-Type": "application/json"}


def write_images(folder: Path, n: int, *, seed: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """``n`` photo-like JPEGs of ``size`` (smooth colour fields with grain, seeded) under ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.integers(-6, 7, (size[1], size[0], 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(np.asarray(field, np.int16) + grain, 0, 255).astype(np.uint8)).save(path, quality=85)
        out.append(path)
    return out


class Mix:
    """The requests of the mixed phase: ``draw(rng)`` -> ``(kind, method, path, body)``."""

    def __init__(self, *, texts: Callable[[], str], images: list[Path], labels: list[str], rows: int,
                 kinds: dict[str, float] | None = None) -> None:
        self.texts, self.labels, self.rows = texts, labels, rows
        b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
        self.image_bodies = [json.dumps({"image": b, "k": 10}).encode() for b in b64]
        self.knn_bodies = [json.dumps({"image": b, "num_images": 10}).encode() for b in b64]
        self.image_bytes = int(np.mean([p.stat().st_size for p in images]))
        self.weights = dict(kinds or KINDS)
        if set(self.weights) - set(KINDS):
            raise ValueError(f"unknown request kind(s) {sorted(set(self.weights) - set(KINDS))}; known: {list(KINDS)}")
        self.kinds, self.p = list(self.weights), np.array(list(self.weights.values())) / sum(self.weights.values())

    def draw(self, rng: np.random.Generator) -> tuple[str, str, str, bytes | None]:
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.p))]
        if kind == "text":
            return kind, "POST", "/search", json.dumps({"text": self.texts(), "k": 10}).encode()
        if kind == "filtered":
            label = self.labels[int(rng.integers(len(self.labels)))]
            return kind, "POST", "/search", json.dumps({"text": self.texts(), "k": 10, "labels": [label]}).encode()
        if kind == "image":
            return kind, "POST", "/search", self.image_bodies[int(rng.integers(len(self.image_bodies)))]
        if kind == "knn_image":
            return kind, "POST", "/knn-service", self.knn_bodies[int(rng.integers(len(self.knn_bodies)))]
        return kind, "GET", f"/images/{int(rng.integers(self.rows))}?size=256", None


def outcome(kind: str, status: int, headers, data: bytes) -> str:
    """``ok``, ``busy`` (a 503 with Retry-After to an image query) or the error's description."""
    if status == 503 and kind in ("image", "knn_image") and headers.get("retry-after"):
        return "busy"
    if status != 200:
        return f"HTTP {status}"
    if kind == "thumbnail":
        return "ok" if data[:2] == b"\xff\xd8" else "not a JPEG"
    body = json.loads(data)
    hits = body if kind == "knn_image" else body.get("hits", [])
    want = range(1, 11) if kind == "filtered" else range(10, 11)  # a rare label may have fewer than 10 rows
    return "ok" if len(hits) in want else f"{len(hits)} hits"


def _client(port: int, mix: Mix, rng, stop_at: float, budget: list[int], lock: threading.Lock, records: list,
            honour_retry_after: bool) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.perf_counter() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        kind, method, path, body = mix.draw(rng)
        t = time.perf_counter()
        retry_after = 0.0
        try:
            conn.request(method, path, body=body, headers=JSON if body else {})
            resp = conn.getresponse()
            result = outcome(kind, resp.status, resp.headers, resp.read())
            retry_after = float(resp.headers.get("retry-after") or 0) if result == "busy" else 0.0
        except (OSError, http.client.HTTPException, ValueError) as exc:
            result = type(exc).__name__
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        records.append((kind, result, time.perf_counter() - t))
        if honour_retry_after and retry_after:
            time.sleep(min(retry_after, max(0.0, stop_at - time.perf_counter())))
    conn.close()


def _prober(port: int, seconds: float, out) -> None:
    """``GET /health`` every ``HEALTH_EVERY_S`` on its own connection for ``seconds``; the records
    sent through the pipe ``out``. Runs in a process of its own: in the clients' process its
    timings would include waits for that process's GIL."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    records, stop_at = [], time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        t = time.perf_counter()
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            result = "ok" if resp.status == 200 and json.loads(resp.read())["status"] == "ok" else f"HTTP {resp.status}"
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            result = type(exc).__name__
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        dt = time.perf_counter() - t
        records.append(("health", result, dt))
        time.sleep(max(0.0, HEALTH_EVERY_S - dt))
    conn.close()
    out.send(records)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime (clock ticks; 100 on Linux)


def _busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all cores; /proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / 100


def mixed_phase(port: int, server_pid: int, mix: Mix, *, clients: int, seconds: float, max_requests: int,
                seed: int, honour_retry_after: bool = True) -> dict:
    """One run of ``clients`` client threads and the /health prober (a process of its own) for
    ``seconds`` (at most ``max_requests`` client requests): per-kind figures, the goals, and the
    cores the server, this process (the load generator) and everything else on the machine used."""
    import multiprocessing

    records: list = []
    budget, lock = [max_requests], threading.Lock()
    theirs, ours = multiprocessing.get_context("spawn").Pipe(duplex=False)
    prober = multiprocessing.get_context("spawn").Process(target=_prober, args=(port, seconds, ours), daemon=True)
    prober.start()
    cpu0, me0, all0, start = _cpu_s(server_pid), time.process_time(), _busy_s(), time.perf_counter()
    stop_at = start + seconds
    threads = [threading.Thread(target=_client, args=(port, mix, np.random.default_rng([seed, i]), stop_at, budget,
                                                      lock, records, honour_retry_after)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server, me, machine = _cpu_s(server_pid) - cpu0, time.process_time() - me0, _busy_s() - all0
    records += theirs.recv()
    prober.join(timeout=30)
    kinds = summarize(records)
    return {"seconds": round(wall, 2), "requests": sum(k["requests"] for n, k in kinds.items() if n != "health"),
            "server_cores_used": round(server / wall, 2), "loadgen_cores_used": round(me / wall, 2),
            "other_cores_used": round(max(0.0, machine - server - me) / wall, 2),
            "kinds": kinds, "goals": goals(kinds)}


def summarize(records: list[tuple[str, str, float]]) -> dict:
    """Per kind (and ``health``): requests, answered, 503s, errors (the first few reasons), p50/p95/p99/max ms."""
    out = {}
    for kind in [*KINDS, "health"]:
        rows = [(o, dt) for k, o, dt in records if k == kind]
        ms = np.array([dt for o, dt in rows if o == "ok"]) * 1000
        errors = Counter(o for o, _ in rows if o not in ("ok", "busy"))
        pct = {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if len(ms) else None for q in (50, 95, 99)}
        out[kind] = {"requests": len(rows), "ok": len(ms), "busy_503": sum(o == "busy" for o, _ in rows),
                     "errors": sum(errors.values()), "error_reasons": dict(errors.most_common(5)), **pct,
                     "max_ms": round(float(ms.max()), 1) if len(ms) else None}
    return out


def goals(kinds: dict) -> dict:
    """The issue's goals against one run's figures (text: plain text ``/search`` answered while image
    queries were answered too)."""
    errors = sum(k["errors"] for k in kinds.values())
    text, health = kinds["text"]["p99_ms"], kinds["health"]["p99_ms"]
    images = kinds["image"]["ok"] + kinds["knn_image"]["ok"]
    met = {"errors": errors == 0,
           "text_p99": images > 0 and text is not None and text <= GOALS["text_p99_ms"],
           "health_p99": health is not None and health <= GOALS["health_p99_ms"]}
    return {"errors": errors, "text_p99_ms": text, "health_p99_ms": health, "image_queries_answered": images,
            "met": met, "all_met": all(met.values())}


def medians(runs: list[dict]) -> dict:
    """The median over ``runs`` of each kind's figures (and of the goals' figures)."""
    med = lambda xs: None if any(x is None for x in xs) else round(float(np.median(xs)), 1)  # noqa: E731
    kinds = {kind: {key: med([r["kinds"][kind][key] for r in runs])
                    for key in ("requests", "ok", "busy_503", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms")}
             for kind in runs[0]["kinds"]}
    cores = {k: med([r[k] for r in runs]) for k in ("server_cores_used", "loadgen_cores_used", "other_cores_used")}
    return {"kinds": kinds, **cores, "goals": goals(kinds)}
