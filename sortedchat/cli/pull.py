"""`sortedchat pull`: prepare the default model, or download a hub model (the only network access)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    app.command()(pull)


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
