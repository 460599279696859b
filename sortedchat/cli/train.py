"""`sortedchat train`: Sorted Fine-Tuning and the paper's SFT / SFT+ICT baselines.

Every `train` option may also come from a TOML recipe (`--recipe`); a flag given on the command line wins.
The flags are derived from the fields of `TrainOptions` (name, type, help), where each option is declared once;
here every flag defaults to None, "not given", so a recipe's value is kept unless the flag overrides it.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from sortedchat.cli.option_groups import takes_groups
from sortedchat.training.recipe import TrainOptions, coerce_option, value_type


def register(app: typer.Typer) -> None:
    app.command()(train)


def _flag(option: dataclasses.Field) -> tuple[str, object, None]:
    """One field of `TrainOptions` as a field of `TrainFlags`: its flag, typed as the command line gives it."""
    flag, kind, help = "--" + option.name.replace("_", "-"), value_type(option.name), option.metadata["help"]
    if kind is bool and not option.metadata["negatable"]:  # a switch that is only ever turned on
        decl = flag
    else:
        decl = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
        help += "" if option.default in (None, "") else f" (default: {option.default})"
    kind = str if typing.get_origin(kind) is list else kind  # '9,12,15', parsed by `coerce_option`
    return option.name, Annotated[Optional[kind], typer.Option(decl, help=help, show_default=False)], None


# The flags of `train`: every `TrainOptions` field that has a help text (all but `recipe`).
TrainFlags = dataclasses.make_dataclass(
    "TrainFlags", [_flag(f) for f in dataclasses.fields(TrainOptions) if "help" in f.metadata])


def given(flags: TrainFlags) -> dict:
    """The flags given on the command line (the others are None), lists parsed: `--exits 9,12` is [9, 12]."""
    values = dataclasses.asdict(flags)
    for name, value in values.items():
        if value is not None and typing.get_origin(value_type(name)) is list:
            values[name] = coerce_option(name, value, "--" + name.replace("_", "-"))
    return values


@takes_groups
def train(
    *,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe; command-line flags win")] = None,
    flags: TrainFlags,
) -> None:
    """Fine-tune so that every exit works (SoFT), or run the paper's SFT / SFT+ICT baselines."""
    from sortedchat.outputs import check_output_dir
    from sortedchat.training.recipe import resolve_options
    from sortedchat.training.trainer import train as run_training

    opts = resolve_options(given(flags), str(recipe) if recipe else None)
    check_output_dir(opts.out, "--out")
    result = run_training(opts)
    if result.interrupted:
        print(f"interrupted at step {result.step}/{result.total_steps}; checkpoint saved in {result.checkpoint}. "
              f"Run the same command with --resume to continue.", file=sys.stderr)
        raise typer.Exit(130)
