"""``python -m benchmarks.bench_extract`` (``make bench-extract``): ``zsl extract`` on CPUs, PyTorch vs
ONNX Runtime side by side in one run, against bare ONNX Runtime loops on the same images.

For each data set (``--data``, repeatable):

* ``animal-mnist`` — real animal-mnist silhouettes (28 px PNGs, upscaled to 224: cheap to decode; the
  images of the earlier extraction figures);
* ``openclipart`` — real Open Clip Art drawings (Debian's ``openclipart-png``), written once as JPEGs
  (quality 90, on white; median about 400 px, up to ~1,000): decoding costs as much as for photos.

the four sides of :mod:`benchmarks.extract_sides` (``torch``: today's ``zsl extract``; ``onnx``: the
defaults; ``bare``: read + decode + encode in one ONNX Runtime loop; ``encode``: the ONNX Runtime
encoder alone over the images decoded beforehand) run ``--repeats`` times each, in alternating order
(ABCD, DCBA, ...) with Ray started once; medians are reported. Also timed: decoding alone, today's
``decode_image`` against draft decoding (one process, alternating), and the one-off costs (Ray
start, the ONNX export and check into an empty cache, a cached load). The embeddings of the two
pipelines are compared per image: within the check's bound where both decoded alike (PNGs, JPEGs under
twice the input size), as cosines where the ``onnx`` side decoded in draft mode.

Goals (2 cores): ``onnx`` steady state >= 3x ``torch``'s, and >= 0.9x the ``encode`` loop's.
Writes ``benchmarks/results/extract.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import typer

from benchmarks.cli import run_app

from benchmarks.bench import RESULTS, machine, median, ratio
from pipeline.core.timing import timed

LOG = logging.getLogger("zsl.bench_extract")
GOALS = {"onnx_vs_torch_steady_min": 3.0, "onnx_vs_encode_loop_steady_min": 0.9}
DATASETS = ("animal-mnist", "openclipart")
OPENCLIPART_PNG = "/usr/share/openclipart/png"
#: Open Clip Art PNGs above this many pixels are left out (posters; a camera photo has 12-50 million)
MAX_PIXELS = 50_000_000

NOTES = ("Steady state: images after the first shard (pipelines) or batch (loops) over the time from its end to "
         "the last one's; fixed = total - images / steady (actor start, model load and the ONNX check, ramp-up, "
         "tail). Stage ms/image of the pipelines are worker seconds summed over workers (read and decode in "
         "decode tasks, encode in the actor, write in the driver) over images; they overlap in time. The ONNX "
         "sides use the pipeline plan's intra-op threads; the loops run in the driver process with Ray idle.")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.splitlines()[0])


def write_data(name: str, out: Path, n: int) -> tuple[str, list[str]]:
    """``n`` real images of data set ``name`` as an image folder under ``out``; (folder, files in shard order)."""
    if name == "animal-mnist":
        from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES, write_demo_data

        write_demo_data(str(out), per_class=-(-n // len(ANIMAL_MNIST_CLASSES)))
        src = str(out / "train")
    elif name == "openclipart":
        src = str(out / "jpeg")
        _openclipart_jpegs(Path(src), n)
    else:
        raise typer.BadParameter(f"--data {name!r}: one of {', '.join(DATASETS)}")
    from pipeline.inputs.registry import list_shards

    files = [f for s in list_shards(src, input_format="folder", shard_size=1 << 30) for f in s.members]
    return src, files


def _openclipart_jpegs(out: Path, n: int) -> None:
    """The first ``n`` Open Clip Art PNGs (sorted paths, at most :data:`MAX_PIXELS`) as JPEGs, one folder per
    category."""
    from PIL import Image

    if not os.path.isdir(OPENCLIPART_PNG):
        raise FileNotFoundError(f"{OPENCLIPART_PNG}: apt-get install openclipart-png")
    pngs = sorted(os.path.join(d, f) for d, _, fs in os.walk(OPENCLIPART_PNG) for f in fs if f.endswith(".png"))
    done = 0
    for i, p in enumerate(pngs):
        if done == n:
            return
        cat = os.path.relpath(p, OPENCLIPART_PNG).split(os.sep)[0]
        dst = out / cat / f"{i:05d}.jpg"
        if not dst.exists():
            try:
                im = Image.open(p)
            except Image.DecompressionBombError:  # a few posters of 100+ megapixels: not photos
                continue
            with im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    continue
                rgba = im.convert("RGBA")
                flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
                dst.parent.mkdir(parents=True, exist_ok=True)
                flat.save(dst, quality=90)
        done += 1
    raise ValueError(f"{OPENCLIPART_PNG} holds {done} PNGs of at most {MAX_PIXELS:,} pixels, {n} requested")


def decode_only(files: list[str], *, repeats: int, size: int = 224) -> dict:
    """ms per image of today's decoding and of draft decoding (each file read once beforehand), alternating."""
    from pipeline.core import fs as zio
    from pipeline.inputs.images import decode_image

    blobs = [zio.read_bytes(f) for f in files]
    ms: dict[str, list[float]] = {"today": [], "draft": []}
    for r in range(repeats):
        for mode in (("today", "draft") if r % 2 == 0 else ("draft", "today")):
            with timed() as t:
                for b in blobs:
                    decode_image(b, size=size, draft=mode == "draft")
            ms[mode].append(1000 * t.seconds / len(blobs))
    return {"ms_per_image": ms, "median_ms_per_image": {k: median(v) for k, v in ms.items()},
            "speedup": ratio(median(ms["today"]), median(ms["draft"]))}


