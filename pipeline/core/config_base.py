"""What every job's config model builds on: the base model, the Uri type and the error."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from pipeline.core.fs import absolute_uri

__all__ = ["ConfigError", "Uri", "_Config"]


class ConfigError(ValueError):
    """A configuration problem, reported before any work is done."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


#: A local path or fsspec URI. Local paths are made absolute when the config is built, so that
#: manifests and identities never depend on the working directory a job ran in.
Uri = Annotated[str, AfterValidator(absolute_uri)]
