"""`sortedchat ask`: one prompt, streamed, coloured by exit layer; and the line-based `chat --plain`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from sortedchat.cli import options as o
from sortedchat.cli.render import AnswerPrinter


def register(app: typer.Typer) -> None:
    app.command()(ask)


def ask(
    prompt: Annotated[str, typer.Argument(help="The question or instruction")],
    model: o.ModelOpt = None,
    system: Annotated[str, typer.Option("--system", help="System prompt")] = "",
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
    max_new_tokens: o.MaxTokensOpt = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON event per line")] = False,
    device: o.DeviceOpt = "auto",
    dtype: o.DtypeOpt = "auto",
    load_in_4bit: o.Load4Opt = False,
    load_in_8bit: o.Load8Opt = False,
    trust_remote_code: o.TrustOpt = False,
    allow_pickle: o.PickleOpt = False,
    exits: o.ExitsOpt = None,
) -> None:
    """Answer one prompt, streaming tokens coloured by the layer they exited at."""
    o.unicode_text(prompt, "the prompt")
    o.unicode_text(system, "--system")
    o.check_before_loading(model, exits, depth=depth, auto=auto, threshold=threshold, speculative=speculative,
                           draft_stop=draft_stop, always_draft=always_draft, kv=kv)
    from sortedchat.engine import ChatSession  # torch: after the checks that need none

    sampling = o.make_sampling(temperature, top_p, top_k, seed, max_new_tokens)
    opts = o.load_options(device, dtype, load_in_4bit, load_in_8bit, trust_remote_code, allow_pickle, exits)
    sm = o.load_model(model, opts)
    mode = o.make_mode(sm, depth, auto, threshold, speculative, draft_len, draft_stop, always_draft, kv)
    session = ChatSession(sm, mode)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    printer = AnswerPrinter(sm.num_layers, sm.exits[0], as_json)
    for ev in session.generate(messages, sampling):
        printer.token(ev)
    printer.summary(session.last_stats)


def plain_chat(sm, mode, sampling, system: str = "", console: Console | None = None, read=input,
               store=None) -> None:
    """A line-based multi-turn chat. Empty line or /quit ends it; /reset starts over.

    Like the app, it saves every turn (token by token) to the chat history in `store` (default: the
    user's), so the app's saved-chats list reopens it.
    """
    from sortedchat import SortedChatError
    from sortedchat.engine import ChatSession
    from sortedchat.tui.app import model_label
    from sortedchat.tui.storage import ChatStore

    console = console or Console(highlight=False)
    store = store or ChatStore()
    session = ChatSession(sm, mode)
    base = [{"role": "system", "content": system}] if system else []
    messages, chat_id = list(base), None
    label, name = mode.label(sm.num_layers), model_label(sm)
    printer = AnswerPrinter(sm.num_layers, sm.exits[0], console=console)
    console.print(f"[dim]{sm.source} · {label} · saved to the chat history · /reset new chat · "
                  f"/quit or Ctrl+D ends[/dim]")
    if store.notice:
        console.print(f"[yellow]{store.notice}[/yellow]")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        if line.strip() in ("", "/quit", "/exit"):
            break
        if line.strip() == "/reset":
            messages, chat_id = list(base), None
            session.reset()
            continue
        try:
            o.unicode_text(line, "that line")
        except SortedChatError as exc:
            console.print(f"[red]{exc}; nothing was sent[/red]")
            continue
        messages.append({"role": "user", "content": line})
        try:
            chat_id, message_id = store.start_answer(chat_id, messages, label, name)
        except SortedChatError as exc:  # a damaged history file was set aside: go on in a fresh one
            console.print(f"[yellow]{exc}[/yellow]")
            chat_id, message_id = store.start_answer(None, messages, label, name)
        answer = []
        try:
            for ev in session.generate(messages, sampling):
                answer.append(ev.text)
                store.add_token(message_id, ev.index, ev.token_id, ev.text, ev.exit_layer, ev.confidence)
                printer.token(ev)
        except KeyboardInterrupt:
            console.print("\n[dim](stopped)[/dim]")
        messages.append({"role": "assistant", "content": "".join(answer)})
        stats = session.last_stats
        store.finish_message(message_id, messages[-1]["content"], stats.to_dict() if stats else None)
        printer.summary(stats)
