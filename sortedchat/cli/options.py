"""Options shared by the commands that load a model or generate: one option group (`option_groups`) each for
loading, the decoding mode and sampling, and the helpers that apply them."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from sortedchat import SortedChatError
from sortedchat.engine.modes import Mode, ModeError, ModeKind  # no torch (engine/__init__ loads lazily)

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id, HF directory, .gguf file, sortedchat checkpoint or PEFT adapter "
                 "[default: the built-in SmolLM2-135M-Instruct]"),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch [default: one per core; "
                                                   "waiting threads spin briefly, then sleep: a busy machine slows "
                                                   "them, not stalls them]")]
# `eval` and `calibrate` pick their records with these (`sortedchat.training.data.last_records`).
HoldoutOpt = Annotated[int, typer.Option("--holdout", help="Use only the last N records (what `train --holdout N` "
                                         "left out)")]
LimitOpt = Annotated[int, typer.Option("--limit", help="Use at most N records (after --holdout)")]


@dataclass
class PreciseLoadFlags:
    """How to load the model, weights as stored or int8 on a CPU (`calibrate` measures the model it writes
    thresholds for: bitsandbytes' quantizations are for the other commands)."""

    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps")] = "auto"
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16")] = "auto"
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own Python "
                                                    "code to run")] = False
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin pickle weights "
                                               "(can run code)")] = False
    exits: Annotated[Optional[str], typer.Option("--exits", help="Override the exits, e.g. 9,12,15,30")] = None
    threads: ThreadsOpt = None
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="For CPUs. int8: the layers' matrix "
                                                    "products and the LM head run with int8 weights (torch's int8 "
                                                    "kernels: faster, a little less exact). int4: the layers' "
                                                    "products in 4-bit blocks, a GGUF's Q4_1 blocks as they are, an "
                                                    "adapter kept beside them (the most exact). Embeddings, norms, "
                                                    "attention and lenses stay float32")] = None

    def exit_list(self) -> list[int] | None:
        """`--exits 9,12,30` as numbers (checked against the model's layers once they are known)."""
        if not self.exits:
            return None
        try:
            return [int(x) for x in self.exits.split(",") if x.strip()]
        except ValueError:
            raise SortedChatError(f"--exits: expected comma-separated layer numbers, got {self.exits!r}") from None

    def load_options(self):
        """The options `loading` takes. Every command that loads a model calls it first, so it is also where
        `--threads` takes effect (torch's thread count is the process's, whichever thread then runs the model)."""
        from sortedchat.loading import LoadOptions

        set_threads(self.threads)
        fields = dataclasses.asdict(self)
        del fields["threads"]
        return LoadOptions(**fields | {"exits": self.exit_list()})


@dataclass
class LoadFlags(PreciseLoadFlags):
    """How to load the model, quantized if asked."""

    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Quantize the weights to 4 bits "
                                               "(bitsandbytes)")] = False
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="Quantize the weights to 8 bits "
                                               "(bitsandbytes)")] = False
    compile: Annotated[bool, typer.Option("--compile", help="Compile the one-token decoding step ahead "
                                          "of time (AOTInductor; needs a C++ compiler) while the model loads: "
                                          "10-30 s the first time for a model, CPU and thread count, kept in the "
                                          "cache folder after that; eager if it cannot")] = False


# The flag that sets each `Mode` field a `ModeError` can name (`--speculative` sets `depth` when drafting).
FLAG_OF = {"depth": "--depth", "threshold": "--threshold", "kv": "--kv", "draft_len": "--draft-len",
           "draft_stop": "--draft-stop"}


@dataclass
class ModeFlags:
    """How deep each token goes: `--depth`, `--auto` or `--speculative`, and their settings."""

    depth: Annotated[Optional[int], typer.Option("--depth", "-d", help="Run every token through the first K "
                                                 "layers")] = None
    auto: Annotated[bool, typer.Option("--auto", help="Per token, exit at the first confident exit")] = False
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Auto mode: one threshold for all "
                                                       "exits")] = None
    speculative: Annotated[Optional[int], typer.Option("--speculative", help="Draft with the first K layers, "
                                                       "verify with the rest")] = None
    draft_len: Annotated[int, typer.Option("--draft-len", help="Speculative: initial tokens per draft")] = 4
    draft_stop: Annotated[float, typer.Option("--draft-stop", help="Speculative: end a draft early when the "
                                              "drafted token's probability falls below this (0 = never)")] = 0.0
    always_draft: Annotated[bool, typer.Option("--always-draft", help="Speculative: draft even where drafting is "
                                               "measured slower than full depth (by default it pauses there)")] = False
    kv: Annotated[str, typer.Option("--kv", help="How the layers a token skips get its K/V: exact (computed when a "
                                    "deeper token needs them) or propagate (at once, from the exit's hidden state: "
                                    "approximate, nothing waits; not with --speculative)")] = "exact"

    def check(self, num_layers: int | None) -> Mode:
        """The `Mode` the flags ask for, checked by `Mode.validate` (its error names the flag); with `num_layers`
        None the range checks wait for the model. Runs before loading too (with the count from `known_layers`), so
        a mistyped option never waits for the model. The rules here are the flags' own: which go together."""
        chosen = sum(x is not None for x in (self.depth, self.speculative)) + bool(self.auto)
        if chosen > 1:
            raise SortedChatError("--depth, --auto and --speculative exclude each other")
        if self.threshold is not None and not self.auto:
            raise SortedChatError("--threshold needs --auto")
        if self.always_draft and self.speculative is None:
            raise SortedChatError("--always-draft needs --speculative")
        try:
            return self._mode().validate(num_layers)
        except ModeError as exc:
            flag = "--speculative" if exc.field == "depth" and self.speculative is not None else FLAG_OF[exc.field]
            raise SortedChatError(f"{flag} {exc.value}: {exc.problem}") from None

    def _mode(self) -> Mode:
        if self.auto:
            return Mode.auto(self.threshold, kv=self.kv)
        if self.speculative is not None:
            return Mode(ModeKind.SPECULATIVE, self.speculative, draft_len=self.draft_len, draft_stop=self.draft_stop,
                        pace=not self.always_draft, kv=self.kv)
        return Mode.fixed(self.depth, kv=self.kv)

    def mode(self, sm) -> Mode:
        """The engine's `Mode` for the loaded model `sm`."""
        return self.check(sm.num_layers)


