"""``python -m jobs.redo_share``: how much of a killed `zsl extract` run is done twice.

For each repeat: extract a folder of real animal-mnist images (``--shards`` x ``--shard-size``)
with the real ``zsl extract`` (local Ray cluster, EfficientNet-Lite0) in its own process group,
SIGKILL the group at a seeded random point mid-run (once a random number of shards is finished,
plus a random fraction of a shard's time), rerun to completion, and measure:

* ``shards_done_at_kill`` / ``images_done_at_kill``: features files on disk when the kill landed;
* ``shards_redone`` / ``images_redone``: what the rerun extracted (its log says how many shards it
  found done; the rows come from the finished output);
* ``in_flight_shards``: unfinished shards of which the encoder actors had already encoded images
  when the kill landed, and ``images_lost_in_flight``: those images, i.e. images decoded and encoded
  before the kill and computed again after it: the work the kill destroyed. The killed run traces
  every encoded batch (``ZSL_TRACE_ENCODED``, written by the actors themselves); images only decoded,
  not yet encoded, are not counted (decoding is a small part of the cost);
* ``redone_share`` = images_lost_in_flight / total images (expected: at most about one shard's
  worth, 1 / shards), and ``in_flight_share`` = all images of the in-flight shards / total;
* ``received_not_written``: rows the killed driver held (received, shard not yet complete);
* ``finished_shards_recomputed``: finished shards the rerun wrote again (must be 0).

The output of every rerun is also checked against exactly-once: every image once, no gaps.
Writes JSON (atomically) with the per-repeat numbers and the medians.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_RECEIVED = re.compile(r"pipeline\.extract: shard (\d+): (\d+) of (\d+) rows received")
_WRITTEN = re.compile(r"pipeline\.extract: shard (\d+) written")
_TODO = re.compile(r"(\d+) shards in input, (\d+) already done, (\d+) to do")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.redo_share", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=40, help="Shards in the input (default 40).")
    ap.add_argument("--shard-size", type=int, default=25, help="Images per shard (default 25).")
    ap.add_argument("--batch-size", type=int, default=10,
                    help="Encoder batch size (default 10: batches straddle shards, as 64 vs 256 do in real runs).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/zsl-redo-share", help="Scratch folder (input images, outputs, logs).")
    ap.add_argument("--json", default=str(ROOT / "tests" / "bench" / "redo_share.json"), help="Result file.")
    args = ap.parse_args(argv)
    if args.shards < 5 or args.shard_size < 1 or args.repeats < 1:
        ap.error("need --shards >= 5, --shard-size >= 1, --repeats >= 1")
    return args


def write_input(root: Path, n_images: int) -> None:
    """``n_images`` real animal-mnist PNGs as ``root/<class>/NNNNN.png`` (idempotent)."""
    from PIL import Image

    from pipeline.demo_data import ANIMAL_MNIST_CLASSES, load_animal_mnist

    x, y = load_animal_mnist()
    if n_images > len(x):
        raise ValueError(f"animal-mnist has {len(x)} images, {n_images} requested")
    for i in range(n_images):
        d = root / ANIMAL_MNIST_CLASSES[int(y[i])]
        d.mkdir(parents=True, exist_ok=True)
        if not (d / f"{i:05d}.png").exists():
            Image.fromarray(x[i]).save(d / f"{i:05d}.png")


def _env(tmp: Path, trace: Path | None) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "ZSL_RAY_TMPDIR": str(tmp)}
    env.pop("ZSL_TRACE_ENCODED", None)
    if trace is not None:
        env["ZSL_LOG_LEVEL"] = "DEBUG"
        env["ZSL_TRACE_ENCODED"] = str(trace)
    return env


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d))
    return pids


def _reap(sid: int, timeout: float = 30.0) -> None:
    """Wait for the killed job's Ray processes (same session) to exit; SIGKILL stragglers by pid."""
    deadline = time.monotonic() + timeout
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _features(out: Path) -> dict[str, int]:
    d = out / "features"
    return {p.name: p.stat().st_mtime_ns for p in d.glob("shard-*.parquet")} if d.exists() else {}


