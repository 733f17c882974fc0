"""ZSL methods behind one interface (:class:`pipeline.models.base.ZSLModel`)."""

from pipeline.models.base import METHODS, ZSLModel, load_model, save_model
from pipeline.models import devise as _devise  # noqa: F401  (registers the method)
from pipeline.models import eszsl as _eszsl  # noqa: F401

__all__ = ["METHODS", "ZSLModel", "load_model", "save_model", "make_model"]


def make_model(method: str, **params) -> ZSLModel:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[method](**params)