def one_off_costs() -> dict:
    """Seconds of the ONNX export + check into an empty cache, and of a load from the cache."""
    from pipeline.encoders.image import load_image_encoder

    old = os.environ.get("ZSL_CACHE_DIR")
    tmp = tempfile.mkdtemp(prefix="zsl-bench-cache-")
    os.environ["ZSL_CACHE_DIR"] = tmp
    try:
        with timed() as first:
            load_image_encoder("effnet-lite0", device="cpu", backend="onnx")
        with timed() as cached:
            load_image_encoder("effnet-lite0", device="cpu", backend="onnx")
        with timed() as torch_load:
            load_image_encoder("effnet-lite0", device="cpu", backend="torch")
    finally:
        os.environ.pop("ZSL_CACHE_DIR") if old is None else os.environ.__setitem__("ZSL_CACHE_DIR", old)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"onnx_export_and_check_s": first.seconds, "onnx_cached_load_and_check_s": cached.seconds,
            "torch_load_s": torch_load.seconds}


def _features(out: str):
    """uri -> row, the embeddings and the original sizes of a feature directory."""
    import numpy as np

    from pipeline.core import fs as zio
    from pipeline.core import parquet as zpq
    from pipeline.core.features import open_features, table_embeddings

    t = zpq.read_parquet_dir(zio.join(out, "features"))
    X = table_embeddings(t, open_features(out).dim, out)
    sizes = np.stack([t.column("width").to_numpy(), t.column("height").to_numpy()], 1)
    return {u: i for i, u in enumerate(t.column("uri").to_pylist())}, X, sizes


def compare_embeddings(sides) -> dict:
    """The two pipelines' features per image: within the bound where decoded alike, cosines where not."""
    import numpy as np

    from pipeline.encoders.image_onnx import TOLERANCE

    (tp, A, sizes), (op, B, _) = _features(sides.outputs["torch"]), _features(sides.outputs["onnx"])
    files = sides.files
    A, B, sizes = A[[tp[u] for u in files]], B[[op[u] for u in files]], sizes[[tp[u] for u in files]]
    is_jpeg = np.array([u.lower().endswith((".jpg", ".jpeg")) for u in files])
    drafted = is_jpeg & (sizes.min(1) >= 2 * sides.encoder.image_size)
    alike = ~drafted
    rel = float(np.abs(A[alike] - B[alike]).max() / max(1.0, np.abs(A[alike]).max())) if alike.any() else None
    cos = (A * B).sum(1) / np.maximum(np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1), 1e-12)
    bare = float(np.abs(B - sides.bare_X).max()) if sides.bare_X is not None else None
    return {"tolerance": TOLERANCE, "rows_decoded_alike": int(alike.sum()), "rows_drafted": int(drafted.sum()),
            "max_rel_diff_decoded_alike": rel, "within_tolerance": rel is not None and rel <= TOLERANCE,
            "cosine_drafted_min": float(cos[drafted].min()) if drafted.any() else None,
            "cosine_drafted_median": float(np.median(cos[drafted])) if drafted.any() else None,
            "max_abs_diff_onnx_pipeline_vs_bare_loop": bare}


