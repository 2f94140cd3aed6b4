"""`enginehouse tensorrt export MODEL -o DIR`: the ONNX export, for any ONNX tool to run."""

from __future__ import annotations

import click

from enginehouse.plugin_api import EnginehouseError


@click.group()
def tensorrt() -> None:
    """The compiled backends' tools (tensorrt, onnxruntime)."""


@tensorrt.command()
@click.argument("model")
@click.option("-o", "--output", "output", required=True, help="folder to write model.onnx to")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="the precision the graph is exported (and will run) in",
)
@click.option("--revision", default=None, help="hub revision (branch, tag or commit)")
def export(model: str, output: str, dtype: str, revision: str | None) -> None:
    """Export MODEL's native implementation to ONNX, KV cache as inputs and outputs."""
    from enginehouse.plugin_api import get_plugins, read_spec

    from .export import export_onnx

    try:
        spec = read_spec(model, revision, None, get_plugins())
        path = export_onnx(spec, output, dtype, progress=True)
    except EnginehouseError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path} (and graph.json); inputs: input_ids, attention_mask, position_ids,")
    click.echo("past_key_values.{i}.key/value; outputs: logits, present.{i}.key/value")
