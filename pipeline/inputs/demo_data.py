"""The embedded demo data: animal-mnist (10 animal silhouettes, MIT) written as image folders.

The images come from the installed ``animal-mnist`` package's gzip pickles (package data installed
from PyPI, never user input; the module itself is not imported: it needs TensorFlow). Each class
gets a disjoint, seeded train and test sample, written as ``train/<class>/NNNN.png`` and
``test/<class>/NNNN.png`` so that ``zsl extract`` reads labels from the folder names.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle

import numpy as np

__all__ = ["ANIMAL_MNIST_CLASSES", "load_animal_mnist", "write_demo_data"]

# Label order of the package (alphabetical; checked by eye against the silhouettes).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``(images (10000, 28, 28) uint8, labels (10000,) int)`` from the installed package."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("animal-mnist is not installed: pip install animal-mnist==0.4")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data", "Animal_MNIST")
    with gzip.open(os.path.join(root, "animal_data_version_3.gz"), "rb") as f:
        x = pickle.load(f)  # noqa: S301 - trusted package data from PyPI, not user input
    with gzip.open(os.path.join(root, "animal_label_version_3.gz"), "rb") as f:
        y = pickle.load(f)  # noqa: S301
    x, y = np.asarray(x, np.uint8), np.asarray(y, np.int64)
    if x.shape[1:] != (28, 28) or len(x) != len(y):
        raise ValueError(f"unexpected animal-mnist arrays: {x.shape}, {y.shape}")
    return x, y


def write_demo_data(out: str, *, per_class: int = 100, seed: int = 0,
                    classes: tuple[str, ...] = ANIMAL_MNIST_CLASSES) -> dict:
    """Write ``per_class`` train and test images per class under ``out``; idempotent."""
    from PIL import Image

    x, y = load_animal_mnist()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    for c, name in enumerate(ANIMAL_MNIST_CLASSES):
        if name not in classes:
            continue
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < 2 * per_class:
            raise ValueError(f"class {name} has {len(idx)} images, {2 * per_class} requested")
        for split, part in (("train", idx[:per_class]), ("test", idx[per_class : 2 * per_class])):
            d = os.path.join(out, split, name)
            os.makedirs(d, exist_ok=True)
            for i in part:
                path = os.path.join(d, f"{int(i):05d}.png")
                if not os.path.exists(path):
                    tmp = os.path.join(d, f"._tmp-{int(i):05d}.png")
                    Image.fromarray(x[i], mode="L").save(tmp, format="PNG")
                    os.replace(tmp, path)
                counts[split] += 1
    return {"n_train": counts["train"], "n_test": counts["test"], "classes": list(classes)}
