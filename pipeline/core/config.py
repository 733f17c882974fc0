"""Typed, validated configuration for every job: the one source of truth.

Each job has one pydantic model. Unknown keys are rejected (``extra="forbid"``), so a typo in a
YAML file or an override fails loudly instead of being ignored. Jobs build a config from
``conf/base.yaml`` + ``conf/<job>.yaml`` + command-line flags with :func:`build_config`; the
library only ever sees the validated object.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field, ValidationError, field_validator

from pipeline.core.config_base import ConfigError, Uri, _Config
from pipeline.core.run_config import SECTION_DERIVED, make_run_config, nested_model
from pipeline.core.serve_config import ServeConfig
from pipeline.core.units import parse_memory

__all__ = ["ConfigError", "ExtractConfig", "ClassesConfig", "TrainConfig", "EvaluateConfig", "LabelConfig",
           "IndexConfig", "SearchConfig", "ServeConfig", "AddClassesConfig", "ReportConfig", "DemoDataConfig",
           "RunConfig", "CONFIGS", "Uri", "build_config"]


DEFAULT_TEMPLATES = (
    "a photo of a {name}.",
    "a picture of a {name}.",
    "an image showing a {name}.",
    "a drawing of a {name}.",
    "a silhouette of a {name}.",
)


class ExtractConfig(_Config):
    """``zsl extract``: image shards -> feature Parquet shards."""

    input: Uri | tuple[Uri, ...] = Field(description=(
        "Folder of images, img2dataset output (files / webdataset / parquet), .tar shards or Parquet with "
        "image bytes; local or any fsspec URI; brace patterns such as shards/{00000..00099}.tar. Several: "
        "one feature directory of all (the first names it; adding one later is growth)."))
    output: Uri = Field(description="Output directory (local or fsspec URI).")
    input_format: Literal["auto", "folder", "files", "webdataset", "parquet"] = Field("auto", description=(
        "'auto' recognises img2dataset's three layouts, Parquet with image bytes and image folders, and logs why."))
    image_column: str = Field("auto", description="Parquet column of image bytes; 'auto': image, jpg, jpeg, png, webp.")
    label_column: str = Field("label", description="Parquet column of labels (when present).")
    label_field: str | None = Field(None, description=(
        "Key of the json sidecars (files, webdataset) or Parquet column holding the label; the img2dataset "
        "'files' layout has labels only from it."))
    encoder: str = Field("effnet-lite0", description="'effnet-lite0' or 'open_clip:<arch>'.")
    pretrained: str | None = Field(
        None, description="open_clip checkpoint path or pretrained tag; 'random' allows random weights (tests)."
    )
    shard_size: int = Field(256, gt=0, description="Images per shard for folder inputs.")
    batch_size: int | None = Field(None, gt=0, description=(
        "Images per encoder forward pass; default: 128 on ONNX Runtime on CPUs, 64 on PyTorch."))
    decode_block_rows: int = Field(256, gt=0, description=(
        "Decoded images a decode task hands on at a time (its memory: this many images' pixels, "
        "whatever the shard size)."))
    num_actors: int | None = Field(None, gt=0, description="Encoder actors; default: GPUs, or CPUs - 1.")
    address: str | None = Field(None, description="Ray cluster address; default starts a local cluster.")
    max_image_pixels: int = Field(89_478_485, gt=0, description="Refuse images with more pixels (decompression bombs).")
    limit: int | None = Field(None, gt=0, description="Only the first N shards (smoke runs).")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_backend: Literal["auto", "torch", "onnx"] = Field("auto", description=(
        "How the image encoder runs: 'auto' (ONNX Runtime on CPUs, PyTorch on GPUs and for random weights), "
        "'torch', or 'onnx' (CPUs only): the model exported once into the cache and checked against PyTorch "
        "before use (max |onnx - torch| <= 1e-4 of the largest feature value), so both make the same features."))
    jpeg_draft: bool | None = Field(None, description=(
        "Decode JPEGs twice the input size or more at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, never below "
        "the input size), then resize: about half the decode time of such images; their features move a little "
        "(cosine >= 0.98 to full decoding), so this is part of the features' identity. Default: on for a new "
        "output; an existing one keeps what it was extracted with (off before this setting existed)."))
    jpeg_on_gpu: bool = Field(False, description=(
        "With GPU encoder actors: decode JPEGs on the GPU (nvJPEG, via torchvision) in the actors instead of "
        "in the CPU decode tasks, which then only read and pass the bytes on; other formats, and every image "
        "on a machine without a GPU, are still decoded on CPUs. For nodes whose CPUs cannot keep up with the "
        "GPU (see the GPU check's decode section). Pixels differ from Pillow's by the resize kernels "
        "(embeddings at cosine ~0.999), so this is part of the features' identity."))
    overwrite: bool = Field(False, description="Replace an output extracted with other settings or inputs.")


class ClassesConfig(_Config):
    """``zsl classes``: class table -> class embeddings."""

    input: Uri = Field(description="Class table: CSV, YAML or Parquet (name[, description][, attributes...]).")
    output: Uri
    overwrite: bool = Field(False, description="Replace a class set made from another table or settings.")
    text_model: str = Field("minilm", description="'minilm' (offline default) or 'open_clip:<arch>'.")
    pretrained: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    name_column: str = "name"
    description_column: str = "description"
    attribute_normalization: Literal["l2", "zscore", "none"] = "l2"
    missing_attributes: Literal["error", "column_mean", "zero"] = "error"
    missing_value: float | None = Field(-1.0, description="Attribute value that means 'missing' (AwA uses -1).")
    word_vectors: bool = Field(True, description="Also store GloVe word vectors of the class names.")

    @field_validator("templates")
    @classmethod
    def _templates_have_name(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one prompt template is needed")
        for t in v:
            if "{name}" not in t:
                raise ValueError(f"template {t!r} has no '{{name}}' placeholder")
        return v


SEMANTIC_SOURCES = ("text", "attributes", "glove")


class TrainConfig(_Config):
    """``zsl train``: seen-class features + class semantics -> a ZSL model directory."""

    features: Uri
    classes: Uri
    seen: tuple[str, ...] = Field(description="Seen class names (training classes).")
    method: str = Field("devise", description="A method of the model registry (`zsl methods` lists them).")
    params: dict[str, Any] = Field(default_factory=dict, description="Method hyper-parameters (see `zsl methods`).")
    bridge: Uri | None = Field(None, description=(
        "A `zsl bridge` model: its scores are added to the method's, weighted by a w chosen on held-out "
        "seen classes (text semantics only)."))
    bridge_weights: tuple[float, ...] = Field((0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                                              description="Candidate bridge weights w.")
    bridge_splits: int = Field(5, gt=0, description="Seen-class splits the bridge weight is averaged over.")
    bridge_mode: Literal["scores", "features"] = Field("scores", description=(
        "scores: mix the method's and the bridge's scores (w tuned); features: the method learns from "
        "[features, bridged features]."))
    members: tuple[str, ...] = Field((), description="Ensemble members (method=ensemble).")
    member_weights: tuple[float, ...] = Field((), description="Ensemble weights (default: equal).")
    semantics: str = Field("text", description="Semantic source(s): text, attributes, glove, or a '+' combination.")
    semantic_weights: dict[str, float] = Field(default_factory=dict, description="Weights of combined sources.")
    output: Uri
    overwrite: bool = Field(False, description="Replace a model trained from other inputs or settings.")
    tune: bool = Field(False, description="Choose hyper-parameters on held-out seen classes (method grid).")
    calibration: bool = Field(True, description="Tune calibrated stacking on held-out seen classes.")
    val_class_fraction: float = Field(0.3, gt=0, lt=1)
    val_sample_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0

    @field_validator("semantics")
    @classmethod
    def _known_sources(cls, v: str) -> str:
        parts = v.split("+")
        bad = [p for p in parts if p not in SEMANTIC_SOURCES]
        if bad or len(set(parts)) != len(parts):
            raise ValueError(f"semantics {v!r}: use {', '.join(SEMANTIC_SOURCES)} or a '+' combination of them")
        return v


class EvaluateConfig(_Config):
    models: tuple[Uri, ...] = Field(description="One or more `zsl train` outputs, evaluated side by side.")
    features: Uri
    classes: Uri
    unseen: tuple[str, ...]
    json_path: Uri | None = None
    html: Uri | None = None
    allow_train_features: bool = False
    transductive: bool = Field(False, description="Also report transductive results (prototype refinement).")
    transductive_alpha: float = Field(0.5, ge=0, le=1)

    @field_validator("models")
    @classmethod
    def _at_least_one(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one --model is needed")
        return v


class LabelConfig(_Config):
    model: Uri
    features: Uri
    classes: Uri
    output: Uri
    top_k: int = Field(5, gt=0)
    calibrated: bool = True
    batch_size: int = Field(16_384, gt=0, description="Rows scored at a time (bounds memory).")
    overwrite: bool = False
    address: str | None = Field(None, description="Ray cluster address: label the shards there (default: here).")
    num_workers: int | None = Field(None, gt=0, description="Ray workers (default: the cluster's CPUs - 1).")


class IndexConfig(_Config):
    features: Uri
    model: Uri
    output: Uri
    max_memory: str = Field("4G", description="Memory budget for the index, e.g. '512M', '16G'.")
    index_factory: str | None = Field(None, description="Force a FAISS index_factory string.")
    nprobe: int | None = Field(None, gt=0, description="Fix IVF nprobe instead of tuning it.")
    search_params: str | None = Field(None, description="Fix faiss search parameters (e.g. 'efSearch=128') "
                                                        "instead of tuning them.")
    target_recall: float = Field(0.95, gt=0, le=1, description="Tune search parameters to this recall@k.")
    tune_k: int = Field(10, gt=0, description="The k of the recall target.")
    max_query_ms: float | None = Field(None, gt=0, description="Instead: the best recall within this "
                                                               "single-query latency.")
    tune_queries: int = Field(500, gt=0, description="Queries sampled from the index to tune on.")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    overwrite: bool = Field(False, description="Replace an index built from other features, model or settings.")
    address: str | None = Field(None, description="Ray cluster address: project shards (and build IVF "
                                                  "partitions) there.")
    num_workers: int | None = Field(None, gt=0, description="Ray workers (default: the cluster's CPUs - 1).")
    partitions: int | None = Field(None, gt=0, description="IVF only: build this many partitions apart and "
                                                           "merge their lists on disk (default with address: "
                                                           "one per worker).")

    @field_validator("max_memory")
    @classmethod
    def _memory_parses(cls, v: str) -> str:
        parse_memory(v)
        return v


class SearchConfig(_Config):
    index: Uri
    text: str
    k: int = Field(10, gt=0)
    mode: Literal["image", "caption", "both"] = Field("image", description=(
        "Search the images (the model's space), their captions (zsl embed-text), or both."))
    caption_weight: float = Field(0.5, ge=0, le=1, description="Weight of the caption score in mode 'both'.")
    labels: list[str] = Field(default_factory=list, description=(
        "Only images whose (true) label is one of these; searched among those images, in every mode."))


class AddClassesConfig(_Config):
    model: Uri
    classes: Uri = Field(description="The `zsl classes` output to extend (in place).")
    input: Uri = Field(description="Class table with the new classes.")
    relabel: Uri | None = Field(None, description="A `zsl label` output directory to re-label in place.")


class ReportConfig(_Config):
    evaluation: tuple[Uri, ...] = Field(description="`zsl evaluate --json` files.")
    search: tuple[Uri, ...] = Field((), description="`zsl search --json` files.")
    output: Uri = Field(description="HTML file to write.")
    title: str = "zsl-pipeline report"

    @field_validator("evaluation")
    @classmethod
    def _at_least_one(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one evaluation JSON is needed")
        return v


class EmbedTextConfig(_Config):
    """``zsl embed-text``: the captions of a feature directory -> caption embeddings (``FEATURES/text``)."""

    features: Uri
    text_model: str = Field("minilm", description="'minilm' (offline default) or 'open_clip:<arch>'.")
    pretrained: str | None = None
    column: str = Field("caption", description="Feature-shard column holding the text.")
    batch_size: int = Field(256, gt=0)
    overwrite: bool = False


class ExportConfig(_Config):
    """``zsl export``: a feature directory -> clip-retrieval's embedding layout (read by autofaiss)."""

    features: Uri
    output: Uri
    format: Literal["clip-retrieval"] = "clip-retrieval"
    model: Uri | None = Field(None, description=(
        "Export the model's search vectors (the space `zsl index` holds) instead of the raw features."))
    dtype: Literal["float16", "float32"] = Field("float16", description="clip-retrieval writes float16.")
    normalize: bool = Field(True, description="L2-normalise the raw features (model vectors always are).")
    overwrite: bool = False


