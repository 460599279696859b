"""`sortedchat chat` (and bare `sortedchat`): the full-screen chat app; `--plain` gives the line-based chat.

The same function is the `chat` command and the app's callback, so bare `sortedchat` takes exactly the
options of `sortedchat chat`. Values from the config file apply unless the command line gives them.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from sortedchat.cli import options as o


def register(app: typer.Typer) -> None:
    app.command()(chat)
    app.callback(invoke_without_command=True)(chat)


def chat(
    ctx: typer.Context,
    model: o.ModelOpt = None,
    plain: Annotated[bool, typer.Option("--plain", help="Line-based chat instead of the full-screen app")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt")] = None,
    depth: o.DepthOpt = None,
    auto: o.AutoOpt = False,
    threshold: o.ThresholdOpt = None,
    speculative: o.SpecOpt = None,
    draft_len: o.DraftLenOpt = 4,
    draft_stop: o.DraftStopOpt = 0.0,
    always_draft: o.AlwaysDraftOpt = False,
    kv: o.KvOpt = "exact",
    temperature: o.TemperatureOpt = 0.0,
    top_p: o.TopPOpt = 1.0,
    top_k: o.TopKOpt = 0,
    seed: o.SeedOpt = None,
    max_new_tokens: o.MaxTokensOpt = 512,
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "auto",
    load_in_4bit: o.Load4Opt = False,
    load_in_8bit: o.Load8Opt = False,
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
    exits: o.ExitsOpt = None,
) -> None:
    """Chat with the model in the full-screen app (Textual); F1 there lists the keys."""
    if ctx.invoked_subcommand is not None:  # `sortedchat <command>`: the command runs on its own
        return
    from sortedchat.tui.settings import load_settings

    settings = load_settings()

    def given(name: str) -> bool:
        # By name: typer vendors its own copy of click, whose enum is not click's.
        source = ctx.get_parameter_source(name)
        return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")

    # The command line wins over the config file, the config file over the defaults.
    for name, value in [("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("max_new_tokens", max_new_tokens), ("device", device), ("dtype", dtype)]:
        if given(name):
            setattr(settings, name, value)
    if system is not None:
        settings.system_prompt = system
    spec = model if model is not None else (settings.model or None)
    o.unicode_text(settings.system_prompt, "--system")
    o.check_before_loading(spec, exits, depth=depth, auto=auto, threshold=threshold, speculative=speculative,
                           draft_stop=draft_stop, always_draft=always_draft, kv=kv)

    def options():  # imports torch: the app calls it behind its loading screen, which shows at once
        return o.load_options(settings.device, settings.dtype, load_in_4bit, load_in_8bit, trust_remote_code,
                              allow_pickle, exits)

    def initial_mode(sm):
        return o.make_mode(sm, depth, auto, threshold, speculative, draft_len, draft_stop, always_draft, kv)

    if plain:
        from sortedchat.cli.ask import plain_chat

        sampling = settings.sampling()
        if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 gets a note, not the end of the chat
            sys.stdin.reconfigure(errors="surrogateescape")
        sm = o.load_model(spec, options())
        plain_chat(sm, initial_mode(sm), sampling, settings.system_prompt)
        return
    run_app(spec, options, initial_mode, settings)


def run_app(spec, options, initial_mode, settings) -> None:
    from sortedchat import SortedChatError
    from sortedchat.tui.app import SortedChatApp

    def loader(progress):
        from sortedchat.loading import load_sorted_model

        return load_sorted_model(spec, options(), progress=progress)

    from sortedchat.tui.settings import check_value

    for name in ("temperature", "top_p", "top_k", "max_new_tokens", "seed"):  # before the model loads
        value = getattr(settings, name)
        if value is not None:
            try:
                check_value(name, value)
            except ValueError as exc:
                raise SortedChatError(f"--{name.replace('_', '-')} {exc}, got {value}") from None
    app = SortedChatApp(
        loader=loader,
        initial_mode=initial_mode,
        settings=settings,
        loading_label=spec or "the default model (SmolLM2-135M-Instruct)",
    )
    app.run()
    if app.error:
        raise SortedChatError(app.error)