def summarize(sides, n: int) -> dict:
    out = {}
    for side, runs in sides.runs.items():
        rates = [r["steady_images_per_s"] for r in runs if r["steady_images_per_s"]]
        fixed = [r["fixed_s"] for r in runs if r["fixed_s"] is not None]
        stages = {k: median([r["stage_ms_per_image"][k] for r in runs]) for k in runs[0]["stage_ms_per_image"]}
        out[side] = {"runs": runs, "median_steady_images_per_s": median(rates) if rates else None,
                     "median_images_per_s": median([n / r["seconds"] for r in runs]),
                     "median_fixed_s": median(fixed) if fixed else None, "median_stage_ms_per_image": stages}
    return out


def bench_dataset(name: str, work: Path, *, n_images: int, shard_size: int, batch_size: int | None, repeats: int,
                  plan) -> dict:
    from benchmarks.extract_sides import PIPELINES, SIDES, Sides

    src, files = write_data(name, work / name, n_images)
    files = files[:n_images]
    LOG.info("%s: %d images, shard size %d, batch %s, %d repeats", name, len(files), shard_size,
             batch_size or "as planned", repeats)
    decode = decode_only(files[:1000], repeats=max(3, repeats))
    sides = Sides(work / f"{name}-runs", src, files, plan=plan, shard_size=shard_size, batch_size=batch_size,
                  repeats=repeats)
    batch_size = sides.batch_size
    for r in range(repeats):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            LOG.info("%s repeat %d: %s", name, r, side)
            sides.run(side, r)
    s = summarize(sides, len(files))
    rate = {k: v["median_steady_images_per_s"] for k, v in s.items()}
    result = {"n_images": len(files), "shard_size": shard_size, "batch_size_onnx_and_loops": batch_size,
              "batch_size_torch": sides.forced_batch or PIPELINES["torch"]["batch_size"], "repeats": repeats,
              "sides": s, "decode_only": decode, "embeddings": compare_embeddings(sides),
              "ratios_steady": {"onnx_vs_torch": ratio(rate["onnx"], rate["torch"]),
                                "onnx_vs_encode_loop": ratio(rate["onnx"], rate["encode"]),
                                "onnx_vs_bare_loop": ratio(rate["onnx"], rate["bare"]),
                                "bare_loop_vs_encode_loop": ratio(rate["bare"], rate["encode"])}}
    result["goals_met"] = {"onnx_vs_torch": result["ratios_steady"]["onnx_vs_torch"] >= GOALS["onnx_vs_torch_steady_min"],
                           "onnx_vs_encode_loop": result["ratios_steady"]["onnx_vs_encode_loop"]
                           >= GOALS["onnx_vs_encode_loop_steady_min"]}
    shutil.rmtree(work / f"{name}-runs", ignore_errors=True)
    return result


