"""`sortedchat info`: what a model is and where it lives.

It reads what it shows from the model's small files (config.json, sortedchat.json, the safetensors headers) in
well under a second; only a model that must be converted or downloaded first, or quantized, is loaded (`quantized`
says what `--quantize` made int8)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from sortedchat.cli import options as o
from sortedchat.cli.option_groups import takes_groups
from sortedchat.cli.prechecks import check_before_loading


def register(app: typer.Typer) -> None:
    app.command()(info)


@takes_groups
def info(*, model: o.ModelOpt = None, load: o.LoadFlags) -> None:
    """Layers, exits, thresholds, parameters, dtype, device and where the weights live."""
    from sortedchat.loading import read_model_facts

    check_before_loading(model, load)
    facts = read_model_facts(model, load.load_options())
    if facts is None:
        from sortedchat.quantize import describe, quantized_weights

        sm = o.load_model(model, load.load_options())
        lens_exits = sm.exit_lenses.exits if sm.exit_lenses is not None else None
        facts = (sm, type(sm.model).__name__, sm.exit_heads is not None, lens_exits,
                 sm.parameter_count() + quantized_weights(sm.model), describe(sm))
    else:
        facts = (facts, facts.class_name, facts.exit_heads, facts.lens_exits, facts.parameters, "none")
    Console().print(_table(*facts))


def _table(sm, class_name: str, exit_heads: bool, lens_exits: list[int] | None, parameters: int,
           quantization: str) -> Table:
    """The rows, from a loaded model or the facts read without loading it (the same fields)."""
    import torch  # already imported by `loading`

    thresholds = sm.thresholds()
    table = Table(show_header=False, box=None)
    rows = [
        ("model", sm.source),
        ("class", class_name),
        ("layers", str(sm.num_layers)),
        ("exits", ", ".join(map(str, sm.exits))),
        ("thresholds", ", ".join(f"{e}:{thresholds[e]:.2f}" for e in sm.exits[:-1])
         + ("" if sm.config.thresholds else " (defaults: not calibrated)")),
        ("exit heads", "per-exit (ICT)" if exit_heads else
         f"per-exit lenses at {', '.join(map(str, lens_exits))}, then the shared norm + LM head"
         if lens_exits is not None else "shared norm + LM head"),
        ("parameters", f"{parameters / 1e6:.1f}M"),
        ("dtype", str(sm.dtype).replace("torch.", "")),
        ("quantized", quantization),
        ("device", str(sm.device)),
        ("threads", f"{torch.get_num_threads()} (torch, on {o.usable_cpus()} CPUs; --threads sets it)"),
        ("weights", sm.weights_path),
    ]
    if sm.config.training:
        t = sm.config.training
        rows.append(("training", ", ".join(f"{k}={t[k]}" for k in ("method", "steps", "seed") if k in t)))
    for k, v in rows:
        table.add_row(f"[bold]{k}[/bold]", v)
    return table
