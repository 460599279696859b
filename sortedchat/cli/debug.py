"""`sortedchat --debug` (or SORTEDCHAT_DEBUG=1): how an error the user can fix is reported.

By default it is one line on stderr. Many of those errors replace a library's exception (`raise ... from
None`), which keeps the message short but hides where it came from; with `--debug` the traceback and the
exception it replaced are printed above the line.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer

ENV = "SORTEDCHAT_DEBUG"


def _enable(value: bool) -> None:
    if value:
        os.environ[ENV] = "1"  # also reaches the processes `train` starts


# Never passed to the command (expose_value=False): setting it is all it does, and `report` reads it.
DebugOpt = Annotated[bool, typer.Option("--debug", expose_value=False, is_eager=True, callback=_enable,
                                        help=f"On an error, also print its traceback and the exception it "
                                        f"replaced (give it before the command: sortedchat --debug ask ...; or "
                                        f"set {ENV}=1)")]


def debugging() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def report(exc: BaseException) -> None:
    """The error as one line on stderr; with `--debug` its traceback and cause first."""
    if debugging():
        exc.__suppress_context__ = False  # `from None` hid the original exception: show it
        traceback.print_exception(exc)
    print(f"error: {exc}", file=sys.stderr)