def table(result: dict) -> str:
    """One block per data set: steady images/s, per-stage ms per image and fixed seconds of each side."""
    lines = []
    for name, d in result["datasets"].items():
        lines.append(f"{name}: {d['n_images']} images, medians of {d['repeats']}")
        lines.append(f"  {'side':8} {'steady img/s':>12} {'whole img/s':>12} {'fixed s':>8}  stage ms/image")
        for side, s in d["sides"].items():
            st = ", ".join(f"{k} {v:.2f}" for k, v in s["median_stage_ms_per_image"].items())
            fx = s["median_fixed_s"]
            lines.append(f"  {side:8} {s['median_steady_images_per_s'] or float('nan'):12.1f} "
                         f"{s['median_images_per_s']:12.1f} {fx if fx is not None else float('nan'):8.1f}  {st}")
        r, e, dec = d["ratios_steady"], d["embeddings"], d["decode_only"]["median_ms_per_image"]
        lines.append(f"  onnx/torch {r['onnx_vs_torch']:.2f} (goal >= 3), onnx/encode loop {r['onnx_vs_encode_loop']:.2f}"
                     f" (goal >= 0.9), onnx/bare loop {r['onnx_vs_bare_loop']:.2f}; decode today {dec['today']:.2f} "
                     f"vs draft {dec['draft']:.2f} ms/image; max rel diff {e['max_rel_diff_decoded_alike']} "
                     f"({e['rows_decoded_alike']} rows decoded alike), drafted rows' min cosine {e['cosine_drafted_min']}")
    return "\n".join(lines)


@app.command()
def bench(
    data: list[str] = typer.Option(list(DATASETS), "--data", help="Data sets (repeatable): animal-mnist, openclipart."),
    images: int = typer.Option(5000, min=10, help="Images per data set."),
    repeats: int = typer.Option(3, min=1, help="Timed repeats of each side (medians are reported)."),
    shard_size: int = typer.Option(100, min=1, help="Images per extraction shard."),
    batch_size: int | None = typer.Option(None, min=1, help=(
        "Images per encoder batch on every side (default: 64 on the torch side, as before; the plan's elsewhere).")),
    output: str = typer.Option(str(RESULTS / "extract.json"), help="JSON file to write (atomically)."),
    workdir: str | None = typer.Option(None, help="Scratch folder (default: a new temp dir, removed after)."),
    one_off: bool = typer.Option(True, "--one-off/--no-one-off", help="Also time the ONNX export into an empty cache."),
    merge: bool = typer.Option(False, help="Keep the other data sets of an existing --output (each records its date)."),
) -> None:
    """Time zsl extract on PyTorch and on ONNX Runtime, and the bare ONNX Runtime loops, side by side."""
    import ray

    from pipeline.cluster.extraction import plan_resources
    from pipeline.cluster.session import init_ray
    from pipeline.core import fs as zio

    work = Path(workdir or tempfile.mkdtemp(prefix="zsl-bench-extract-"))
    result: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                    "parameters": {"data": data, "images": images, "repeats": repeats, "shard_size": shard_size,
                                   "batch_size": batch_size}, "goals": GOALS, "datasets": {}, "notes": NOTES}
    previous = zio.read_json(output) if merge and os.path.exists(output) else {}
    result["datasets"] = previous.get("datasets", {})
    try:
        result["one_off_s"] = one_off_costs() if one_off else previous.get("one_off_s", {})
        with timed() as ray_init:
            init_ray()
        result["one_off_s"]["ray_init_s"] = ray_init.seconds
        res = ray.cluster_resources()
        plan = plan_resources(cpus=res.get("CPU", 1), gpus=res.get("GPU", 0), num_actors=None, device="cpu",
                              batch_size=batch_size)
        result["plan"] = {**plan.__dict__, "describe": plan.describe()}
        for name in data:
            result["datasets"][name] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                        "loadavg_at_start": list(os.getloadavg()),
                                        **bench_dataset(name, work, n_images=images, shard_size=shard_size,
                                                        batch_size=batch_size, repeats=repeats, plan=plan)}
            zio.write_json_atomic(output, result)  # what is done so far survives a later failure
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    zio.write_json_atomic(output, result)
    typer.echo(table(result))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark in-process; return the exit status (2 for usage errors)."""
    return run_app(app, argv, "zsl-bench-extract")


if __name__ == "__main__":
    sys.exit(main())
