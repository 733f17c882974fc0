"""Class semantics: read class tables, embed names/descriptions, normalise attributes.

A class table is CSV, YAML or Parquet. Recognised columns: ``name`` (or ``class``), optional
``description``, and any number of numeric attribute columns (as in AwA/CUB/aPY attribute
tables). YAML is either a list of ``{name, description, attributes: {attr: value}}`` mappings or
``{classes: [...]}``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from pipeline.core.vectors import l2n
from pipeline.core import fs as zio

LOG = logging.getLogger(__name__)

__all__ = [
    "ClassTable",
    "read_class_table",
    "display_name",
    "class_prompts",
    "embed_class_texts",
    "normalize_attributes",
]

_NAME_COLUMNS = ("name", "class", "class_name")


@dataclass
class ClassTable:
    """Parsed class table. ``attributes`` is ``(n, a)`` float with NaN for missing values."""

    names: list[str]
    descriptions: list[str | None]
    attribute_names: list[str]
    attributes: np.ndarray | None
    source: str


def display_name(name: str) -> str:
    """Human text of a dataset class name.

    >>> display_name("grizzly+bear")
    'grizzly bear'
    >>> display_name("002.Laysan_Albatross")
    'Laysan Albatross'
    """
    name = re.sub(r"^\d+\.", "", name)
    return re.sub(r"[+_]+", " ", name).strip()


def _read_frame(uri: str) -> pd.DataFrame:
    low = uri.lower()
    try:
        if low.endswith((".yaml", ".yml")):
            raw = yaml.safe_load(zio.read_bytes(uri))
            rows = raw.get("classes") if isinstance(raw, dict) else raw
            if not isinstance(rows, list):
                raise ValueError("expected a list of classes (or a 'classes:' list)")
            flat = []
            for i, r in enumerate(rows):
                if isinstance(r, str):
                    r = {"name": r}
                if not isinstance(r, dict):
                    raise ValueError(f"entry {i} is {type(r).__name__}, expected a mapping")
                row = {k: v for k, v in r.items() if k != "attributes"}
                attrs = r.get("attributes") or {}
                if not isinstance(attrs, dict):
                    raise ValueError(f"entry {i} ('{r.get('name')}'): attributes must be a mapping attr -> value")
                row.update({f"attr:{k}": v for k, v in attrs.items()})
                flat.append(row)
            return pd.DataFrame(flat)
        fs, path = zio.filesystem(uri)
        if low.endswith(".parquet"):
            return pd.read_parquet(path, filesystem=fs)
        with fs.open(path, "r") as f:
            text = f.read()
        _check_csv_fields(text)
        return pd.read_csv(io.StringIO(text))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: class table not found") from None
    except (ValueError, yaml.YAMLError, pd.errors.ParserError) as exc:
        raise ValueError(f"{uri}: cannot read class table: {exc}") from None


def _check_csv_fields(text: str) -> None:
    """Every row has as many fields as the header (pandas would shift or pad them silently)."""
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if not header:
        raise ValueError("empty file (no header row)")
    for i, row in enumerate(rows, start=1):
        if row and len(row) != len(header):
            who = f" ('{row[0]}')" if row[0].strip() else ""
            raise ValueError(f"row {i}{who} has {len(row)} fields, the header has {len(header)} "
                             f"({', '.join(header[:6])}{', ...' if len(header) > 6 else ''})")


def read_class_table(uri: str, *, name_column: str = "name", description_column: str = "description",
                     missing_value: float | None = -1.0) -> ClassTable:
    """Read and check a class table; raise ``ValueError`` naming the row/field on bad input."""
    df = _read_frame(uri)
    col = name_column if name_column in df.columns else next((c for c in _NAME_COLUMNS if c in df.columns), None)
    if col is None:
        raise ValueError(f"{uri}: no class-name column (looked for {name_column!r}, {', '.join(_NAME_COLUMNS)})")
    names = df[col]
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"{uri}: row {i + 1}: empty or non-text class name {n!r}")
    names = [n.strip() for n in names]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{uri}: duplicate class names: {', '.join(dup)}")
    descriptions: list[str | None] = [None] * len(names)
    if description_column in df.columns:
        descriptions = [d.strip() if isinstance(d, str) and d.strip() else None for d in df[description_column]]
    attr_cols = [c for c in df.columns if c not in (col, description_column)]
    attributes = None
    attr_names: list[str] = []
    if attr_cols:
        bad = [c for c in attr_cols if not pd.api.types.is_numeric_dtype(df[c]) and not df[c].isna().all()]
        if bad:
            c = bad[0]
            row = next(i for i, v in enumerate(df[c]) if not _is_number(v))
            raise ValueError(f"{uri}: row {row + 1} ('{names[row]}'), attribute '{c}': not a number ({df[c][row]!r})")
        attributes = np.array(df[attr_cols].to_numpy(dtype=np.float64), copy=True)
        if missing_value is not None:
            attributes[attributes == missing_value] = np.nan
        if np.isinf(attributes).any():
            r, c = map(int, np.argwhere(np.isinf(attributes))[0])
            raise ValueError(f"{uri}: row {r + 1} ('{names[r]}'), attribute '{attr_cols[c]}': infinite value")
        attr_names = [c[5:] if str(c).startswith("attr:") else str(c) for c in attr_cols]
    return ClassTable(names, descriptions, attr_names, attributes, uri)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def normalize_attributes(attributes: np.ndarray, *, method: str = "l2", missing: str = "error",
                         names: Sequence[str] = (), attribute_names: Sequence[str] = ()) -> np.ndarray:
    """Fill missing values as asked, then L2- or z-score-normalise per class row / per attribute."""
    a = np.array(attributes, dtype=np.float64)
    nan = np.isnan(a)
    if nan.any():
        if missing == "error":
            r, c = map(int, np.argwhere(nan)[0])
            who = names[r] if names else f"row {r + 1}"
            attr = attribute_names[c] if attribute_names else f"column {c}"
            raise ValueError(f"class '{who}', attribute '{attr}': missing value ({int(nan.sum())} missing in all);"
                             " set missing_attributes to 'column_mean' or 'zero' to fill them")
        if missing == "column_mean":
            means = np.nanmean(np.where(nan.all(0), 0.0, a), axis=0) if nan.all(0).any() else np.nanmean(a, axis=0)
            a[nan] = np.take(np.nan_to_num(means), np.argwhere(nan)[:, 1])
        else:
            a[nan] = 0.0
        LOG.warning("filled %d missing attribute values with %s", int(nan.sum()), missing)
    if method == "l2":
        a = l2n(a, dtype=None)
    elif method == "zscore":
        a = (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1.0)
    elif method != "none":
        raise ValueError(f"unknown attribute normalisation {method!r}")
    return a.astype(np.float32)


def class_prompts(name: str, description: str | None, templates: Sequence[str]) -> list[str]:
    """The texts averaged into a class embedding: each template, plus the description if any."""
    text = display_name(name)
    prompts = [t.format(name=text) for t in templates]
    if description:
        prompts.append(f"{text}: {description}")
    return prompts


def embed_class_texts(encoder, names: Sequence[str], descriptions: Sequence[str | None],
                      templates: Sequence[str]) -> np.ndarray:
    """Prompt-ensemble class embeddings: mean of normalised prompt embeddings, renormalised."""
    prompts, owner = [], []
    for i, (n, d) in enumerate(zip(names, descriptions)):
        p = class_prompts(n, d, templates)
        prompts += p
        owner += [i] * len(p)
    emb = l2n(encoder.encode(prompts), dtype=np.float64)
    out = np.zeros((len(names), emb.shape[1]), np.float64)
    np.add.at(out, np.asarray(owner), emb)
    return l2n(out, dtype=None).astype(np.float32)
