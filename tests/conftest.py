"""Shared fixtures: a seeded rng, a few real animal-mnist PNGs in class folders, a 2-CPU Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
#: The shared data beside the repository (CI checks it out as ../shared); never an absolute path.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def class_semantics_dir() -> Path:
    """``../shared/data/class_semantics`` (AwA1/AwA2/CUB/SUN/aPY tables). Missing data fails the test:
    a skip would let CI pass without ever reading the real tables."""
    d = SHARED_DATA / "class_semantics"
    if not (d / "awa2" / "class_attributes.csv").is_file():
        pytest.fail(f"{d} is missing: the shared data must be checked out beside the repository as ../shared")
    return d


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The real animal-mnist arrays, loaded once per session."""
    from pipeline.demo_data import load_animal_mnist

    try:
        return load_animal_mnist()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


TINY_CLASSES = ("bear", "bird", "cat")
TINY_PER_CLASS = 2


@pytest.fixture
def tiny_images(tmp_path, animal_mnist):
    """``TINY_PER_CLASS`` real images of each of ``TINY_CLASSES`` as ``<root>/<class>/NNNNN.png``.

    Returns ``(root, {"<class>/NNNNN.png": (28, 28) uint8 array})``.
    """
    from PIL import Image

    from pipeline.demo_data import ANIMAL_MNIST_CLASSES

    x, y = animal_mnist
    root = tmp_path / "images"
    written: dict[str, np.ndarray] = {}
    for name in TINY_CLASSES:
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(y == ANIMAL_MNIST_CLASSES.index(name))[:TINY_PER_CLASS]:
            rel = f"{name}/{int(i):05d}.png"
            Image.fromarray(x[i], mode="L").save(root / rel, format="PNG")
            written[rel] = x[i]
    return str(root), written


@pytest.fixture(scope="module")
def ray_start_2_cpus():
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir="/tmp/zsl-ray-tests")
    try:
        yield ray
    finally:
        ray.shutdown()
