"""``python -m benchmarks.redo_share``: how much of a killed `zsl extract` run is done twice.

For each repeat: extract a folder of real animal-mnist images (``--shards`` x ``--shard-size``)
with the real ``zsl extract`` (local Ray cluster, EfficientNet-Lite0) in its own process group,
SIGKILL the group at a seeded random point mid-run (once a random number of shards is finished,
plus a random fraction of a shard's time), rerun to completion, and measure:

* ``shards_done_at_kill`` / ``images_done_at_kill``: features files on disk when the kill landed;
* ``shards_redone`` / ``images_redone``: what the rerun extracted, read from the output directory
  itself (:func:`rerun_counts`): the ``features/shard-*.parquet`` files are snapshotted (inode,
  mtime, size) before and after the rerun; a file that appeared is a shard the rerun did, a file
  whose inode or mtime changed is a finished shard it wrote again; ``run.json`` (the extract
  record's shard plan) gives the shards in the input and ``manifest.json`` the totals, checked
  against the rows on disk. No log is parsed;
* ``in_flight_shards``: unfinished shards of which the encoder actors had already encoded images
  when the kill landed, and ``images_lost_in_flight``: those images, i.e. images decoded and encoded
  before the kill and computed again after it: the work the kill destroyed. The killed run traces
  every encoded batch (``ZSL_TRACE_ENCODED``, a file written by the actors themselves); images only
  decoded, not yet encoded, are not counted (decoding is a small part of the cost);
* ``redone_share`` = images_lost_in_flight / total images (expected: at most about one shard's
  worth, 1 / shards), and ``in_flight_share`` = all images of the in-flight shards / total;
* ``finished_shards_recomputed``: finished shards the rerun wrote again (must be 0).

The output of every rerun is also checked against exactly-once: every image once, no gaps.
Writes JSON (atomically; default ``benchmarks/results/redo_share.json``) with the per-repeat
numbers and the medians. Each run's log is kept in the scratch folder for reading, never parsed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# -- the output directory's state ----------------------------------------------------------------

@dataclass(frozen=True)
class FileStamp:
    """What identifies one written file: atomic writes rename a new file (new inode) into place."""

    inode: int
    mtime_ns: int
    size: int


def snapshot(out: str | os.PathLike) -> dict[str, FileStamp]:
    """``{shard file name: stamp}`` of the finished shards (``features/shard-*.parquet``) of an extract output."""
    d = Path(out) / "features"
    if not d.is_dir():
        return {}
    stamps = {}
    for p in d.glob("shard-*.parquet"):
        try:
            st = p.stat()
        except FileNotFoundError:  # replaced between listing and stat: the caller polls again
            continue
        stamps[p.name] = FileStamp(st.st_ino, st.st_mtime_ns, st.st_size)
    return stamps


def _shard_rows(out: str, name: str) -> int:
    """Items of one finished shard: feature rows plus error rows."""
    from pipeline.core import parquet as zpq

    errors = os.path.join(out, "errors", name)
    return zpq.parquet_num_rows(os.path.join(out, "features", name)) + (
        zpq.parquet_num_rows(errors) if os.path.exists(errors) else 0)


def rerun_counts(out: str | os.PathLike, before: dict[str, FileStamp], after: dict[str, FileStamp]) -> dict:
    """What a rerun of ``zsl extract`` did to ``out``, from two :func:`snapshot` s and the directory's records.

    ``before`` is taken when the rerun starts (after the kill), ``after`` when it has finished. Reads
    ``plan.parquet`` (the shard plan the extract recorded) and ``manifest.json`` (written last, so its
    presence means the rerun completed) and checks both against the files on disk. Raises
    ``RuntimeError`` if the output is unfinished or its records disagree with its files.
    """
    from pipeline.core import fs as zio
    from pipeline.core import parquet as zpq
    from pipeline.core.features import open_features, shard_id_of, shard_name
    from pipeline.core.manifests import RunRecord

    out = str(out)
    record = RunRecord.model_validate(zio.read_json(os.path.join(out, "run.json")))
    if record.job != "extract":
        raise RuntimeError(f"{out}: run.json is a `zsl {record.job}` record, not an extract one")
    from pipeline.inputs.plan import read_plan

    recorded = read_plan(out)  # plan.parquet; outputs of earlier versions kept the ids in run.json
    plan = {str(s.shard_id): s for s, _, _ in recorded} if recorded else record.state.get("shards")
    if not isinstance(plan, dict) or not plan:
        raise RuntimeError(f"{out}: no shard plan recorded (no plan.parquet; run.json state: {sorted(record.state)})")
    manifest = open_features(out)  # FileNotFoundError: the rerun did not finish
    expected = {shard_name(int(i)) for i in plan}
    if manifest.n_shards != len(expected):  # a --limit run plans every shard but extracts the first ones
        expected = {shard_name(i) for i in sorted(int(i) for i in plan)[: manifest.n_shards]}
    stray = sorted(n for n in set(before) | set(after) if shard_id_of(n) is None or n not in expected)
    if stray:
        raise RuntimeError(f"{out}: shard files outside the recorded plan: {', '.join(stray[:5])}")
    missing = sorted(expected - set(after))
    if missing:
        raise RuntimeError(f"{out}: finished, but shards {', '.join(missing[:5])} are missing")

    found_done = sorted(before)
    redone = sorted(n for n in after if n not in before)
    recomputed = sorted(n for n in before if after.get(n) != before[n])
    rows = {n: _shard_rows(out, n) for n in after}
    n_features = sum(zpq.parquet_num_rows(os.path.join(out, "features", n)) for n in after)
    if manifest.n_images != n_features:
        raise RuntimeError(f"{out}: manifest.json says {manifest.n_images} images, the feature shards hold "
                           f"{n_features}")
    return {
        "shards_in_input": len(plan),
        "shards_in_output": len(after),
        "found_done": len(found_done),
        "to_do": len(expected) - len(found_done),
        "redone": redone,
        "recomputed": recomputed,
        "images_found_done": sum(rows[n] for n in found_done if n in rows),
        "images_redone": sum(rows[n] for n in redone),
        "rows": rows,
        "n_images": manifest.n_images,
        "n_errors": manifest.n_errors,
    }


# -- harness -------------------------------------------------------------------------------------

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.redo_share", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=40, help="Shards in the input (default 40).")
    ap.add_argument("--shard-size", type=int, default=25, help="Images per shard (default 25).")
    ap.add_argument("--batch-size", type=int, default=10,
                    help="Encoder batch size (default 10: batches straddle shards, as 64 vs 256 do in real runs).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "zsl-redo-share"),
                    help="Scratch folder (input images, outputs, logs).")
    ap.add_argument("--json", default=str(RESULTS / "redo_share.json"), help="Result file (written atomically).")
    args = ap.parse_args(argv)
    if args.shards < 5 or args.shard_size < 1 or args.repeats < 1:
        ap.error("need --shards >= 5, --shard-size >= 1, --repeats >= 1")
    return args


def write_input(root: Path, n_images: int) -> None:
    """``n_images`` real animal-mnist PNGs as ``root/<class>/NNNNN.png`` (idempotent, each written atomically)."""
    import io

    from PIL import Image

    from pipeline.core import fs as zio
    from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES, load_animal_mnist

    x, y = load_animal_mnist()
    if n_images > len(x):
        raise ValueError(f"animal-mnist has {len(x)} images, {n_images} requested")
    for i in range(n_images):
        path = root / ANIMAL_MNIST_CLASSES[int(y[i])] / f"{i:05d}.png"
        if not path.exists():
            buf = io.BytesIO()
            Image.fromarray(x[i]).save(buf, format="PNG")
            zio.write_bytes_atomic(str(path), buf.getvalue())


def _env(tmp: Path, trace: Path | None) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "ZSL_RAY_TMPDIR": str(tmp)}
    env.pop("ZSL_TRACE_ENCODED", None)
    if trace is not None:
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


def _encoded(trace: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    if trace.exists():
        for line in trace.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:  # a line cut by the kill is dropped
                out[int(parts[0])] = out.get(int(parts[0]), 0) + int(parts[1])
    return out


def _count_rows(d: Path) -> int:
    from pipeline.core import parquet as zpq

    return sum(zpq.parquet_num_rows(str(p)) for p in d.glob("shard-*.parquet")) if d.is_dir() else 0


def one_repeat(r: int, args: argparse.Namespace, inp: Path, work: Path, ray_tmp: Path) -> dict:
    """One kill + rerun; ``ray_tmp`` holds the two runs' Ray session dirs."""
    from pipeline.core import parquet as zpq
    from pipeline.core.features import shard_name

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
    with open(log1, "w") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                             env=_env(ray_tmp / "a", trace))
    stamps: list[float] = []  # when each features file appeared
    seen = 0
    while len(stamps) < target:
        if p.poll() is not None:
            raise RuntimeError(f"extract exited ({p.returncode}) before {target} shards: see {log1}")
        n = len(snapshot(out))
        stamps += [time.monotonic()] * (n - seen)
        seen = n
        time.sleep(0.02)
    per_shard = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else 1.0
    time.sleep(frac * per_shard)  # land anywhere inside the next shard's time
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    t_kill = time.monotonic() - t0
    _reap(p.pid)
    before = snapshot(out)  # the driver (the only writer) is dead: this is the state the kill left
    encoded = _encoded(trace)
    if not encoded:
        raise RuntimeError(f"no encoder trace in {trace}: did ZSL_TRACE_ENCODED reach the Ray workers?")
    flight = {s: n for s, n in encoded.items() if shard_name(s) not in before}

    log2 = work / f"rerun-{r}.log"
    t1 = time.monotonic()
    with open(log2, "w") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                             env=_env(ray_tmp / "b", None))
    p.wait()
    t_rerun = time.monotonic() - t1
    _reap(p.pid)
    if p.returncode != 0:
        raise RuntimeError(f"rerun failed ({p.returncode}): see {log2}")
    counts = rerun_counts(out, before, snapshot(out))

    rows = counts["rows"]
    ids = zpq.read_parquet_dir(str(out / "features"), columns=["image_id"]).column("image_id").to_pylist()
    total = args.shards * args.shard_size
    n_errors = _count_rows(out / "errors")
    if (len(ids) != len(set(ids)) or len(ids) + n_errors != total or counts["shards_in_output"] != args.shards
            or counts["n_errors"] != n_errors):
        raise RuntimeError(f"repeat {r}: output is not exactly-once ({len(ids)} ids, {len(set(ids))} distinct, "
                           f"{n_errors} errors, {counts['shards_in_output']} shards; expected {total} items in "
                           f"{args.shards} shards)")
    flight = {s: min(n, rows[shard_name(s)]) for s, n in flight.items()}
    lost = sum(flight.values())
    in_flight_images = sum(rows[shard_name(s)] for s in flight)
    return {
        "repeat": r, "kill_after_shards": target, "kill_fraction_of_next_shard": round(frac, 3),
        "seconds_to_kill": round(t_kill, 1), "seconds_rerun": round(t_rerun, 1),
        "total_shards": args.shards, "total_images": total,
        "shards_done_at_kill": counts["found_done"],
        "images_done_at_kill": counts["images_found_done"],
        "rerun_found_done": counts["found_done"], "rerun_to_do": counts["to_do"],
        "rerun_shards_in_input": counts["shards_in_input"],
        "shards_redone": len(counts["redone"]), "images_redone": counts["images_redone"],
        "finished_shards_recomputed": len(counts["recomputed"]),
        "in_flight_shards": sorted(flight), "images_lost_in_flight": lost,
        "redone_share": lost / total, "in_flight_share": in_flight_images / total,
        "redone_share_in_shards": lost / args.shard_size / args.shards,
    }


def main(argv: list[str] | None = None) -> int:
    from pipeline.core import fs as zio

    args = _parse_args(argv)
    work = Path(args.work)
    inp = work / f"in-{args.shards * args.shard_size}"  # exactly this many images, whatever ran before
    write_input(inp, args.shards * args.shard_size)
    repeats = []
    # Ray's session dirs hold AF_UNIX sockets (paths <= 107 bytes): a short temp dir, not under --work.
    ray_root = Path(tempfile.mkdtemp(prefix="zsl-rs-"))
    try:
        for r in range(args.repeats):
            res = one_repeat(r, args, inp, work, ray_root / str(r))
            repeats.append(res)
            print(f"repeat {r}: killed after {res['shards_done_at_kill']}/{res['total_shards']} shards; rerun did "
                  f"{res['shards_redone']} shards ({res['rerun_found_done']} found done); in flight "
                  f"{len(res['in_flight_shards'])} shard(s), {res['images_lost_in_flight']} images computed twice "
                  f"= {100 * res['redone_share']:.2f}% of {res['total_images']}", flush=True)
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
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
