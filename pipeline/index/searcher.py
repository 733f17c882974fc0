"""Text-to-image retrieval over a ``zsl index`` output: load once, answer many queries.

:class:`Searcher` holds the memory-mapped index, its lazily read id table, the model (the copy the
index directory carries, so the directory can move) and the text encoder. Free text is embedded
like a class name (the mean over the class prompt templates) and mapped like the training classes
(``search_queries``); an image is encoded by the encoder that made the indexed features and
projected like them (``search_images``); vectors already in the index's space can be searched
directly. :class:`PredictedLabels` adds a ``zsl label`` output's predictions to hits. Used by
``zsl search`` and by the HTTP service (``zsl serve``).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from pipeline.core import fs as zio
from pipeline.core import parquet as zpq
from pipeline.index.filters import FilteredIndex, LabelSets
from pipeline.index.knn import search as index_search
from pipeline.index.store import CAPTIONS_INDEX, MODEL_COPY, load_index
from pipeline.zsl.models import load_model
from pipeline.zsl.models.scoring import model_fingerprint

LOG = logging.getLogger(__name__)

__all__ = ["Searcher", "PredictedLabels", "MODES"]

#: what a text query searches: the images (the model's space), their captions, or both
MODES = ("image", "caption", "both")


class Searcher:
    """Loaded index (memory-mapped) + model + text encoder; reuse it for many queries."""

    def __init__(self, index_dir: str, *, load_text: bool = True, text_backend: str = "torch",
                 text_threads: int | None = None, image_threads: int | None = None) -> None:
        """``text_backend``/``text_threads``: how the text model runs (:func:`pipeline.encoders.text.load_text_encoder`;
        ``zsl serve`` uses ``auto``: ONNX Runtime on CPUs; one-shot searches keep PyTorch)."""
        self.index_dir = index_dir
        self.text_backend, self.text_threads = text_backend, text_threads
        #: ONNX Runtime threads of the image encoder (None: one per core); 1 runs it on the calling thread,
        #: at that thread's priority (the service's image threads are niced), with idle threads not spinning
        self.image_threads = image_threads
        self.index, self.ids, self.manifest = load_index(index_dir, lazy_ids=True)
        m = self.manifest
        if not m.model_dir or not m.model_fingerprint:
            raise ValueError(f"{index_dir}: manifest names no model; was it built by `zsl index`?")
        # the copy the index carries (so it can move), else the model it was built with
        model_dir = zio.join(index_dir, MODEL_COPY) if zio.exists(zio.join(index_dir, MODEL_COPY, "manifest.json")) \
            else m.model_dir
        self.model, mman = load_model(model_dir)
        self.model_manifest = mman
        if model_fingerprint(model_dir, mman) != m.model_fingerprint:
            raise ValueError(f"{index_dir}: the model at {model_dir} is not the one the index was built with; "
                             "rebuild the index")
        self.templates = m.templates or ["{name}"]
        # the caption index, when the features' captions were embedded (``zsl embed-text``)
        self.captions = self.captions_manifest = None
        if zio.exists(zio.join(index_dir, CAPTIONS_INDEX, "manifest.json")):
            self.captions, _, self.captions_manifest = load_index(zio.join(index_dir, CAPTIONS_INDEX), lazy_ids=True)
            if self.captions.ntotal != self.index.ntotal:
                raise ValueError(f"{index_dir}: the caption index holds {self.captions.ntotal} rows, the image "
                                 f"index {self.index.ntotal}; run `zsl index` again")
        self._encoder = None
        self._image_encoder = None
        self._image_lock = threading.Lock()
        self.labels: PredictedLabels | None = None
        self._label_sets: LabelSets | None = None
        self._sets_lock = threading.Lock()
        # filtered searches (pipeline.index.filters): the image index, and the caption index (same ids)
        self.filtered = FilteredIndex(self.index)
        self.filtered_captions = FilteredIndex(self.captions) if self.captions is not None else None
        if load_text:
            self.encoder  # noqa: B018 - load now, not on the first query

    @property
    def encoder(self):
        """The text model the index's model was trained against (loaded on first use)."""
        if self._encoder is None:
            from pipeline.encoders.text import load_text_encoder

            m = self.manifest
            if not m.text_model:
                raise ValueError(f"{self.index_dir}: manifest names no text model; cannot embed text queries")
            enc = load_text_encoder(m.text_model_name or m.text_model.split("@", 1)[0], m.text_pretrained,
                                    backend=self.text_backend, threads=self.text_threads)
            want = self.model_manifest.semantic_dim if self.model_manifest.uses_text else m.dim
            if enc.dim != want:
                raise ValueError(f"text model gives {enc.dim}-d vectors, the model takes {want}-d")
            self._encoder = enc
        return self._encoder


    def adopt_encoders(self, other: "Searcher") -> None:
        """Take over ``other``'s loaded text and image encoders where this index uses the same ones
        (a new version of a served index: no second copy of the models in memory)."""
        a, b = self.manifest, other.manifest
        same_text = (a.text_model, a.text_model_name, a.text_pretrained, self.text_backend, self.text_threads) == \
            (b.text_model, b.text_model_name, b.text_pretrained, other.text_backend, other.text_threads)
        if same_text and other._encoder is not None and self._encoder is None:
            self._encoder = other._encoder
        same_image = (a.image_encoder, a.image_pretrained, a.feature_model, self.image_threads) == \
            (b.image_encoder, b.image_pretrained, b.feature_model, other.image_threads)
        if same_image and a.image_encoder and other._image_encoder is not None:
            self._image_encoder = other._image_encoder

    @property
    def text_backend_in_use(self) -> str | None:
        """How the text model runs (``torch`` / ``onnx``), once loaded; None before the first text query."""
        return getattr(self._encoder, "backend", None)

    @property
    def image_encoder(self):
        """The encoder that made the indexed features (loaded on first use, on the CPU)."""
        if self._image_encoder is None:
            from pipeline.encoders.image import load_image_encoder
            from pipeline.encoders.common import encoder_id

            m = self.manifest
            name, pretrained = m.image_encoder, m.image_pretrained
            if name is None and m.features_dir and zio.exists(zio.join(m.features_dir, "manifest.json")):
                from pipeline.core.features import open_features  # an index built before the encoder was recorded

                fman = open_features(m.features_dir)
                name, pretrained = fman.config.get("encoder"), fman.config.get("pretrained")
            if not name:
                raise ValueError(f"{self.index_dir}: the index does not say which image encoder made its features "
                                 "(features imported or built by hand); image queries need it")
            if encoder_id(name, pretrained) != m.feature_model:
                raise ValueError(f"{self.index_dir}: encoder {encoder_id(name, pretrained)} is not the one that "
                                 f"made the indexed features ({m.feature_model})")
            self._image_encoder = load_image_encoder(name, pretrained, device="cpu", threads=self.image_threads,
                                                     spinning=self.image_threads is None)
        return self._image_encoder

    def image_queries(self, images: list[bytes]) -> np.ndarray:
        """Query vectors of encoded images (JPEG/PNG/... bytes), mapped like the indexed images.

        Raises :class:`pipeline.inputs.images.DecodeError` for bytes that are not a usable image."""
        from pipeline.inputs.images import decode_image

        with self._image_lock:  # one image query at a time: loading, decoding (large images) and encoding
            enc = self.image_encoder
            size = self.manifest.image_size or enc.image_size
            pixels = np.stack([decode_image(b, size=size, max_pixels=self.max_image_pixels)[0] for b in images])
            X = enc.encode(pixels)
        return self.model.search_images(X).astype(np.float32)

    #: decoded images above this many pixels are refused (decompression bombs)
    max_image_pixels: int = 89_478_485

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def text_queries(self, texts: list[str]) -> np.ndarray:
        """Query vectors of free texts, embedded like class names (mean over the class prompt templates)."""
        for t in texts:
            if not t.strip():
                raise ValueError("empty search text")
        prompts = [tpl.format(name=t.strip()) for t in texts for tpl in self.templates]
        emb = self.encoder.encode(prompts).reshape(len(texts), len(self.templates), -1).mean(1)
        return self.model.search_queries(emb)

    def text_query_pairs(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per text: the image-space query (:meth:`text_queries`) and, when the index has captions,
        the text embedded as it is (captions are embedded without templates); one encoder call."""
        if self.captions is None:
            return [(q, None) for q in self.text_queries(texts)]
        for t in texts:
            if not t.strip():
                raise ValueError("empty search text")
        per = len(self.templates) + 1
        prompts = [p for t in texts for p in (*(tpl.format(name=t.strip()) for tpl in self.templates), t.strip())]
        emb = self.encoder.encode(prompts).reshape(len(texts), per, -1)
        q_img = self.model.search_queries(emb[:, :-1].mean(1))
        return [(q_img[i], emb[i, -1]) for i in range(len(texts))]

    def search(self, text: str, k: int = 10, *, mode: str = "image", caption_weight: float = 0.5) -> list[dict]:
        q_img, q_cap = self.text_query_pairs([text])[0]
        return self.search_pair(q_img, q_cap, k, mode=mode, caption_weight=caption_weight)

    def search_pair(self, q_img: np.ndarray | None, q_cap: np.ndarray | None, k: int, *, mode: str = "image",
                    caption_weight: float = 0.5, allowed: list[np.ndarray] | None = None) -> list[dict]:
        """Hits by the image index (``image``), the caption index (``caption``), or both (``both``:
        ``(1 - w) * image score + w * caption score`` over the union of each index's candidates);
        with ``allowed`` (:meth:`allowed`), each index searched among those ids only."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; use one of {', '.join(MODES)}")
        if mode != "image" and (self.captions is None or q_cap is None):
            raise ValueError(f"{self.index_dir} has no caption index (run `zsl embed-text` on the features, "
                             "then `zsl index` again)")
        if mode == "image":
            q_img = np.asarray(q_img, np.float32).reshape(1, -1)
            return (self.search_vectors(q_img, k) if allowed is None else self.search_filtered(q_img, k, allowed))[0]
        q_cap = np.asarray(q_cap, np.float32).reshape(1, -1)
        if mode == "caption":  # rows without a caption hold zero vectors: exactly 0, dropped
            scores, ids = self._caption_search(q_cap, k, allowed)
            keep = scores[0] != 0.0
            return self._hits(scores[0][keep], ids[0][keep])
        q_img = np.asarray(q_img, np.float32).reshape(1, -1)
        fetch = max(4 * k, 50)
        if allowed is None:
            si, ii = index_search(self.index, q_img, fetch)
            sc, ic = index_search(self.captions, q_cap, fetch)
        else:
            si, ii = self.filtered.search(q_img, fetch, allowed)
            sc, ic = self.filtered_captions.search(q_cap, fetch, allowed)
        cand = np.unique(np.concatenate([ii[0][ii[0] >= 0], ic[0][ic[0] >= 0]]))
        s_img = _scores_of(self.index, q_img[0], cand, ii[0], si[0])
        s_cap = _scores_of(self.captions, q_cap[0], cand, ic[0], sc[0])
        total = (1 - caption_weight) * s_img + caption_weight * s_cap
        order = np.argsort(-total, kind="stable")[:k]
        hits = self._hits(total[order], cand[order])
        for h, i in zip(hits, order):
            h["image_score"], h["caption_score"] = float(s_img[i]), float(s_cap[i])
        return hits

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[dict]]:
        """Hits of each query vector (already in the index's space): rank, score, image_id, uri, label."""
        scores, ids = index_search(self.index, queries, k)
        return [self._hits(s, i) for s, i in zip(scores, ids)]

    def _caption_search(self, q_cap: np.ndarray, k: int, allowed: list[np.ndarray] | None):
        """The caption index's top ``k`` (among ``allowed``), widened until ``k`` rows score non-zero
        where the allowed set has more rows: rows without a caption (zero vectors) are dropped."""
        if allowed is None:
            return index_search(self.captions, q_cap, k)
        most = sum(len(p) for p in allowed)
        fetch = k
        while True:
            scores, ids = self.filtered_captions.search(q_cap, fetch, allowed)
            if (scores[0] != 0.0).sum() >= k or fetch >= most:
                return scores, ids
            fetch = min(most, 4 * fetch)

    @property
    def label_sets(self) -> LabelSets:
        """The true labels' id sets (the id table's ``label`` column), read once (:meth:`prepare_filters`)."""
        with self._sets_lock:
            if self._label_sets is None:
                # from the id table opened with the index: a newer ids.parquet renamed in since is not read
                self._label_sets = LabelSets(self.ids.read(["label"]).column("label"))
            return self._label_sets

    def prepare_filters(self) -> None:
        """Build now what filtered searches use, so that no query pays for it: the true labels' id
        sets, the predicted labels' (when :attr:`labels` is set) and the image index's float16
        copies of the large ones (:meth:`FilteredIndex.prepare`). ``zsl serve`` calls it at load."""
        sets = list(self.label_sets.sets.values())
        if self.labels is not None:
            pred = self.labels.label_sets
            sets += [*pred.sets.values(), pred.flagged]
        self.filtered.prepare(sets)

    @property
    def filters_ready(self) -> bool:
        """Whether the label sets a filtered query uses are built (true labels, and predicted ones when set)."""
        return self._label_sets is not None and (self.labels is None or self.labels.sets_ready)

    def allowed(self, labels=None, *, unseen_only: bool = False) -> list[np.ndarray]:
        """The ids whose true or predicted label is in ``labels`` (any, when None) and, with
        ``unseen_only``, whose predicted label is an unseen class (needs :attr:`labels`), as sorted id
        arrays whose union is the allowed set: one per label source and label, the prepared arrays
        themselves (so a large label's copy is found), or one intersection with ``unseen_only``."""
        pred = self.labels.label_sets if self.labels is not None else None
        if unseen_only and pred is None:
            raise ValueError("unseen_only needs predicted labels")
        if not labels:
            return [pred.flagged] if unseen_only else [np.arange(self.index.ntotal, dtype=np.int64)]
        want = set(labels)
        parts = [src.sets[x] for src in (self.label_sets, pred) if src is not None for x in want if x in src.sets]
        if unseen_only:  # a mask, not a sort: a few ms less for labels of 100k+ rows
            mask = np.zeros(self.index.ntotal, bool)
            for p in parts:
                mask[p] = True
            return [pred.flagged[mask[pred.flagged]]]
        return parts or [np.zeros(0, np.int64)]

    def allowed_ids(self, labels=None, *, unseen_only: bool = False) -> np.ndarray:
        """:meth:`allowed` as one sorted array."""
        parts = self.allowed(labels, unseen_only=unseen_only)
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))

    def search_filtered(self, queries: np.ndarray, k: int, allowed) -> list[list[dict]]:
        """Hits of each query vector among the allowed faiss ids (an array, or :meth:`allowed`'s
        list; :meth:`FilteredIndex.search`)."""
        scores, ids = self.filtered.search(queries, k, allowed)
        return [self._hits(s, i) for s, i in zip(scores, ids)]

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
        keep = ids >= 0
        rows = self.ids.take(ids[keep]).select(["faiss_id", "image_id", "uri", "label"]).to_pylist()
        if self.labels is not None:
            self.labels.annotate(rows)
        return [{"rank": r + 1, "score": float(s), **row} for r, (s, row) in enumerate(zip(scores[keep], rows))]


