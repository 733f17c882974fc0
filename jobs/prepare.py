"""``zsl extract``, ``zsl classes``, ``zsl demo-data``: the inputs every later command reads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jobs.common import ConfigOpt, OverwriteOpt, SetOpt, run_job


def extract(
    input: Optional[list[str]] = typer.Option(None, help=(
        "Image folder, img2dataset output (files / webdataset / parquet), .tar shards or Parquet with image "
        "bytes; any fsspec URI; brace patterns like shards/{00000..00099}.tar. Repeat for several inputs.")),
    output: Optional[str] = typer.Option(None, help="Output directory for feature shards."),
    encoder: Optional[str] = typer.Option(None, help="'effnet-lite0' (default) or 'open_clip:<arch>'."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip checkpoint path or pretrained tag."),
    input_format: Optional[str] = typer.Option(None, help="auto (says which it chose) | folder | files | webdataset | parquet"),
    label_field: Optional[str] = typer.Option(None, help="json sidecar key (files, webdataset) or Parquet column of the label."),
    shard_size: Optional[int] = typer.Option(None, help="Images per shard (folder input)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per encoder batch."),
    num_actors: Optional[int] = typer.Option(None, help="Encoder actors (default: one per GPU, else CPUs-1)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local cluster)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N shards."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    image_backend: Optional[str] = typer.Option(None, help=(
        "auto (ONNX Runtime on CPUs, PyTorch on GPUs) | torch | onnx: how the encoder runs; same features.")),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Extract image features with Ray (decode on CPU tasks, encode in an actor pool), shard by shard."""
    def body(cfg):
        from pipeline.stages.extract import run_extract

        m = run_extract(cfg)
        typer.echo(f"extracted {m.n_images} images ({m.n_errors} errors) in {m.n_shards} shards "
                   f"with {m.model_id} ({m.dim}-d) -> {cfg.output}"
                   + (f"; {m.n_vanished} input item(s) vanished, {m.n_changed} changed since extracted "
                      "(kept; see input_changes.parquet)" if m.n_vanished or m.n_changed else ""))
    inputs = (input[0] if len(input) == 1 else list(input)) if input else None
    run_job("extract", dict(input=inputs, output=output, encoder=encoder, pretrained=pretrained,
                            input_format=input_format, label_field=label_field, shard_size=shard_size,
                            batch_size=batch_size, num_actors=num_actors, address=address, limit=limit,
                            device=device, image_backend=image_backend, overwrite=overwrite), config, set, body)


def classes(
    input: Optional[str] = typer.Option(None, help="Class table: CSV / YAML / Parquet with name[, description][, attributes]."),
    output: Optional[str] = typer.Option(None, help="Output directory for the embedded class set."),
    text_model: Optional[str] = typer.Option(None, help="'minilm' (default) or 'open_clip:<arch>'."),
    pretrained: Optional[str] = typer.Option(None, help="open_clip checkpoint path or tag."),
    attribute_normalization: Optional[str] = typer.Option(None, help="l2 | zscore | none"),
    missing_attributes: Optional[str] = typer.Option(None, help="error | column_mean | zero"),
    overwrite: Optional[bool] = OverwriteOpt,
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Embed classes from names, descriptions (prompt templates) and attribute tables."""
    def body(cfg):
        from pipeline.stages.classes import run_classes

        m = run_classes(cfg)
        typer.echo(f"embedded {m.n_classes} classes ({m.text_model}, {len(m.attribute_names)} attributes)"
                   f" -> {cfg.output}")
    run_job("classes", dict(input=input, output=output, text_model=text_model, pretrained=pretrained,
                            attribute_normalization=attribute_normalization,
                            missing_attributes=missing_attributes, overwrite=overwrite), config, set, body)


def demo_data(
    output: Optional[str] = typer.Option(None, help="Folder to write the demo image folders and class table into."),
    per_class: Optional[int] = typer.Option(None, help="Images per class in each of train/test."),
    config: Optional[Path] = ConfigOpt, set: Optional[list[str]] = SetOpt,
) -> None:
    """Write the embedded demo data (animal-mnist silhouettes) as image folders."""
    def body(cfg):
        from pipeline.inputs.demo_data import write_demo_data

        info = write_demo_data(cfg.output, per_class=cfg.per_class, seed=cfg.seed)
        typer.echo(f"demo data: {info['n_train']} train / {info['n_test']} test images of {len(info['classes'])} "
                   f"classes -> {cfg.output}")
    run_job("demo-data", dict(output=output, per_class=per_class), config, set, body)