def _encoded(trace: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    if trace.exists():
        for line in trace.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:  # a line cut by the kill is dropped
                out[int(parts[0])] = out.get(int(parts[0]), 0) + int(parts[1])
    return out


def _received(log: str) -> dict[int, int]:
    """Rows the killed driver had received, per shard (from its DEBUG log)."""
    received: dict[int, int] = {}
    for m in _RECEIVED.finditer(log):
        received[int(m.group(1))] = int(m.group(2))
    for m in _WRITTEN.finditer(log):
        received.pop(int(m.group(1)), None)
    return received


def one_repeat(r: int, args: argparse.Namespace, inp: Path, work: Path) -> dict:
    from pipeline import io as zio

    rng = np.random.default_rng(args.seed + r)
    out = work / f"out-{r}"
    shutil.rmtree(out, ignore_errors=True)
    target = int(rng.integers(max(1, args.shards // 5), max(2, 4 * args.shards // 5) + 1))
    frac = float(rng.uniform(0.0, 1.0))
    argv = [sys.executable, "-m", "jobs.cli", "extract", "--input", str(inp), "--output", str(out),
            "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size)]

    log1, trace = work / f"killed-{r}.log", work / f"encoded-{r}.txt"
    trace.unlink(missing_ok=True)
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=open(log1, "w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                         env=_env(work / f"ray-{r}-a", trace))
    stamps: list[float] = []  # when each features file appeared
    seen = 0
    while len(stamps) < target:
        if p.poll() is not None:
            raise RuntimeError(f"extract exited ({p.returncode}) before {target} shards: see {log1}")
        n = len(_features(out))
        stamps += [time.monotonic()] * (n - seen)
        seen = n
        time.sleep(0.02)
    per_shard = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else 1.0
    time.sleep(frac * per_shard)  # land anywhere inside the next shard's time
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    t_kill = time.monotonic() - t0
    done_at_kill = _features(out)
    _reap(p.pid)
    unfinished = lambda d: {s: n for s, n in d.items() if f"shard-{s:06d}.parquet" not in done_at_kill}  # noqa: E731
    held = unfinished(_received(log1.read_text()))
    encoded = _encoded(trace)
    if not encoded:
        raise RuntimeError(f"no encoder trace in {trace}: did ZSL_TRACE_ENCODED reach the Ray workers?")
    flight = unfinished(encoded)

    log2 = work / f"rerun-{r}.log"
    t1 = time.monotonic()
    p = subprocess.Popen(argv, stdout=open(log2, "w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                         env=_env(work / f"ray-{r}-b", None))
    p.wait()
    t_rerun = time.monotonic() - t1
    _reap(p.pid)
    text = log2.read_text()
    if p.returncode != 0:
        raise RuntimeError(f"rerun failed ({p.returncode}): see {log2}")
    m = _TODO.search(text)
    n_in, n_done, n_todo = (int(g) for g in m.groups())

    after = _features(out)
    recomputed = [n for n, t in done_at_kill.items() if after.get(n) != t]
    rows = {n: zio.parquet_num_rows(str(out / "features" / n)) + zio.parquet_num_rows(str(out / "errors" / n))
            for n in after}
    ids = zio.read_parquet_dir(str(out / "features"), columns=["image_id"]).column("image_id").to_pylist()
    total = args.shards * args.shard_size
    if len(ids) != len(set(ids)) or len(ids) + _errors(out) != total or len(after) != args.shards:
        raise RuntimeError(f"repeat {r}: output is not exactly-once ({len(ids)} ids, {len(set(ids))} distinct)")
    redone = [n for n in after if n not in done_at_kill]
    flight = {s: min(n, rows[f"shard-{s:06d}.parquet"]) for s, n in flight.items()}
    lost = sum(flight.values())
    in_flight_images = sum(rows[f"shard-{s:06d}.parquet"] for s in flight)
    for d in ("a", "b"):
        shutil.rmtree(work / f"ray-{r}-{d}", ignore_errors=True)
    return {
        "repeat": r, "kill_after_shards": target, "kill_fraction_of_next_shard": round(frac, 3),
        "seconds_to_kill": round(t_kill, 1), "seconds_rerun": round(t_rerun, 1),
        "total_shards": args.shards, "total_images": total,
        "shards_done_at_kill": len(done_at_kill),
        "images_done_at_kill": sum(rows[n] for n in done_at_kill),
        "rerun_found_done": n_done, "rerun_to_do": n_todo, "rerun_shards_in_input": n_in,
        "shards_redone": len(redone), "images_redone": sum(rows[n] for n in redone),
        "finished_shards_recomputed": len(recomputed),
        "in_flight_shards": sorted(flight), "images_lost_in_flight": lost,
        "received_not_written": sum(held.values()),
        "redone_share": lost / total, "in_flight_share": in_flight_images / total,
        "redone_share_in_shards": lost / args.shard_size / args.shards,
    }


def _errors(out: Path) -> int:
    from pipeline import io as zio

    return sum(zio.parquet_num_rows(str(p)) for p in (out / "errors").glob("shard-*.parquet"))


def main(argv: list[str] | None = None) -> int:
    from pipeline import io as zio

    args = _parse_args(argv)
    work = Path(args.work)
    inp = work / "in"
    write_input(inp, args.shards * args.shard_size)
    repeats = []
    for r in range(args.repeats):
        res = one_repeat(r, args, inp, work)
        repeats.append(res)
        print(f"repeat {r}: killed after {res['shards_done_at_kill']}/{res['total_shards']} shards; rerun did "
              f"{res['shards_redone']} shards ({res['rerun_found_done']} found done); in flight "
              f"{len(res['in_flight_shards'])} shard(s), {res['images_lost_in_flight']} images computed twice "
              f"= {100 * res['redone_share']:.2f}% of {res['total_images']}", flush=True)
    med = float(statistics.median(r["redone_share"] for r in repeats))
    result = {
        "what": "share of a killed zsl extract run computed twice (images decoded+encoded before the kill, "
                "redone after it) / total images; a rerun recomputes only unfinished shards",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count()},
        "params": {k: getattr(args, k) for k in ("shards", "shard_size", "batch_size", "repeats", "seed")},
        "one_shard_share": 1 / args.shards,
        "median_redone_share": med,
        "median_in_flight_share": float(statistics.median(r["in_flight_share"] for r in repeats)),
        "max_in_flight_shards": max(len(r["in_flight_shards"]) for r in repeats),
        "finished_shards_recomputed": sum(r["finished_shards_recomputed"] for r in repeats),
        "repeats": repeats,
    }
    zio.write_json_atomic(args.json, result)
    print(f"median redone share {100 * med:.2f}% (one shard = {100 / args.shards:.2f}%) -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
