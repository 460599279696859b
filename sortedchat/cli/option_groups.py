"""Option groups: a dataclass whose fields are typer options, taken by several commands as one parameter.

Typer reads a command's options off its signature and has no notion of a group, so `takes_groups` rewrites
the signature typer sees: a parameter annotated with a dataclass is replaced by that dataclass's fields (each
with its own `typer.Option`), and the command is called with the dataclass built from them. Each flag is then
declared once, in its group, and a command cannot pass the group's values in the wrong order.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

KEYWORD = inspect.Parameter.KEYWORD_ONLY  # typer passes every value by name; keyword-only keeps any order valid


def takes_groups(command):
    """`command` with each option-group parameter spread into its fields for typer (see the module's doc)."""
    hints = typing.get_type_hints(command, include_extras=True)
    own = inspect.signature(command)
    groups = {name: hints[name] for name in own.parameters if dataclasses.is_dataclass(hints.get(name))}
    params = []
    for p in own.parameters.values():
        if p.name in groups:
            params += group_parameters(groups[p.name])
        else:
            params.append(p.replace(kind=KEYWORD, annotation=hints.get(p.name, p.annotation)))

    @functools.wraps(command)
    def run(**values):
        for name, group in groups.items():
            values[name] = group(**{f.name: values.pop(f.name) for f in dataclasses.fields(group)})
        return command(**values)

    run.__signature__ = own.replace(parameters=params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def group_parameters(group: type) -> list[inspect.Parameter]:
    """The group's fields as the parameters typer turns into options."""
    hints = typing.get_type_hints(group, include_extras=True)
    return [inspect.Parameter(f.name, KEYWORD, annotation=hints[f.name], default=f.default)
            for f in dataclasses.fields(group)]
