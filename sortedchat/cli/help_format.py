"""How `--help` reads: flags without a value placeholder, arguments in capitals, help texts as written.

Typer's rich help (0.29) puts a type after every option, flags included, so `--json <bool>` reads as if it
took a value; it writes a required argument as `{prompt}` in the usage line; it keeps a docstring's line
breaks, so a command's summary in the command list breaks off mid-sentence; and it reads `[...]` in a help
text as Rich markup, so "[default: the built-in set]" vanishes. `SortedChatTyper` builds every command and
the group with classes that fix all four, so no command module has to think of it.
"""

from __future__ import annotations

import inspect

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption


def paragraphs(text: str | None) -> str | None:
    """A docstring as paragraphs: the lines of each joined by spaces, so the help wraps them to the terminal."""
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def tidy(param) -> None:
    """A flag shows no type; an argument shows in capitals; a help text is shown as written."""
    if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
        param.metavar = ""  # the rich help shows the metavar, when there is one, in place of the type
    if isinstance(param, TyperArgument) and param.metavar is None:
        param.metavar = param.name.upper()
    if param.help:
        param.help = escape(param.help)


class _Tidied:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = escape(paragraphs(self.help) or "")
        for param in self.params:
            tidy(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)  # made on first use, after __init__
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option


class HelpCommand(_Tidied, TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:
        """`[OPTIONS] PROMPT`: a required argument bare, an optional one in brackets."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class HelpGroup(_Tidied, TyperGroup):
    pass


class SortedChatTyper(typer.Typer):
    """A `typer.Typer` whose commands and group render their help as the module's doc describes."""

    def __init__(self, **kwargs):
        super().__init__(cls=HelpGroup, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", HelpCommand)
        return super().command(*args, **kwargs)