class ImportConfig(_Config):
    """``zsl import``: clip-retrieval's ``img_emb/`` + ``metadata/`` (+ ``text_emb/``) -> a feature directory."""

    input: Uri = Field(description="Folder with img_emb/ and metadata/ (as clip-retrieval inference writes).")
    output: Uri
    model_id: str = Field(description=(
        "The image encoder that made the embeddings (e.g. 'open_clip:ViT-B-32@laion2b_s34b_b79k'); models "
        "trained on these features must match it."))
    text_model: str | None = Field(None, description="The text model of text_emb/, when present (e.g. the CLIP text tower).")
    overwrite: bool = False


class CorpusConfig(_Config):
    """``zsl corpus openclipart``: a captioned image corpus from the installed Open Clip Art packages."""

    source: Literal["openclipart"] = "openclipart"
    output: Uri
    root: str = Field("/usr/share/openclipart", description="Where openclipart-png/-svg are installed.")
    limit: int | None = Field(None, gt=0, description="A seeded sample of this many drawings (default: all).")
    seed: int = 0
    overwrite: bool = False


class BridgeConfig(_Config):
    """``zsl bridge``: (image, caption) pairs of a feature directory -> a bridge model into the text space."""

    features: Uri = Field(description="`zsl extract` output with caption embeddings (`zsl embed-text`).")
    output: Uri
    method: Literal["ridge", "contrastive", "asif"] = "ridge"
    params: dict[str, Any] = Field(default_factory=dict, description="Method hyper-parameters (ridge: λ is tuned).")
    exclude: tuple[Uri, ...] = Field((), description=(
        "Feature directories whose images must not be in the corpus (evaluation sets): corpus rows whose "
        "features match one of theirs (cosine >= 0.999) are dropped and counted."))
    templates: tuple[str, ...] = Field(("{name}",), description="Prompts for free-text queries of an index built with it.")
    max_pairs: int | None = Field(None, gt=0, description="A seeded sample of at most this many pairs.")
    seed: int = 0
    overwrite: bool = False


