"""Formats and typed manifests. Every output directory ends with a ``manifest.json`` written last; its
model here is the only definition of its keys. Manifests are validated on read (a missing or mistyped
key is a ``ValueError`` naming the file and the key) and on write (a writer cannot invent a key).
``run.json`` is the resume protocol's record (:mod:`pipeline.core.resume`); the Parquet tables are
:mod:`pipeline.core.schema`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core import fs as zio

FEATURES_FORMAT = "zsl-features/1"
CLASSES_FORMAT = "zsl-classes/1"
MODEL_FORMAT = "zsl-model/1"
LABELS_FORMAT = "zsl-labels/1"
INDEX_FORMAT = "zsl-index/1"
CAPTIONS_FORMAT = "zsl-captions/1"
EXPORT_FORMAT = "zsl-export/1"
CORPUS_FORMAT = "zsl-corpus/1"


class Manifest(BaseModel):
    """Base of every manifest: strict keys, JSON-able values, a ``format`` tag checked on read."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    FORMAT: ClassVar[str] = ""
    #: The command that writes it (for "is this a finished `zsl extract` output?").
    WRITER: ClassVar[str] = ""
    format: str = ""

    @model_validator(mode="after")
    def _format(self) -> "Manifest":
        if not self.format:
            self.format = self.FORMAT
        elif self.format != self.FORMAT:
            raise ValueError(f"format {self.format!r}, expected {self.FORMAT!r} (a `{self.WRITER}` output)")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def version(self) -> str:
        """A short name of exactly this content (12 hex digits of the sha256 of its JSON): a rerun
        that changes anything gives a new one, reading the same file again the same one."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]


class FeaturesManifest(Manifest):
    """``zsl extract`` output (or features written by :func:`pipeline.core.features.write_features`)."""

    FORMAT: ClassVar[str] = FEATURES_FORMAT
    WRITER: ClassVar[str] = "zsl extract"
    model_id: str
    dim: int = Field(gt=0)
    image_size: int | None = None
    n_shards: int = Field(ge=0)
    n_shards_in_input: int | None = None
    n_images: int = Field(ge=0)
    n_errors: int = Field(0, ge=0)
    #: items of recorded shards no longer in the input, or of another size (kept, not re-extracted;
    #: listed in ``input_changes.parquet``)
    n_vanished: int = Field(0, ge=0)
    n_changed: int = Field(0, ge=0)
    config: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] | None = None
    seconds_last_run: float | None = None
    #: seconds of the last run's stages, summed over workers: read, decode, encode (in the workers)
    #: and write (the driver's shard writer)
    stage_seconds: dict[str, float] | None = None
    #: Free-form provenance of features computed elsewhere (simulations, imports).
    notes: dict[str, Any] = Field(default_factory=dict)


class ClassesManifest(Manifest):
    """``zsl classes`` output (also embedded in ``classes.parquet``'s schema metadata)."""

    FORMAT: ClassVar[str] = CLASSES_FORMAT
    WRITER: ClassVar[str] = "zsl classes"
    n_classes: int = Field(ge=0)
    fingerprint: str
    source: str | None = None
    text_model: str
    text_model_name: str | None = None
    pretrained: str | None = None
    templates: list[str] = Field(default_factory=lambda: ["{name}"])
    text_dim: int | None = None
    attribute_names: list[str] = Field(default_factory=list)
    attribute_normalization: str = "l2"
    attribute_stats: dict[str, list[float]] | None = None
    missing_attributes: str = "error"
    missing_value: float | None = -1.0
    word_vectors: str | None = None
    word_vectors_oov: dict[str, Any] | None = None
    #: ``zsl add-classes`` history: ``[{"source": uri, "names": [...]}, ...]``.
    added: list[dict[str, Any]] = Field(default_factory=list)


class ModelManifest(Manifest):
    """``zsl train`` output: what the model is, what it was trained on, how it was calibrated."""

    FORMAT: ClassVar[str] = MODEL_FORMAT
    WRITER: ClassVar[str] = "zsl train"
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    feature_model: str
    feature_dim: int = Field(gt=0)
    semantics: str
    semantic_weights: dict[str, float] = Field(default_factory=dict)
    semantic_dim: int = Field(gt=0)
    #: dimension of the search space (``search_images``/``search_queries``) when it is not the
    #: semantic space (ASIF: one dimension per anchor)
    search_dim: int | None = Field(None, gt=0)
    text_model: str | None = None
    text_model_name: str | None = None
    text_pretrained: str | None = None
    templates: list[str] | None = None
    attribute_names: list[str] | None = None
    seen: list[str]
    gamma: float = 0.0
    calibration: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None
    train_features: str | None = None
    train_features_fingerprint: str | None = None
    n_train: int | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    seconds: float | None = None

    @property
    def uses_text(self) -> bool:
        return "text" in self.semantics.split("+")


class LabelsManifest(Manifest):
    """``zsl label`` output: one label shard per feature shard, all present."""

    FORMAT: ClassVar[str] = LABELS_FORMAT
    WRITER: ClassVar[str] = "zsl label"
    identity: dict[str, Any]
    model_dir: str
    features_dir: str
    classes_dir: str
    classes: list[str]
    gamma: float
    n_shards: int = Field(ge=0)
    n_images: int = Field(ge=0)
    n_labeled_this_run: int = Field(ge=0)
    config: dict[str, Any] = Field(default_factory=dict)
    seconds_last_run: float | None = None
    #: feature shards that could not be labelled (name -> why); their label shards are missing, so the
    #: next run retries them
    failed_shards: dict[str, str] = Field(default_factory=dict)
    #: the label diff of the last relabel under another model or class set (``diffs/NNNN``, relative
    #: to the output): ``summary.json`` and one Parquet shard per label shard (the rows whose top-1 moved)
    last_diff: str | None = None


class IndexTuning(BaseModel):
    """How an index's search parameters were chosen and what they give (``zsl index`` tuning).

    Measured on ``n_queries`` vectors sampled (seeded) from the index and moved by their
    nearest-neighbour distance (so they act as new queries), against exact brute-force neighbours
    over every indexed vector (:mod:`pipeline.index.tune`).
    """

    model_config = ConfigDict(extra="forbid")
    params: str
    target_recall: float
    k: int
    max_query_ms: float | None = None
    met_target: bool
    n_queries: int
    recall_at_1: float
    recall_at_10: float
    recall_at_100: float | None = None
    latency_ms_mean: float
    latency_ms_p99: float
    batch_ms_per_query: float
    tried: list[dict[str, Any]] = Field(default_factory=list)
    seconds: float


class IndexManifest(Manifest):
    """``zsl index`` output: ``index.faiss`` + ``ids.parquet``, checked by sha256 and size on load."""

    FORMAT: ClassVar[str] = INDEX_FORMAT
    WRITER: ClassVar[str] = "zsl index"
    ntotal: int = Field(ge=0)
    dim: int = Field(gt=0)
    factory: str
    metric: Literal["inner_product"] = "inner_product"
    index_bytes: int = Field(ge=0)
    sha256: str
    nprobe: int | None = None
    #: faiss ParameterSpace string applied on load (set by tuning, e.g. "efSearch=96").
    search_params: str | None = None
    #: extra files beside index.faiss and their sizes (index.ivfdata of an on-disk merged IVF).
    data_files: dict[str, int] = Field(default_factory=dict)
    tuning: IndexTuning | None = None
    #: how the last run made the index: "build" (from scratch), "add" (new shards appended),
    #: "partitions" (IVF partitions built apart and merged on disk), "retune" (search parameters only).
    build: Literal["build", "add", "partitions", "retune"] | None = None
    added_last_run: int | None = None
    train_rows: int | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    # what the vectors are (set by the index stage; absent for indexes built by hand)
    identity: dict[str, Any] = Field(default_factory=dict)
    model_dir: str | None = None
    model_fingerprint: str | None = None
    feature_model: str | None = None
    #: the image encoder that made the features (``zsl extract --encoder/--pretrained``) and its
    #: input size, so image queries can be encoded like the indexed images
    image_encoder: str | None = None
    image_pretrained: str | None = None
    image_size: int | None = None
    text_model: str | None = None
    text_model_name: str | None = None
    text_pretrained: str | None = None
    templates: list[str] | None = None
    features_dir: str | None = None
    shards: list[str] = Field(default_factory=list)
    max_memory: str | None = None
    estimated_bytes: int | None = None
    shards_projected_last_run: int | None = None
    seconds: float | None = None
    #: what the last run did to the index (:class:`~pipeline.index.plan.IndexPlan`'s action, and
    #: "rebuild" when it replaced a finished index), and why, in one sentence (its plan's reason)
    last_action: Literal["build", "rebuild", "add", "retune", "nothing"] | None = None
    last_reason: str | None = None
    #: feature shards whose vectors went in during the last run (``added_last_run`` counts the vectors)
    shards_added_last_run: int | None = None
    #: feature shards left out because they could not be read (name -> why, without file contents);
    #: they are not in ``shards``, so the next run retries them (added when they can be read)
    failed_shards: dict[str, str] = Field(default_factory=dict)

    def last_run_summary(self) -> str:
        """One line for a run report: ``added 3 shard(s) (1,200 vectors; 8,000 in all)``, or
        ``rebuilt from 5 shard(s) (8,000 vectors): <why>``, and the shards left out."""
        n, k = f"{self.ntotal:,}", len(self.shards)
        what = {
            "build": f"built from {k} shard(s) ({n} vectors)",
            "rebuild": f"rebuilt from {k} shard(s) ({n} vectors): {self.last_reason}",
            "add": f"added {self.shards_added_last_run or 0} shard(s) ({self.added_last_run or 0:,} vectors; "
                   f"{n} in all)",
            "retune": f"re-tuned ({n} vectors): {self.last_reason}",
            "nothing": f"up to date ({n} vectors from {k} shard(s))",
        }.get(self.last_action or "", f"{self.build or 'index'} ({n} vectors from {k} shard(s))")
        if self.failed_shards:
            what += f"; {len(self.failed_shards)} unreadable shard(s) left out: {', '.join(sorted(self.failed_shards))}"
        return what


class CaptionsManifest(Manifest):
    """``zsl embed-text`` (or ``zsl import``) output: ``FEATURES/text/``, one shard per feature shard."""

    FORMAT: ClassVar[str] = CAPTIONS_FORMAT
    WRITER: ClassVar[str] = "zsl embed-text"
    text_model: str
    text_model_name: str | None = None
    text_pretrained: str | None = None
    dim: int = Field(gt=0)
    column: str = "caption"
    n_shards: int = Field(ge=0)
    n_rows: int = Field(ge=0)
    n_captions: int = Field(ge=0)
    seconds_last_run: float | None = None


class ExportManifest(Manifest):
    """``zsl export`` output: clip-retrieval's ``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet``
    (+ ``text_emb/text_emb_N.npy``), part ``N`` from feature shard ``shards[N]``, rows in the same order."""

    FORMAT: ClassVar[str] = EXPORT_FORMAT
    WRITER: ClassVar[str] = "zsl export"
    layout: Literal["clip-retrieval"] = "clip-retrieval"
    features_dir: str
    #: what the image vectors are: the extracted features, or a model's search space (``--model``)
    space: Literal["features", "model"]
    model_dir: str | None = None
    dim: int = Field(gt=0)
    dtype: Literal["float16", "float32"]
    normalized: bool
    text_dim: int | None = None
    shards: list[str] = Field(default_factory=list)
    n_rows: int = Field(ge=0)


class CorpusManifest(Manifest):
    """``zsl corpus`` output: ``shards/corpus-NNNNN.parquet`` (key, image bytes, caption, url, category)."""

    FORMAT: ClassVar[str] = CORPUS_FORMAT
    WRITER: ClassVar[str] = "zsl corpus"
    source: str
    root: str
    n_images: int = Field(ge=0)
    n_captions: int = Field(ge=0)
    n_shards: int = Field(ge=0)
    limit: int | None = None
    seed: int = 0
    license: str


class RunRecord(BaseModel):
    """``run.json``: what an output directory is being made from (the resume protocol's identity)."""

    model_config = ConfigDict(extra="forbid")
    job: str
    identity: dict[str, Any]
    #: Job-specific progress facts checked on resume (extract: the input shard plan).
    state: dict[str, Any] = Field(default_factory=dict)


M = TypeVar("M", bound=Manifest)


def _problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "missing":
            out.append(f"missing key '{loc}'")
        elif err["type"] == "extra_forbidden":
            out.append(f"unknown key '{loc}'")
        else:
            out.append(f"'{loc}': {err['msg']}")
    return "; ".join(out)


def parse_manifest(data: Any, cls: type[M], where: str) -> M:
    """Validate a manifest's JSON object as ``cls``; ``ValueError`` naming ``where`` and the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") not in (None, cls.FORMAT):
        raise ValueError(f"{where}: format {data.get('format')!r}, expected {cls.FORMAT!r}; "
                         f"is this a `{cls.WRITER}` output?")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{where}: {_problems(exc)}") from None


def read_manifest(out_dir: str, cls: type[M]) -> M:
    """``out_dir/manifest.json`` as ``cls``: ``FileNotFoundError`` if absent (the job never finished),
    ``ValueError`` naming the file and key if it is not a valid ``cls``."""
    uri = zio.join(out_dir, "manifest.json")
    if not zio.exists(uri):
        raise FileNotFoundError(f"{out_dir}: no manifest.json; is this a finished `{cls.WRITER}` output?")
    return parse_manifest(zio.read_json(uri), cls, uri)


def write_manifest(out_dir: str, manifest: Manifest) -> None:
    """Write ``out_dir/manifest.json`` atomically (callers write it last)."""
    zio.write_json_atomic(zio.join(out_dir, "manifest.json"), manifest.to_json())
