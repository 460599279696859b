"""`sortedchat chat` (and bare `sortedchat`): the chat front end. `--plain` gives the line-based chat."""

from __future__ import annotations

from typing import Annotated

import typer

from sortedchat.cli import options as o


def register(app: typer.Typer) -> None:
    app.command()(chat)
    app.callback(invoke_without_command=True)(default)


def chat(
    model: o.ModelOpt = None,
    plain: Annotated[bool, typer.Option("--plain", help="Line-based chat instead of the full-screen app")] = False,
    system: Annotated[str, typer.Option("--system", help="System prompt")] = "",
    depth: o.DepthOpt = None,
    auto: o.AutoOpt = False,
    threshold: o.ThresholdOpt = None,
    speculative: o.SpecOpt = None,
    draft_len: o.DraftLenOpt = 4,
    temperature: o.TemperatureOpt = 0.0,
    top_p: o.TopPOpt = 1.0,
    top_k: o.TopKOpt = 0,
    seed: o.SeedOpt = None,
    max_new_tokens: o.MaxTokensOpt = 256,
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "auto",
    load_in_4bit: o.Load4Opt = False,
    load_in_8bit: o.Load8Opt = False,
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
    exits: o.ExitsOpt = None,
) -> None:
    """Chat with the model."""
    from sortedchat.cli.ask import plain_chat

    sampling = o.make_sampling(temperature, top_p, top_k, seed, max_new_tokens)
    opts = o.load_options(device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, allow_pickle, exits)
    sm = o.load_model(model, opts)
    plain_chat(sm, o.make_mode(sm, depth, auto, threshold, speculative, draft_len), sampling, system)


def default(ctx: typer.Context, model: o.ModelOpt = None) -> None:
    """With no command, open the chat."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(chat, model=model)
