"""`sortedchat ask`: one prompt, streamed, coloured by exit layer."""

from __future__ import annotations

from typing import Annotated

import typer

from sortedchat import SortedChatError
from sortedchat.cli import options as o
from sortedchat.cli.option_groups import takes_groups
from sortedchat.cli.prechecks import check_before_loading
from sortedchat.cli.render import AnswerPrinter


def register(app: typer.Typer) -> None:
    app.command()(ask)


@takes_groups
def ask(
    prompt: Annotated[str, typer.Argument(help="The question or instruction")],
    *,
    model: o.ModelOpt = None,
    system: Annotated[str, typer.Option("--system", help="System prompt")] = "",
    mode: o.ModeFlags,
    sampling: o.SamplingFlags,
    max_new_tokens: o.MaxTokensOpt = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON event per line")] = False,
    load: o.LoadFlags,
) -> None:
    """Answer one prompt, streaming tokens coloured by the layer they exited at."""
    o.unicode_text(prompt, "the prompt")
    if not prompt.strip():  # the model would answer a question nobody asked
        raise SortedChatError("the prompt is empty; give a question, e.g. sortedchat ask \"What is SoFT?\"")
    o.unicode_text(system, "--system")
    check_before_loading(model, load, mode)
    from sortedchat.engine import ChatSession  # torch: after the checks that need none

    config = sampling.config(max_new_tokens)
    sm = o.load_model(model, load.load_options())
    session = ChatSession(sm, mode.mode(sm))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    printer = AnswerPrinter(sm.num_layers, sm.exits[0], as_json)
    for ev in session.generate(messages, config, on_prefill=printer.prefill):
        printer.token(ev)
    printer.summary(session.last_stats)
