"""`sortedchat info` (what a model is and where it lives) and `sortedchat pull` (fetch the default)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from sortedchat.cli import options as o


def register(app: typer.Typer) -> None:
    app.command()(info)
    app.command()(pull)


def info(
    model: o.ModelOpt = None,
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "auto",
    load_in_4bit: o.Load4Opt = False,
    load_in_8bit: o.Load8Opt = False,
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
    exits: o.ExitsOpt = None,
) -> None:
    """Layers, exits, thresholds, parameters, dtype, device and where the weights live."""
    o.check_before_loading(model, exits)
    opts = o.load_options(device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, allow_pickle, exits)
    sm = o.load_model(model, opts)
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


def pull(
    model: Annotated[Optional[str], typer.Argument(help="A hub id to download [default: the built-in model]")] = None,
) -> None:
    """Prepare the default model now, or download a hub model: the only command that uses the network."""
    console = Console(stderr=True)
    with console.status("preparing the model", spinner="dots") as status:
        if model is None:
            from sortedchat.default_model import default_model_dir

            path = default_model_dir(lambda stage, frac=None: status.update(stage))
        else:
            from sortedchat.loading import pull_hub_model

            status.update(f"downloading {model}")
            path = pull_hub_model(model)
    Console().print(f"model ready: {path}")