@dataclass
class SamplingFlags:
    """How each token is picked (the answer length, whose default differs per command, is `MaxTokensOpt`)."""

    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")] = 0.0
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off")] = 0
    seed: Annotated[Optional[int], typer.Option("--seed")] = None
    repeat_stop: Annotated[bool, typer.Option("--repeat-stop/--no-repeat-stop", help="Stop an answer that "
                                              "repeats itself (the same tokens over and over)")] = True

    def config(self, max_new_tokens: int):
        from sortedchat.engine import SamplingConfig

        return SamplingConfig(**dataclasses.asdict(self), max_new_tokens=max_new_tokens).validate()


def load_model(spec, opts, console=None):
    """Load with a rich status line (the first run of the default model converts it, ~15 s); a compiled step that
    could not be made is one warning line."""
    from rich.console import Console

    console = console or Console(stderr=True)
    with console.status("loading model", spinner="dots") as status:
        sm = loaded(spec, opts, progress=lambda stage, frac=None: status.update(stage))
    if opts.compile:
        from sortedchat.engine.compiled import compile_problem

        if problem := compile_problem(sm):
            warn(problem, console)
    return sm


def warn(text: str, console=None) -> None:
    """One warning line on stderr (or `console`), never wrapped: tests and scripts read it whole."""
    from rich.console import Console

    (console or Console(stderr=True)).print(f"[yellow]warning:[/] {text}", soft_wrap=True)


def loaded(spec, opts, progress):
    """`load_sorted_model`, then with `--compile` the compiled decoding step (`engine/compiled.py`): both while the
    loading status or screen shows."""
    from sortedchat.loading import load_sorted_model

    sm = load_sorted_model(spec, opts, progress=progress)
    if opts.compile:
        from sortedchat.engine.compiled import compile_steps

        compile_steps(sm, progress)
    return sm


def usable_cpus() -> int:
    """The CPUs this process may run on: a container or `taskset` can allow fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def warn_of_threads(threads: int | None) -> None:
    """One warning line, before loading, when `--threads` asks for more threads than there are CPUs to run them:
    torch's threads then take turns on a CPU and wait for each other at every operator, and the model runs slower
    with no other sign (the default model on 2 CPUs, 8 threads against 2: prompts at 67-69 against 529-543 tok/s,
    decoding at 8.4-9.8 against 10.2-10.8 tok/s)."""
    cpus = usable_cpus()
    if threads is not None and threads > cpus:
        warn(f"--threads {threads} is more than the {cpus} CPUs this process may use: threads that share a CPU wait "
             "for each other, and the model runs slower, not faster")


def set_threads(threads: int | None) -> None:
    """`--threads N`: torch's CPU threads (None leaves torch's own choice, one per core)."""
    if threads is not None:
        if threads < 1:
            raise SortedChatError(f"--threads {threads}: must be at least 1")
        import torch

        torch.set_num_threads(threads)


def unicode_text(text: str, where: str) -> str:
    """`text` unchanged if it is valid Unicode, else an error naming the first bad byte.

    Python keeps bytes that are not UTF-8 (in argv, or on stdin read with `surrogateescape`) as lone
    surrogates, which no tokenizer accepts: refusing with the byte's position beats guessing a meaning.
    """
    for i, ch in enumerate(text, 1):
        if "\ud800" <= ch <= "\udfff":
            code = ord(ch)
            what = f"byte 0x{code - 0xDC00:02x}" if code >= 0xDC80 else f"lone surrogate U+{code:04X}"
            raise SortedChatError(f"{where}: not valid UTF-8 ({what} at character {i})")
    return text
