"""The extraction dataflow on Ray Data (one streaming pipeline):

    shard specs --map_batches(decode_chunks, CPU tasks)--> blocks of pixels (256 rows at most)
                --map_batches(EncodeActor, actor pool, GPU if any)--> embeddings
                --iter_batches--> driver, which groups rows by shard and writes each shard atomically.

The mappers (:func:`decode_chunks`, :class:`EncodeActor`) are plain Python, testable without Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from pipeline.inputs.base import Record, Shard, stem
from pipeline.inputs.images import DecodeError, decode_image
from pipeline.inputs.jpeg_batch import is_jpeg, jpeg_size
from pipeline.inputs.registry import read_shard

LOG = logging.getLogger(__name__)


#: decoded rows per block handed on by :func:`decode_chunks` (a task's pixels are about
#: ``DECODE_CHUNK_ROWS * image_size**2 * 3`` bytes, whatever the size of the shard)
DECODE_CHUNK_ROWS = 256

_COLUMNS = ("shard_id", "shard_n", "shard_row", "image_id", "uri", "label", "caption", "width", "height", "url",
            "key", "meta", "error", "stage")
#: text columns that may hold None. Ray Data turns None in an object column into NaN, so a block
#: carries "" for None: :func:`_block` writes the sentinel, :func:`from_ray_block` reads it back.
_OPTIONAL = ("label", "caption", "url", "key", "meta", "error", "stage")
#: per-row seconds the dataflow carries for the stage timings (read and decode: decode tasks;
#: encode: the encoder actor, its batch's time shared by the batch's rows); ``onnx`` says which
#: backend encoded the row. The writer sums them; they are not written.
TIMING_COLUMNS = ("read_s", "decode_s", "encode_s")


def decode_chunks(batch: dict, *, image_size: int, max_pixels: int, read: dict,
                  chunk_rows: int = DECODE_CHUNK_ROWS, draft: bool = False,
                  defer_jpeg: bool = False) -> Iterator[dict]:
    """Ray mapper (CPU task, a generator): shard specs -> blocks of at most ``chunk_rows`` decoded
    rows, yielded as the shard is read, so a task never holds a whole shard's pixels (an
    img2dataset tar holds 10,000 images: 1.5 GB of 224 px pixels). Broken items become error rows.

    ``shard_n`` (rows in the shard) is known only once the shard is read: the rows of a shard's
    last block carry it, earlier blocks carry -1. A shard that breaks part-way keeps the rows read
    before the break and ends with one ``read`` error row.
    ``read``: keyword arguments of :func:`pipeline.inputs.registry.read_shard` (image column, label field).
    ``draft``: :func:`pipeline.inputs.images.decode_image`'s reduced-scale JPEG decoding.
    ``defer_jpeg``: JPEGs (within the pixel limit, by their header) are not decoded here but passed
    on in a ``jpeg`` column (b"" for the other rows) for the GPU actors to decode (``jpeg_on_gpu``).
    Text columns carry "" for None (:func:`from_ray_block` restores it); ``read_s`` and ``decode_s``
    carry each row's seconds of reading and decoding (:data:`TIMING_COLUMNS`)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}; at least 1")
    blank = np.zeros((image_size, image_size, 3), np.uint8)
    for spec in batch["shard"]:
        shard = Shard.from_json(str(spec))
        rows: list[tuple] = []
        n = 0
        records = read_shard(shard, **read)
        while True:
            t0 = time.perf_counter()
            try:
                rec = next(records, None)
            except Exception as exc:  # noqa: BLE001 - the shard is unreadable (gone, permissions, corrupt)
                # One error row stands for the (rest of the) shard: the job goes on, and a rerun does
                # not retry it (the shard is recorded as done, with its reason in errors/).
                LOG.warning("shard %d (%s) unreadable: %s: %s", shard.shard_id, shard.source, type(exc).__name__, exc)
                rec = Record(image_id=f"{stem(shard.source)}/<shard-{shard.shard_id:06d}>", uri=shard.source,
                             error=f"unreadable shard: {type(exc).__name__}: {exc}", stage="read")
                records = iter(())
            t_read = time.perf_counter() - t0
            if rec is None:
                break
            if len(rows) == chunk_rows:  # more rows follow: the total is not known yet
                yield _block(shard.shard_id, -1, n - len(rows), rows, image_size, defer_jpeg)
                rows = []
            px, w, h, err, stage = blank, 0, 0, rec.error, (rec.stage or "read") if rec.error else ""
            t1 = time.perf_counter()
            deferred = _deferred(rec.data, max_pixels) if defer_jpeg and err is None else None
            if deferred is not None:
                w, h = deferred
            elif err is None:
                try:
                    px, w, h = decode_image(rec.data, size=image_size, max_pixels=max_pixels, draft=draft)
                except DecodeError as exc:
                    err, stage = str(exc), "decode"
            rows.append((rec, px, w, h, err, stage, t_read, time.perf_counter() - t1,
                         rec.data if deferred is not None else b""))
            n += 1
        if rows:
            yield _block(shard.shard_id, n, n - len(rows), rows, image_size, defer_jpeg)


