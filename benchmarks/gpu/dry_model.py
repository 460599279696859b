"""The dry run's stand-in for the default model: the test suite's tiny LLaMA (6 layers, exits 2, 4, 6), saved
as a sortedchat checkpoint, so that benchmarks/gpu/run.sh can be proven end to end on a CPU.

    python benchmarks/gpu/dry_model.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import build_tiny_model, build_tokenizer  # noqa: E402


def main(directory: str) -> None:
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (Path(directory) / "sortedchat.json").write_text(json.dumps({"exits": [2, 4, 6]}))


if __name__ == "__main__":
    main(sys.argv[1])