class DemoDataConfig(_Config):
    output: Uri
    per_class: int = Field(100, gt=0, description="Images per class in each of train/test.")
    seed: int = 0


RunConfig = make_run_config({"extract": ExtractConfig, "classes": ClassesConfig, "train": TrainConfig,
                              "captions": EmbedTextConfig, "label": LabelConfig, "index": IndexConfig})

CONFIGS: dict[str, type[_Config]] = {
    "extract": ExtractConfig,
    "classes": ClassesConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "label": LabelConfig,
    "index": IndexConfig,
    "search": SearchConfig,
    "serve": ServeConfig,
    "add-classes": AddClassesConfig,
    "report": ReportConfig,
    "demo-data": DemoDataConfig,
    "embed-text": EmbedTextConfig,
    "run": RunConfig,
    "export": ExportConfig,
    "import": ImportConfig,
    "corpus": CorpusConfig,
    "bridge": BridgeConfig,
}


#: One layer of configuration: where it comes from (a file name, ``--set``, the command line) and its keys.
Layer = tuple[str, Mapping[str, Any] | None]


def build_config(job: str, *layers: Layer | Mapping[str, Any] | None) -> _Config:
    """Merge config layers (later wins; ``None`` values are skipped) and validate them.

    A layer is ``(source, mapping)`` (a bare mapping is ``("arguments", mapping)``). Raises
    :class:`ConfigError` with one line naming each bad key and the source it came from.

    >>> build_config("search", ("conf/search.yaml", {"k": 3}), ("command line", {"index": "/i", "text": "x"})).k
    3
    >>> build_config("search", ("my.yaml", {"kk": 3}), {"index": "/i", "text": "x"})
    Traceback (most recent call last):
    ...
    pipeline.core.config_base.ConfigError: search config: unknown key 'kk' in my.yaml (known: caption_weight, index, k, labels, mode, text)
    """
    if job not in CONFIGS:
        raise ConfigError(f"no config for job {job!r} (known: {', '.join(sorted(CONFIGS))})")
    cls = CONFIGS[job]
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer in layers:
        source, values = layer if isinstance(layer, tuple) else ("arguments", layer)
        for key, value in (values or {}).items():
            if value is not None:
                k = str(key).replace("-", "_")
                merged[k], origin[k] = value, source
    try:
        return cls(**merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            src = origin.get(str(err["loc"][0])) if err["loc"] else None
            where = f" in {src}" if src else ""
            if err["type"] == "extra_forbidden" and job == "run" and len(err["loc"]) == 2 and \
                    str(err["loc"][1]) in SECTION_DERIVED.get(str(err["loc"][0]), ()):
                problems.append(f"'{loc}'{where} is set by the pipeline (from root and the other stages): leave it out")
            elif err["type"] == "extra_forbidden":
                holder = nested_model(cls, err["loc"]) or cls
                known = ", ".join(sorted(holder.model_fields))
                problems.append(f"unknown key '{loc}'{where} (known: {known})")
            elif err["type"] == "missing":
                problems.append(f"missing required '{loc}' (give --{loc.replace('_', '-')} or set it in a config file)")
            else:
                problems.append(f"'{loc}'{where}: {err['msg']}")
        raise ConfigError(f"{job} config: " + "; ".join(problems)) from None
