"""`sortedchat info`: what a model is and where it lives."""

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
    check_before_loading(model, load)
    sm = o.load_model(model, load.load_options())
    thresholds = sm.thresholds()
    table = Table(show_header=False, box=None)
    rows = [
        ("model", sm.source),
        ("class", type(sm.model).__name__),
        ("layers", str(sm.num_layers)),
        ("exits", ", ".join(map(str, sm.exits))),
        ("thresholds", ", ".join(f"{e}:{thresholds[e]:.2f}" for e in sm.exits[:-1])
         + ("" if sm.config.thresholds else " (defaults: not calibrated)")),
        ("exit heads", "per-exit (ICT)" if sm.exit_heads is not None else
         f"per-exit lenses at {', '.join(map(str, sm.exit_lenses.exits))}, then the shared norm + LM head"
         if sm.exit_lenses is not None else "shared norm + LM head"),
        ("parameters", f"{sm.parameter_count() / 1e6:.1f}M"),
        ("dtype", str(sm.dtype).replace("torch.", "")),
        ("device", str(sm.device)),
        ("weights", sm.weights_path),
    ]
    if sm.config.training:
        t = sm.config.training
        rows.append(("training", ", ".join(f"{k}={t[k]}" for k in ("method", "steps", "seed") if k in t)))
    for k, v in rows:
        table.add_row(f"[bold]{k}[/bold]", v)
    Console().print(table)