def _deferred(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG the GPU actor will decode, or None: decoded here instead."""
    if not is_jpeg(data):
        return None
    size = jpeg_size(data)
    return size if size is not None and size[0] * size[1] <= max_pixels else None


def _block(shard_id: int, shard_n: int, first_row: int, rows: list[tuple], image_size: int,
           jpeg: bool = False) -> dict:
    cols: dict[str, list] = {k: [] for k in _COLUMNS if k not in ("shard_id", "shard_n", "shard_row")}
    for rec, _px, w, h, err, stage, *_ in rows:
        cols["image_id"].append(rec.image_id)
        cols["uri"].append(rec.uri)
        cols["label"].append(rec.label)
        cols["caption"].append(rec.caption)
        cols["url"].append(rec.url)
        cols["key"].append(rec.key)
        cols["meta"].append(json.dumps(rec.meta, sort_keys=True, default=str) if rec.meta else None)
        cols["width"].append(w)
        cols["height"].append(h)
        cols["error"].append(err)
        cols["stage"].append(stage)
    out = {k: np.array([v or "" for v in vs] if k in _OPTIONAL else vs, dtype=object) for k, vs in cols.items()}
    out["shard_id"] = np.full(len(rows), shard_id, np.int64)
    out["shard_n"] = np.full(len(rows), shard_n, np.int64)
    out["shard_row"] = np.arange(first_row, first_row + len(rows), dtype=np.int64)
    out["width"] = np.asarray(cols["width"], np.int32)
    out["height"] = np.asarray(cols["height"], np.int32)
    out["pixels"] = np.stack([r[1] for r in rows]) if rows else np.zeros((0, image_size, image_size, 3), np.uint8)
    out["read_s"] = np.array([r[6] for r in rows], np.float64)
    out["decode_s"] = np.array([r[7] for r in rows], np.float64)
    extra = ("jpeg",) if jpeg else ()
    if jpeg:
        out["jpeg"] = np.array([r[8] for r in rows] + [None], dtype=object)[:-1]  # 1-d even if lengths agree
    return {k: out[k] for k in (*_COLUMNS, "pixels", "read_s", "decode_s", *extra)}


def from_ray_block(batch: dict) -> dict:
    """A block as the dataflow delivers it, with its text as ``str`` and None restored where the
    block carries "" (the other columns as they are). The one reader of :func:`_block`'s sentinel.

    >>> b = from_ray_block({"image_id": np.array(["a/1"], object), "label": np.array([""], object)})
    >>> b["image_id"].tolist(), b["label"].tolist()
    (['a/1'], [None])
    """
    out = dict(batch)
    for k in ("image_id", "uri"):
        if k in batch:
            out[k] = np.array([str(v) for v in batch[k]], dtype=object)
    for k in _OPTIONAL:
        if k in batch:
            out[k] = np.array([str(v) or None for v in batch[k]], dtype=object)
    return out


def decode_shard(batch: dict, *, image_size: int, max_pixels: int, read: dict) -> dict:
    """Every decoded row of the shards in ``batch`` at once (:func:`decode_chunks` joined, each
    row's ``shard_n`` filled in): for tests and small inputs; the Ray dataflow streams the blocks."""
    blocks = list(decode_chunks(batch, image_size=image_size, max_pixels=max_pixels, read=read, chunk_rows=1 << 30))
    if len(blocks) <= 1:  # one shard: its one block as it is (no copy)
        return blocks[0] if blocks else _block(0, 0, 0, [], image_size)
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


class EncodeActor:
    """Ray mapper (actor): holds the image encoder, turns pixels into embeddings (and adds each row's
    share of its batch's encode seconds, ``encode_s``, and whether ONNX Runtime encoded it, ``onnx``)."""

    def __init__(self, *, encoder: str, pretrained: str | None, device: str, threads: int, backend: str = "auto",
                 spinning: bool = True, max_pixels: int = 89_478_485) -> None:
        import torch

        self.max_pixels = max_pixels
        from pipeline.encoders.image import load_image_encoder

        torch.set_num_threads(max(1, threads))  # Ray sets OMP_NUM_THREADS=1 in workers
        self.encoder = load_image_encoder(encoder, pretrained, device=device, backend=backend, threads=threads,
                                          spinning=spinning)
        LOG.info("encoder actor: %s on %s (%s), %d threads", self.encoder.model_id, self.encoder.backend, device,
                 threads)

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        pixels = self._with_jpegs(batch.pop("pixels"), batch.pop("jpeg", None), batch)
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        emb = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            emb[ok] = self.encoder.encode(pixels if ok.all() else pixels[ok])  # no copy when all are fine
            bad = ok & ~np.isfinite(emb).all(axis=1)
            for i in np.flatnonzero(bad):
                batch["error"][i], batch["stage"][i] = "encoder produced non-finite values", "encode"
        batch["embedding"] = emb
        batch["encode_s"] = np.full(len(ok), (time.perf_counter() - t0) / max(1, len(ok)), np.float64)
        batch["onnx"] = np.full(len(ok), self.encoder.backend == "onnx", np.bool_)
        _trace_encoded(batch["shard_id"])
        return batch


    def _with_jpegs(self, pixels: np.ndarray, jpeg, batch: dict):
        """``pixels`` with the rows the decode tasks passed on as JPEG bytes (``jpeg_on_gpu``) decoded
        here, on the encoder's device (nvJPEG on a GPU; a row torchvision cannot take falls back to
        Pillow, one that cannot be decoded at all becomes a ``decode`` error row). On a GPU the
        result stays there (a tensor the encoder takes as it is)."""
        todo = [] if jpeg is None else [i for i, b in enumerate(jpeg) if b is not None and len(b)]
        if not todo:
            return pixels
        from pipeline.inputs.jpeg_batch import decode_jpegs

        device = getattr(self.encoder, "device", "cpu")
        px, errors, _ = decode_jpegs([bytes(jpeg[i]) for i in todo], size=pixels.shape[1], device=device,
                                     max_pixels=self.max_pixels)
        for i, err in zip(todo, errors):
            if err:
                batch["error"][i], batch["stage"][i] = err, "decode"
        if device == "cpu" or self.encoder.backend != "torch":
            pixels = np.array(pixels, copy=True)
            pixels[todo] = px.cpu().numpy()
            return pixels
        import torch

        out = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
        out[torch.as_tensor(todo, device=device)] = px
        return out


def _trace_encoded(shard_ids: np.ndarray) -> None:
    """Diagnostics: with ``ZSL_TRACE_ENCODED=<file>`` each encoded batch appends ``shard_id rows time`` lines
    (one ``O_APPEND`` write, atomic across actors). ``benchmarks.redo_share`` uses it to count the work a
    kill destroys inside the workers, which the driver cannot see."""
    path = os.environ.get("ZSL_TRACE_ENCODED")
    if not path or not len(shard_ids):
        return
    ids, counts = np.unique(np.asarray(shard_ids, np.int64), return_counts=True)
    now = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(f"{i} {c} {now:.3f}\n" for i, c in zip(ids, counts)).encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ResourcePlan:
    num_actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int
    device: str
    backend: str = "torch"
    #: logical CPUs left to decode tasks (how many run at once)
    decode_cpus: float = 1.0
    #: images per encoder call
    batch_size: int = 64
    #: whether the actors' idle ONNX Runtime threads spin (not when they share cores with decode tasks)
    spinning: bool = True

    def describe(self) -> str:
        """One line for the log: what was chosen, and why."""
        if self.device == "cuda":
            return (f"{self.num_actors} encoder actor(s), one GPU each, {self.actor_cpus:g} CPU and "
                    f"{self.threads} torch threads each, batches of {self.batch_size}; {self.decode_cpus:g} CPUs for "
                    "decode tasks")
        return (f"{self.num_actors} encoder actor(s) x {self.threads} {self.backend} threads ({self.actor_cpus:g} "
                f"logical CPUs each, batches of {self.batch_size}), {self.decode_cpus:g} CPUs for decode tasks: "
                f"decoding an image costs about "
                f"{DECODE_SHARE.get(self.backend, 0.2):.0%} of the cores it takes to decode and encode it on "
                f"{self.backend}, so that share (at least one CPU) decodes and neither side waits; at most "
                f"{MAX_ACTOR_THREADS} threads per actor, more actors beyond"
                + ("" if self.spinning else "; the threads share the cores with decoding, so they sleep when idle"))


#: Share of a CPU node's cores given to decode tasks: a decoded image's share of the CPU time that
#: decoding and encoding it take (``make bench`` on 2 cores: reading + decoding 1-3 ms of one core
#: per image, 28 px PNGs to 400 px JPEGs decoded in draft mode; EfficientNet-Lite0 on ONNX Runtime
#: ~10 ms of one core per image, on PyTorch ~25 ms).
DECODE_SHARE = {"onnx": 0.2, "torch": 0.1}
#: images per encoder call unless set (``batch_size``): on ONNX Runtime on CPUs, 128 (on 2 cores the
#: pipeline ran 64 -> 115-157, 128 -> 142-167, 256 -> 121-171 images/s, a bare loop ~170 at each; 256
#: doubles the actor's activations for nothing clear)
DEFAULT_BATCH = {"onnx": 128, "torch": 64}
#: intra-op threads per CPU encoder actor at most (beyond, more actors: a session's threads stop
#: scaling well past a few cores for one batch of 64)
MAX_ACTOR_THREADS = 4


def plan_resources(*, cpus: float, gpus: float, num_actors: int | None, device: str,
                   backend: str = "auto", batch_size: int | None = None) -> ResourcePlan:
    """Size the encoder pool so that decode tasks always keep at least one CPU, and on CPU nodes a
    share of the cores in proportion to what decoding costs (:data:`DECODE_SHARE`).

    >>> plan_resources(cpus=2, gpus=0, num_actors=None, device="auto")
    ResourcePlan(num_actors=1, actor_cpus=1.0, actor_gpus=0.0, threads=2, device='cpu', backend='onnx', decode_cpus=1.0, batch_size=128, spinning=False)
    >>> plan_resources(cpus=16, gpus=0, num_actors=None, device="auto")
    ResourcePlan(num_actors=4, actor_cpus=3.0, actor_gpus=0.0, threads=3, device='cpu', backend='onnx', decode_cpus=4.0, batch_size=128, spinning=True)
    >>> plan_resources(cpus=16, gpus=2, num_actors=None, device="auto")
    ResourcePlan(num_actors=2, actor_cpus=1.0, actor_gpus=1.0, threads=4, device='cuda', backend='torch', decode_cpus=14.0, batch_size=64, spinning=True)
    """
    use_gpu = gpus >= 1 and device in ("auto", "cuda")
    if device == "cuda" and not use_gpu:
        raise ValueError("device 'cuda' requested but the Ray cluster has no GPU")
    if use_gpu and backend == "onnx":
        raise ValueError("image backend 'onnx' runs on the CPU; use device 'cpu', or backend 'torch' or 'auto'")
    spare = max(0.5, cpus - 1)  # one CPU stays free for listing/reading/decoding
    if use_gpu:
        n = num_actors or int(gpus)
        per = min(1.0, math.floor(spare / n * 1000) / 1000)
        if per <= 0:
            raise ValueError(f"{n} GPU actors on {cpus} CPUs leave no CPU for decoding; use fewer actors")
        return ResourcePlan(n, per, 1.0, max(1, min(4, int(cpus) // (2 * n))), "cuda", "torch",
                            round(cpus - n * per, 3), batch_size=batch_size or DEFAULT_BATCH["torch"])
    backend = "torch" if backend == "torch" else "onnx"  # auto: ONNX Runtime on CPUs
    encode = min(spare, max(0.5, cpus - max(1, round(cpus * DECODE_SHARE[backend]))))
    n = num_actors or max(1, math.ceil(encode / MAX_ACTOR_THREADS))
    per = math.floor(spare / n * 1000) / 1000  # round down: never eat into the decode CPU
    if per <= 1:  # small nodes: the threads use every core, sharing them with decode tasks that wait on them
        threads = max(1, int(cpus) // n)
    else:  # one logical CPU per thread; what the actors leave is the decode tasks'
        threads = max(1, int((encode if num_actors is None else per * n) / n + 0.4))  # 3.5 -> 3, 3.6 -> 4
        per = min(per, float(threads))
    return ResourcePlan(n, per, 0.0, threads, "cpu", backend, round(cpus - n * per, 3),
                        batch_size=batch_size or DEFAULT_BATCH[backend], spinning=threads <= per)


def _decode_task_args() -> dict:
    return {"num_cpus": 1}


def run_extraction(shards: list[Shard], *, encoder: str, pretrained: str | None, image_size: int,
                   batch_size: int | None, num_actors: int | None, device: str, max_pixels: int,
                   read: dict, on_rows: Callable[[dict], None], decode_rows: int = DECODE_CHUNK_ROWS,
                   backend: str = "auto", draft: bool = False, jpeg_on_gpu: bool = False) -> ResourcePlan:
    """Run decode + encode on Ray Data; hand each output batch (numpy dict) to ``on_rows``.
    ``backend``: the image encoder's (:func:`pipeline.encoders.image.load_image_encoder`); ``draft``:
    reduced-scale JPEG decoding (:func:`pipeline.inputs.images.decode_image`); ``jpeg_on_gpu``: JPEGs
    decoded by the GPU actors (:meth:`EncodeActor._with_jpegs`), when the actors have GPUs."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    res = ray.cluster_resources()
    plan = plan_resources(cpus=res.get("CPU", 1), gpus=res.get("GPU", 0), num_actors=num_actors, device=device,
                          backend=backend, batch_size=batch_size)
    LOG.info("encoder pool on %g CPUs, %g GPUs: %s", res.get("CPU", 1), res.get("GPU", 0), plan.describe())
    defer = jpeg_on_gpu and plan.device == "cuda"
    if jpeg_on_gpu:
        LOG.info("JPEGs decoded %s", "on the GPUs (nvJPEG), other formats on CPUs" if defer else
                 "on CPUs: jpeg_on_gpu needs GPU encoder actors")
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards))
    # ray_remote_args_fn keeps Ray Data from fusing decoding into the encoder actors (fusion rules skip
    # ops that have one): decoding stays in CPU tasks, the actors only encode. Ray 2.60 deprecates the
    # argument (removal planned for 2.64; ray is pinned <2.61), so its warning is silenced here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(decode_chunks, batch_size=1, batch_format="numpy", ray_remote_args_fn=_decode_task_args,
                            fn_kwargs=dict(image_size=image_size, max_pixels=max_pixels, read=read,
                                           chunk_rows=decode_rows, draft=draft, defer_jpeg=defer))
    ds = ds.map_batches(EncodeActor, batch_size=plan.batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=plan.num_actors),
                        num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus,
                        fn_constructor_kwargs=dict(encoder=encoder, pretrained=pretrained,
                                                   device=plan.device, threads=plan.threads,
                                                   backend=backend,  # auto keeps its PyTorch fallback
                                                   spinning=plan.spinning, max_pixels=max_pixels))
    # No prefetch: a shard is handed to the writer as soon as it is encoded. With prefetch, about one
    # finished shard waits in the driver's queue, and a kill throws it away (benchmarks/redo_share.py).
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        on_rows(batch)
    return plan
