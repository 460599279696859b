"""`sortedchat chat` (and bare `sortedchat`): the full-screen chat app, or with `--plain` the line-based chat.

The same function is the `chat` command and the app's callback, so bare `sortedchat` takes exactly the
options of `sortedchat chat`. Values from the config file apply unless the command line gives them.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from sortedchat import SortedChatError
from sortedchat.cli import options as o
from sortedchat.cli.debug import DebugOpt
from sortedchat.cli.option_groups import takes_groups
from sortedchat.cli.prechecks import check_before_loading
from sortedchat.cli.render import AnswerPrinter


def register(app: typer.Typer) -> None:
    app.command()(chat)
    app.callback(invoke_without_command=True)(chat)


@takes_groups
def chat(
    ctx: typer.Context,
    *,
    model: o.ModelOpt = None,
    plain: Annotated[bool, typer.Option("--plain", help="Line-based chat instead of the full-screen app")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt")] = None,
    mode: o.ModeFlags,
    sampling: o.SamplingFlags,
    max_new_tokens: o.MaxTokensOpt = 512,
    load: o.LoadFlags,
    debug: DebugOpt = False,  # acted on by its own callback (`cli.debug`), never passed here
) -> None:
    """Chat with the model in the full-screen app (Textual); F1 there lists the keys."""
    if ctx.invoked_subcommand is not None:  # `sortedchat <command>`: the command runs on its own
        return
    settings = _settings(ctx, dataclasses.asdict(sampling) | {"max_new_tokens": max_new_tokens,
                                                            "device": load.device, "dtype": load.dtype}, system)
    spec = model if model is not None else (settings.model or None)
    o.unicode_text(settings.system_prompt, "--system")
    start = check_before_loading(spec, load, mode)  # the mode, checked as far as the layer count is known

    def options():  # imports torch: the app calls it behind its loading screen, which shows at once
        return dataclasses.replace(load, device=settings.device, dtype=settings.dtype).load_options()

    if plain:
        if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 gets a note, not the end of the chat
            sys.stdin.reconfigure(errors="surrogateescape")
        sm = o.load_model(spec, options())
        plain_chat(sm, mode.mode(sm), settings.sampling(), settings.system_prompt)
        return
    run_app(spec, options, start, settings)


def _settings(ctx: typer.Context, values: dict, system: str | None):
    """The config file's settings, each of `values` that the command line gave on top (it wins over the file,
    the file over the defaults)."""
    from sortedchat.tui.settings import load_settings

    settings = load_settings()
    for name, value in values.items():
        source = ctx.get_parameter_source(name)  # by name: typer vendors its own click, whose enum is not click's
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            setattr(settings, name, value)
    if system is not None:
        settings.system_prompt = system
    return settings


def run_app(spec, options, mode, settings) -> None:
    from sortedchat.tui.app import SortedChatApp

    def loader(progress):
        return o.loaded(spec, options(), progress)

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
        mode=mode,
        settings=settings,
        loading_label=spec or "the default model (SmolLM2-135M-Instruct)",
    )
    app.run()
    if app.error:
        raise app.error


def plain_chat(sm, mode, sampling, system: str = "", console: Console | None = None, read=input,
               store=None) -> None:
    """A line-based multi-turn chat. Empty line or /quit ends it; /reset starts over.

    It drives the same `Dialogue` as the app's chat screen, so it saves every turn (token by token) to the
    chat history in `store` (default: the user's) the same way, and the app's saved-chats list reopens it; and
    it keeps the same context policy: the oldest turns drop out of what the model sees (said once per chat), and
    a line too long for the model's context is refused, unsaved, while the chat goes on.
    """
    from sortedchat.engine import ChatSession
    from sortedchat.tui.app import model_label
    from sortedchat.tui.dialogue import Dialogue
    from sortedchat.tui.storage import ChatStore

    console = console or Console(highlight=False)
    dialogue = Dialogue(ChatSession(sm, mode), store or ChatStore(), model_label(sm), "/reset starts a new chat")
    printer = AnswerPrinter(sm.num_layers, sm.exits[0], console=console)
    console.print(f"[dim]{sm.source} · {dialogue.control.label()} · saved to the chat history · /reset new chat · "
                  f"/quit or Ctrl+D ends[/dim]")
    if dialogue.store.notice:
        console.print(f"[yellow]{dialogue.store.notice}[/yellow]")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        if line.strip() in ("", "/quit", "/exit"):
            break
        if line.strip() == "/reset":
            dialogue.new_chat()
            continue
        try:
            o.unicode_text(line, "that line")
        except SortedChatError as exc:
            console.print(f"[red]{exc}; nothing was sent[/red]")
            continue
        try:
            notes = dialogue.send(line, system, sampling)
        except SortedChatError as exc:  # too long for the model's context: nothing was saved
            console.print(f"{exc}; nothing was sent", style="red", markup=False)
            continue
        for note in notes:  # turns the model no longer sees; the chat left the store and a new chat holds it
            console.print(note, style="yellow", markup=False)
        _stream_answer(dialogue, sampling, printer)


def _stream_answer(dialogue, sampling, printer) -> None:
    """Print one answer as the dialogue saves it; Ctrl+C stops it, keeping what came. An engine or store error
    ends the chat, as a one-line error (the tokens that came are saved)."""
    tokens = dialogue.stream(sampling, printer.prefill)
    try:
        for ev in tokens:
            printer.token(ev)
    except KeyboardInterrupt:
        printer.console.print("\n[dim](stopped)[/dim]")
    finally:
        tokens.close()  # the engine stops here, not whenever the abandoned stream is collected
    errors = dialogue.finish()
    if errors:
        raise SortedChatError("; ".join(errors))
    if dialogue.stats:  # none when Ctrl+C came before the first token
        printer.summary(dialogue.stats)
