"""``zsl run``'s pipeline spec (:class:`RunConfig`, re-exported by :mod:`pipeline.core.config`).

One YAML file declares a living pipeline: its inputs, the image encoder, the class table, the model
(trained here, or an existing one), label and index settings and one outputs root. Each stage section
takes the keys of that stage's own config (``zsl extract``, ``classes``, ``train``, ``embed-text``,
``label``, ``index``) except the paths the pipeline derives from ``root`` and the other stages
(``output``, ``features``, ``model``, ``classes``, ``overwrite``): one source of truth, so a key valid
in ``conf/label.yaml`` is valid under ``label:`` and an unknown one is refused with its section::

    name: animals
    root: /data/zsl/animals            # features/ classes/ model/ labels/ index/ runs/ under it
    inputs: [/data/incoming/images]    # one or more URIs / patterns, any layout `zsl extract` reads
    extract: {encoder: effnet-lite0, shard_size: 256}
    classes: {input: conf/demo/classes.yaml}
    train: {seen: conf/demo/split.json, method: devise}   # or `model: /path/to/a/zsl-train/output`
    captions: null                     # or {text_model: minilm}: embed the images' captions
    label: {top_k: 5}
    index: {max_memory: 4G}            # or null: no index
    address: null                      # a Ray cluster for every stage that runs there
"""

from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from pipeline.core.config_base import ConfigError, Uri, _Config

__all__ = ["make_run_config", "nested_model", "SECTION_DERIVED"]

#: per stage section: the stage config's keys the pipeline sets itself (from ``root`` and the other stages)
SECTION_DERIVED: dict[str, tuple[str, ...]] = {
    "extract": ("input", "output", "overwrite", "address"),
    "classes": ("output", "overwrite"),
    "train": ("features", "classes", "output", "overwrite"),
    "captions": ("features", "overwrite"),
    "label": ("model", "features", "classes", "output", "overwrite", "address"),
    "index": ("features", "model", "output", "overwrite", "address"),
}


def _section_model(section: str, cls: type[_Config]) -> type[_Config]:
    """The stage config ``cls`` less the derived keys: typed, unknown keys refused."""
    drop = set(SECTION_DERIVED[section])
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name in drop:
            continue
        if section == "train" and name == "seen":  # a list, or a file of names (resolved by the pipeline)
            fields[name] = (tuple[str, ...] | str, Field(description=(
                "Seen class names, or a file: one per line, or JSON (a list, or a dict with a 'seen' list).")))
            continue
        fields[name] = (info.annotation, info)
    return create_model(f"{section.title()}Section", __base__=_Config, __doc__=f"`{section}:` of a pipeline spec",
                        **fields)


def make_run_config(stages: dict[str, type[_Config]]) -> type[_Config]:
    """The pipeline spec's model, its sections made from the stage configs ``stages`` (section -> config class;
    :mod:`pipeline.core.config` passes its own, so that a stage's keys have one definition)."""
    sec = {name: _section_model(name, stages[name]) for name in SECTION_DERIVED}

    class RunConfig(_Config):
        """``zsl run PIPELINE.yaml``: a living pipeline (see :mod:`pipeline.core.run_config`)."""

        name: str = Field("pipeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                          description="The pipeline's name (in its reports).")
        root: Uri = Field(description="Outputs root: features/, classes/, model/, labels/, index/ and runs/ go under it.")
        inputs: tuple[str, ...] = Field(min_length=1, description=(
            "Image inputs: URIs or patterns of any layout `zsl extract` reads; new files and shards are extracted "
            "as they arrive."))
        extract: sec["extract"] = Field(default_factory=sec["extract"], description="`zsl extract` settings.")
        classes: sec["classes"] = Field(description="`zsl classes` settings; `input` is the class table.")
        train: sec["train"] | None = Field(None, description=(
            "`zsl train` settings (trained again only when they or the seen-class data change); or give `model`."))
        model: Uri | None = Field(None, description="An existing `zsl train` output instead of `train`.")
        captions: sec["captions"] | None = Field(None, description="`zsl embed-text` settings: embed the captions.")
        label: sec["label"] = Field(default_factory=sec["label"], description="`zsl label` settings.")
        index: sec["index"] | None = Field(default_factory=sec["index"], description=(
            "`zsl index` settings; null: no index (its model must be trained with text semantics)."))
        address: str | None = Field(None, description="Ray cluster address for the stages that run there.")
        keep_runs: int = Field(100, gt=0, description="Run records and reports kept under runs/ (oldest removed).")

        @model_validator(mode="after")
        def _one_model(self):
            if (self.train is None) == (self.model is None):
                raise ValueError("give exactly one of `train` (a model trained by the pipeline) or `model` "
                                 "(an existing `zsl train` output)")
            return self

        def stage_config(self, section: str, **derived: Any) -> _Config:
            """The stage's own config: its section's keys plus the ``derived`` ones (paths, overwrite, address).
            Raises :class:`ConfigError` naming the section for what only the stage's validators catch."""
            part = getattr(self, section)
            values = part.model_dump() if part is not None else {}
            try:
                return stages[section](**{**values, **derived})
            except ValidationError as exc:
                problems = "; ".join(f"'{section}.{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
                raise ConfigError(f"run config: {problems}") from None

    return RunConfig


def nested_model(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that holds the last key of ``loc`` (for naming the known keys of a nested section)."""
    for part in loc[:-1]:
        info = cls.model_fields.get(str(part))
        if info is None:
            return None
        ann = info.annotation
        for a in (ann, *getattr(ann, "__args__", ())):
            if isinstance(a, type) and issubclass(a, BaseModel):
                cls = a
                break
        else:
            return None
    return cls
