"""The package's one-way layering (CONTRIBUTING.md): a module imports only from its own layer or the ones below.

Every import counts, including the ones inside functions that keep start-up fast: a late import upward is
still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sortedchat

PACKAGE = Path(sortedchat.__file__).parent

# Lowest first. A top-level module or sub-package of `sortedchat` per entry; CONTRIBUTING.md maps them.
LAYERS = [
    {"__init__", "config", "paths", "progress", "palette", "outputs", "gguf_meta"},  # foundations
    # the model as nested sub-models, on transformers' parts (int8 or int4 products where --quantize asks)
    {"head_product", "head_screens", "hf_contract", "int4", "quantize", "sorted_model"},
    {"convert", "default_model", "loading"},  # --model to a SortedModel
    {"engine"},  # decoding, all three modes
    {"bench", "training"},  # tools on the model and the engine
    {"calibrate"},  # uses the bench's costs and the training data readers
    {"tui", "server"},  # the front ends beside the command line: the chat app, the OpenAI-compatible server
    {"cli", "__main__"},  # the command line, which also starts the app
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """`sortedchat.engine.session` -> "engine"; `sortedchat` -> "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "sortedchat" or name.startswith("sortedchat.")]


def test_every_module_is_placed_in_a_layer():
    units = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")}
    assert units - set(RANK) == set(), "place the new module in LAYERS (and in CONTRIBUTING.md's map)"


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = unit_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for line, name in imports(path):
            there = unit_of(name)
            if RANK[there] > RANK[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {name} ({there})")
    assert upward == []
