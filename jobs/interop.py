"""``zsl embed-text``, ``export``, ``import``, ``corpus``, ``bridge``: captions, clip-retrieval's layout,
captioned corpora and bridges into a text model's space."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import ConfigOpt, OverwriteOpt, SetOpt, run_job


def embed_text(
    features: Optional[str] = typer.Option(None, help="`zsl extract` output whose rows carry captions."),
    text_model: Optional[str] = typer.Option(None, help="'minilm' (default) or 'open_clip:<arch>'."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip checkpoint path or pretrained tag."),
    column: Optional[str] = typer.Option(None, help="Feature-shard column holding the text (default caption)."),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Embed the captions of a feature directory (FEATURES/text/), so indexes can search them."""
    def body(cfg):
        from pipeline.stages.embed_text import run_embed_text

        m = run_embed_text(cfg)
        typer.echo(f"embedded {m.n_captions} captions of {m.n_rows} rows with {m.text_model} ({m.dim}-d) "
                   f"-> {cfg.features}/text")
    run_job("embed-text", dict(features=features, text_model=text_model, pretrained=pretrained, column=column,
                               overwrite=overwrite), config, set, body)


def export(
    features: Optional[str] = typer.Option(None, help="`zsl extract` (or `zsl import`) output."),
    output: Optional[str] = typer.Option(None, help="Output folder (img_emb/, metadata/, text_emb/)."),
    format: Optional[str] = typer.Option(None, "--format", help="clip-retrieval (the only layout so far)."),
    model: Optional[str] = typer.Option(None, help="Export this model's search vectors instead of the raw features."),
    dtype: Optional[str] = typer.Option(None, help="float16 (default, as clip-retrieval) or float32."),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Write features in clip-retrieval's layout (img_emb/*.npy + metadata/*.parquet), read by autofaiss."""
    def body(cfg):
        from pipeline.stages.interop import run_export

        m = run_export(cfg)
        typer.echo(f"exported {m.n_rows} {m.dim}-d {m.space} vectors ({m.dtype}) in {len(m.shards)} parts "
                   f"-> {cfg.output}")
    run_job("export", dict(features=features, output=output, format=format, model=model, dtype=dtype,
                           overwrite=overwrite), config, set, body)


def import_cmd(
    input: Optional[str] = typer.Option(None, help="Folder with img_emb/ + metadata/ (+ text_emb/)."),
    output: Optional[str] = typer.Option(None, help="Feature directory to write."),
    model_id: Optional[str] = typer.Option(None, help="The image encoder that made the embeddings."),
    text_model: Optional[str] = typer.Option(None, help="The text model of text_emb/, when present."),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Make a feature directory from embeddings computed elsewhere (clip-retrieval's layout)."""
    def body(cfg):
        from pipeline.stages.interop import run_import

        m = run_import(cfg)
        typer.echo(f"imported {m.n_images} {m.dim}-d embeddings of {m.model_id} in {m.n_shards} shards "
                   f"-> {cfg.output}")
    run_job("import", dict(input=input, output=output, model_id=model_id, text_model=text_model,
                           overwrite=overwrite), config, set, body)


def corpus(
    source: str = typer.Argument("openclipart", help="openclipart (Debian openclipart-png + -svg)."),
    output: Optional[str] = typer.Option(None, help="Folder for the corpus's Parquet shards."),
    limit: Optional[int] = typer.Option(None, help="A seeded sample of this many images (default: all)."),
    root: Optional[str] = typer.Option(None, help="Where the packages are installed (/usr/share/openclipart)."),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Write a captioned image corpus from installed packages (for `zsl extract` + `zsl bridge`)."""
    def body(cfg):
        from pipeline.inputs.corpus import write_openclipart_corpus

        m = write_openclipart_corpus(cfg.output, root=cfg.root, limit=cfg.limit, seed=cfg.seed, overwrite=cfg.overwrite)
        typer.echo(f"{m['source']} corpus: {m['n_images']} images, {m['n_captions']} with captions, "
                   f"{m['n_shards']} shards -> {cfg.output}")
    run_job("corpus", dict(source=source, output=output, limit=limit, root=root, overwrite=overwrite), config, set,
            body)


def bridge(
    features: Optional[str] = typer.Option(None, help="Features of captioned images (after `zsl embed-text`)."),
    output: Optional[str] = typer.Option(None, help="Model directory to write."),
    method: Optional[str] = typer.Option(None, help="ridge (default, λ tuned) | contrastive | asif."),
    exclude: Optional[list[str]] = typer.Option(None, help="Feature dirs whose images must not be used (eval sets)."),
    max_pairs: Optional[int] = typer.Option(None, help="A seeded sample of at most this many pairs."),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Fit a bridge from image features into the text model's space on (image, caption) pairs."""
    def body(cfg):
        from pipeline.stages.bridge import run_bridge

        m = run_bridge(cfg)
        extra = f", λ={m.tuning['lam']}" if m.tuning else ""
        typer.echo(f"{m.method} bridge on {m.n_train} pairs ({m.config.get('overlap_dropped', 0)} dropped as in "
                   f"--exclude){extra} -> {cfg.output}")
    run_job("bridge", dict(features=features, output=output, method=method, exclude=exclude or None,
                           max_pairs=max_pairs, overwrite=overwrite), config, set, body)