def _scores_of(index, q: np.ndarray, cand: np.ndarray, found_ids: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Inner products of ``q`` with the candidates' stored vectors; where the index cannot give
    them back (compressed or IVF without a direct map), the search's own scores, and below its
    lowest for candidates it did not return."""
    try:
        return index.reconstruct_batch(cand.astype(np.int64)) @ q
    except RuntimeError:
        known = dict(zip(found_ids.tolist(), found.tolist()))
        floor = min((v for i, v in known.items() if i >= 0), default=0.0) - 1e-3
        return np.array([known.get(int(i), floor) for i in cand], np.float32)


class PredictedLabels:
    """A ``zsl label`` output of the same feature directory, looked up by faiss id.

    The index adds feature shards in the order its manifest lists them and label shards keep the
    feature shards' names and row order, so faiss id ``i`` is row ``i - offset`` of one label shard.
    Checked when opened (same features, every indexed shard labelled with the same row count) and
    per hit (same image id).
    """

    COLUMNS = ["image_id", "top1", "top1_score", "top1_is_unseen"]

    def __init__(self, labels_dir: str, index_manifest) -> None:
        from pipeline.core.manifests import LabelsManifest, read_manifest

        self.labels_dir = labels_dir
        lman = read_manifest(labels_dir, LabelsManifest)
        im = index_manifest
        if im.identity.get("features") and lman.identity.get("features") != im.identity["features"]:
            raise ValueError(f"{labels_dir}: labels of {lman.features_dir}, but the index holds {im.features_dir}")
        files = {f.rsplit("/", 1)[-1]: f for f in zpq.iter_parquet_files(zio.join(labels_dir, "labels"))}
        missing = [s for s in im.shards if s not in files]
        if missing:
            raise ValueError(f"{labels_dir}: no labels for {len(missing)} indexed shard(s) ({', '.join(missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''}); run `zsl label` on the features again")
        # only the four columns hits need, a few row groups cached per shard
        self.tables = [zpq.LazyParquet(files[s], cache_groups=4, columns=self.COLUMNS) for s in im.shards]
        counts = [t.num_rows for t in self.tables]
        if sum(counts) != im.ntotal:
            raise ValueError(f"{labels_dir}: {sum(counts)} labelled rows in the indexed shards, index holds {im.ntotal}")
        self.starts = np.cumsum([0, *counts])
        self.classes = lman.classes
        self._lock = threading.Lock()
        self._sets: LabelSets | None = None

    @property
    def sets_ready(self) -> bool:
        return self._sets is not None

    @property
    def label_sets(self) -> LabelSets:
        """Predicted labels' id sets (``top1``) and the predicted-unseen ids, read once (on first use,
        or when :meth:`Searcher.prepare_filters` asks)."""
        with self._lock:
            if self._sets is None:
                parts = [t.read(["top1", "top1_is_unseen"]) for t in self.tables]  # the files opened at load
                top1 = [x for p in parts for x in p.column("top1").chunks]
                unseen = np.concatenate([p.column("top1_is_unseen").to_numpy(zero_copy_only=False) for p in parts])
                import pyarrow as pa

                self._sets = LabelSets(pa.chunked_array(top1, pa.string()), flags=unseen.astype(bool))
            return self._sets

    def annotate(self, rows: list[dict]) -> None:
        """Add ``predicted``, ``predicted_score``, ``predicted_unseen`` to hits (dicts with faiss_id, image_id)."""
        if not rows:
            return
        ids = np.array([r["faiss_id"] for r in rows], np.int64)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        with self._lock:  # the row-group caches are not thread-safe
            found: dict[int, dict] = {}
            for s in np.unique(shard):
                sel = np.flatnonzero(shard == s)
                got = self.tables[s].take(ids[sel] - self.starts[s]).to_pylist()
                found.update(zip(sel.tolist(), got))
        for i, r in enumerate(rows):
            lab = found[i]
            ok = lab["image_id"] == r["image_id"]
            if not ok:
                LOG.warning("%s: faiss id %d is image %s in the index but %s in the labels", self.labels_dir,
                            r["faiss_id"], r["image_id"], lab["image_id"])
            r["predicted"] = lab["top1"] if ok else None
            r["predicted_score"] = lab["top1_score"] if ok else None
            r["predicted_unseen"] = lab["top1_is_unseen"] if ok else None
