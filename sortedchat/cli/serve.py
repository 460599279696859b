"""`sortedchat serve`: the OpenAI chat API on a local port, each request choosing its own depth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sortedchat.cli import options as o
from sortedchat.cli.option_groups import takes_groups
from sortedchat.cli.prechecks import check_before_loading


def register(app: typer.Typer) -> None:
    app.command()(serve)


@takes_groups
def serve(
    *,
    model: o.ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but this machine's own "
                                      "(127.0.0.1, ::1) lets other machines in")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="SORTEDCHAT_API_KEY", help="Require "
                                                   "'Authorization: Bearer KEY' on /v1 requests")] = None,
    slots: Annotated[int, typer.Option("--slots", help="Answers generated at once (in turn, token by token)")] = 4,
    queue: Annotated[int, typer.Option("--queue", help="Requests that may wait for a slot; beyond them the server "
                                       "answers 503")] = 16,
    batch: Annotated[bool, typer.Option("--batch/--no-batch", help="Run the steps of concurrent answers (any "
                                        "mode) together: the layers they share read their weights once")] = True,
    mode: o.ModeFlags,
    sampling: o.SamplingFlags,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Answer length of a request that "
                                                "gives no max_tokens")] = 512,
    load: o.LoadFlags,
) -> None:
    """Serve the OpenAI chat API: GET /v1/models, POST /v1/chat/completions (streamed or not), GET /health.

    A request picks its depth with top-level body fields (the openai client's extra_body): mode (full, depth,
    auto, speculative), depth, threshold, draft_len, kv; fields it leaves out take this command's options and the
    checkpoint's calibration. Each token reports its exit_layer; usage adds mean_exit and layer_compute_saved."""
    from sortedchat.server.running import LOCAL_HOSTS, bind
    from sortedchat.server.scheduler import check_capacity

    check_before_loading(model, load, mode)
    check_capacity(slots, queue)
    config = sampling.config(max_new_tokens)
    sock = bind(host, port)  # before loading: a port in use fails at once
    console = Console(stderr=True, highlight=False)
    if host not in LOCAL_HOSTS and api_key is None:
        console.print(f"[yellow]warning: listening on {host} without --api-key: anyone who can reach this "
                      "machine can use the model[/yellow]")
    sm = o.load_model(model, load.load_options(), console)
    app = build_app(sm, served_name(model), mode.mode(sm), config, api_key, slots, queue, batch)
    console.print(f"serving {served_name(model)} ({sm.num_layers} layers, exits {', '.join(map(str, sm.exits))}) "
                  f"at http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}/v1", soft_wrap=True)
    from sortedchat.server.running import serve as run

    run(app, sock)


def served_name(spec: str | None) -> str:
    """The model's id in the API: a local path by its name, anything else as given; the built-in one by its
    adapter's name."""
    if spec is None:
        from sortedchat.default_model import SHIPPED_ADAPTER

        return SHIPPED_ADAPTER.name
    path = Path(spec).expanduser()
    return path.name if path.exists() else spec


def build_app(sm, model_id, mode, sampling, api_key=None, slots=4, queue=16, batch=True):
    """The server's ASGI app over the loaded model (the engine thread starts with it)."""
    from sortedchat.server.app import create_app
    from sortedchat.server.requests import Defaults
    from sortedchat.server.scheduler import Scheduler

    return create_app(Scheduler(sm, slots, queue, batch), sm, Defaults(model_id, mode, sampling), api_key)
