"""ZSL methods behind one interface (:class:`pipeline.zsl.models.base.ZSLModel`)."""

from __future__ import annotations

import inspect

from pipeline.zsl.models.base import METHODS, ZSLModel, load_model, model_manifest, save_model, save_weights
from pipeline.zsl.models import bilinear as _bilinear  # noqa: F401  (each import registers its methods)
from pipeline.zsl.models import clip_zs as _clip_zs  # noqa: F401
from pipeline.zsl.models import eszsl as _eszsl  # noqa: F401
from pipeline.zsl.models import sae as _sae  # noqa: F401
from pipeline.zsl.models import dap as _dap  # noqa: F401
from pipeline.zsl.models import relation as _relation  # noqa: F401
from pipeline.zsl.models import ensemble as _ensemble  # noqa: F401
from pipeline.zsl.models import bridge as _bridge  # noqa: F401

__all__ = ["METHODS", "ZSLModel", "load_model", "save_model", "save_weights", "model_manifest", "make_model",
           "method_params", "check_method"]


def method_params(method: str) -> dict:
    """Hyper-parameters a method accepts, with their defaults."""
    check_method(method)
    sig = inspect.signature(METHODS[method].__init__)
    return {n: p.default for n, p in sig.parameters.items()
            if n != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_model(method: str, **params) -> ZSLModel:
    """Build a model; unknown hyper-parameter names are rejected with the known ones listed."""
    known = method_params(method)
    unknown = sorted(set(params) - set(known))
    if unknown and method != "ensemble":
        raise ValueError(f"{method}: unknown parameter(s) {', '.join(unknown)} "
                         f"(known: {', '.join(f'{k}={v!r}' for k, v in known.items())})")
    return METHODS[method](**params)


def check_method(method: str, what: str = "method") -> None:
    """``ValueError`` unless ``method`` is in the registry (the one list of method names)."""
    if method not in METHODS:
        raise ValueError(f"unknown {what} {method!r} (known: {', '.join(sorted(METHODS))})")
