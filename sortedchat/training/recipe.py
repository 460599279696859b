"""Every option of `sortedchat train`, and TOML recipes that set them (flags on the command line win).

A recipe is a flat TOML table whose keys are the option names with dashes as underscores
(`max_length = 256` is `--max-length 256`). Unknown keys and wrong types stop with the file and key named,
so a typo in a recipe never silently trains with a default.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sortedchat import SortedChatError
from sortedchat.training.methods import METHODS, OBJECTIVES, described, trains_lenses

TEMPLATES = ("chat", "alpaca")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


def _option(default, help: str, negatable: bool = True):
    """A field of `TrainOptions` that is also a flag of `sortedchat train` (`cli/train.py` derives the flag from
    its name, type and help); `negatable` booleans get a `--no-` form, so a flag can undo a recipe's `true`."""
    return field(default=default, metadata={"help": help, "negatable": negatable})


@dataclass
class TrainOptions:
    """One training run. Defaults follow the paper (Sorted LLaMA: mean loss over exits, lr 2e-5, cosine)."""

    model: str = _option("default", "Starting model: 'default' (built-in SmolLM2-135M-Instruct base), HF directory, "
                         "sortedchat checkpoint, .gguf or hub id")
    data: str = _option("", "Training data: Alpaca JSON/JSONL, chat JSONL, QA JSONL, parquet/CSV, or a datasets hub "
                        "id: name, name:config, name:config@split")
    out: str = _option("", "Output directory")
    eval_data: str | None = _option(None, "Evaluation data (same formats as --data)")
    holdout: int = _option(0, "Hold out the last N records of --data for evaluation")
    template: str = _option("chat", "Prompt template: chat (the model's) or alpaca")
    skip_bad: bool = _option(False, "Skip malformed records (counted) instead of stopping")

    exits: list[int] | None = _option(None, "Exit layers, e.g. 9,12,15,...,30 (default: the model's, else 8 spread "
                                      "from 30% depth)")
    method: str = _option("soft", described(METHODS))
    objective: str = _option("ce", described(OBJECTIVES))
    exit_weights: list[float] | None = _option(None, "Loss weight per trained exit, e.g. 1,1,2")
    exits_per_step: int = _option(0, "Sample N exits per step, always with the last (0 = all)")
    lenses: bool = _option(False, "Train a per-exit affine lens (before the shared norm and head) with the model")
    lens_lr: float = _option(0.0, "Learning rate of the lenses (0 = --lr)")
    init_lenses: str | None = _option(None, "Start the lenses from a trained model's instead of the identity: "
                                      "its directory, or 'default' for the shipped default's")
    init_adapter: str | None = _option(None, "Continue a saved LoRA adapter instead of a fresh one: a PEFT adapter "
                                       "directory (an earlier run), or 'default' for the shipped default's. Its "
                                       "rank and alpha must match --lora-rank/--lora-alpha; KD still distils the "
                                       "base with the adapter off")
    kd_top_k: int = _option(0, "Distil from the teacher's cached top-K ids (candidate-set losses; 0 = exact "
                            "full-vocabulary losses)")
    kd_negatives: int = _option(256, "Sampled ids per step for the rest of the vocabulary (with --kd-top-k)")
    pack: bool = _option(False, "Pack records into rows of --max-length instead of padding each")
    layer_dropout: float = _option(0.0, "LayerSkip layer dropout: the last layer skipped at this rate per step, "
                                   "rising from 0 at the first")

    epochs: int = _option(1, "Passes over the data")
    max_steps: int = _option(0, "Optimizer steps; overrides --epochs")
    lr: float = _option(2e-5, "Peak learning rate")
    schedule: str = _option("cosine", "cosine, linear or constant (after warmup)")
    warmup_ratio: float = _option(0.03, "Warmup as a fraction of the steps")
    warmup_steps: int = _option(0, "Warmup steps; overrides --warmup-ratio")
    weight_decay: float = _option(0.0, "AdamW weight decay")
    max_grad_norm: float = _option(1.0, "Gradient clipping (0 = off)")
    batch_size: int = _option(4, "Sequences per process per micro-batch")
    grad_accum: int = _option(1, "Micro-batches per optimizer step")
    max_length: int = _option(512, "Tokens per sequence (longer ones are cut)")
    seed: int = _option(0, "Seed for data order, exit sampling and initialisation")

    eval_interval: int = _option(0, "Evaluate every N steps (0 = at the end)")
    save_interval: int = _option(0, "Checkpoint every N steps (0 = at the end)")  # and on Ctrl+C
    log_interval: int = _option(10, "Log to metrics.jsonl every N steps")
    keep_checkpoints: int = _option(2, "Checkpoints kept")

    lora: bool = _option(False, "Train a LoRA adapter instead of all weights")
    lora_rank: int = _option(16, "LoRA rank")
    lora_alpha: int = _option(32, "LoRA alpha")
    lora_dropout: float = _option(0.05, "LoRA dropout")
    lora_targets: str = _option("all-linear", "Modules to adapt: all-linear or names, e.g. q_proj,v_proj")
    lora_modules_to_save: str = _option("", "Modules trained in full beside the adapter, e.g. model.norm (the "
                                        "shared final norm)")
    merge: bool = _option(False, "Write merged weights instead of the adapter")
    load_in_4bit: bool = _option(False, "QLoRA: 4-bit base (bitsandbytes, GPU)")
    load_in_8bit: bool = _option(False, "8-bit base")
    gradient_checkpointing: bool = _option(False, "Recompute activations in backward (less memory)")
    mixed_precision: str | None = _option(None, "no, bf16 or fp16 (default: accelerate's launch config, else no)")
    device: str = _option("auto", "auto, cpu or cuda (several GPUs: accelerate launch)")
    trust_remote_code: bool = _option(False, "Allow a hub model's own Python code to run", negatable=False)
    allow_pickle: bool = _option(False, "Allow .bin pickle weights (can run code)", negatable=False)

    recipe: str | None = None  # set from --recipe, which `cli/train.py` declares itself (a path, not a setting)
    resume: bool = _option(False, "Continue the run saved in --out from its newest checkpoint", negatable=False)

    def to_dict(self) -> dict:
        return asdict(self)


def value_type(name: str) -> type:
    """The type of option `name`'s values, without its None (`exits`: list[int])."""
    hint = _HINTS[name]
    return next(t for t in typing.get_args(hint) if t is not type(None)) if isinstance(hint, types.UnionType) else hint


_HINTS = typing.get_type_hints(TrainOptions)


# Keys that a recipe may not set: where this run writes and whether it resumes belong to the command line.
CLI_ONLY = ("out", "resume", "recipe")


# What a value of each scalar type must be: the words an error uses, and the test.
_SCALARS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}
_ITEMS = {int: "layer numbers", float: "numbers"}  # what a list option's items are (exits, exit_weights)


def coerce_option(name: str, value, where: str):
    """Check a recipe or command-line value against the option's type; a list may also be given as '9,12,15'."""
    kind = value_type(name)
    if typing.get_origin(kind) is list:
        return _coerce_list(name, value, where, typing.get_args(kind)[0])
    what, fits = _SCALARS[kind]
    if not fits(value):
        raise SortedChatError(f"{where}: '{name}' must be {what}, got {value!r}")
    return float(value) if kind is float else value


def _coerce_list(name: str, value, where: str, item: type) -> list:
    what = _ITEMS[item]
    if isinstance(value, str):
        try:
            value = [item(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise SortedChatError(f"{where}: '{name}' must be {what}, got {value!r}") from None
    if not isinstance(value, list) or not all(_SCALARS[item][1](v) for v in value):
        raise SortedChatError(f"{where}: '{name}' must be a list of {what}")
    return [item(v) for v in value]


def load_recipe(path: str | Path) -> dict:
    """Read a recipe into {option: value}, checking every key and type."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SortedChatError(f"--recipe {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SortedChatError(f"--recipe {path}: invalid TOML ({exc})") from None
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _HINTS or name in CLI_ONLY:
            raise SortedChatError(f"--recipe {path}: unknown option '{key}'")
        out[name] = coerce_option(name, value, f"--recipe {path}")
    return out


def resolve_options(cli: dict, recipe: str | None = None) -> TrainOptions:
    """Built-in defaults, then the recipe, then every command-line value that is not None."""
    given = {k: v for k, v in cli.items() if v is not None}
    values = (load_recipe(recipe) if recipe else {}) | given
    method = METHODS.get(values.get("method"))
    if method is not None and not method.weighs_exits:
        # A recipe's per-exit loss settings belong to its SoFT runs: `--recipe R --method sft` (the paper's
        # baseline on the same recipe) drops them, while the same flags given explicitly are still refused.
        for name in ("exit_weights", "exits_per_step"):
            if name not in given:
                values.pop(name, None)
    values["recipe"] = str(recipe) if recipe else None
    opts = TrainOptions(**values)
    validate(opts)
    return opts


def _choice(value, allowed, flag):
    if value not in allowed:
        raise SortedChatError(f"{flag}: {value!r} is not one of {', '.join(allowed)}")


def validate(o: TrainOptions) -> None:
    """Refuse impossible combinations before anything is loaded, naming the flag (the first problem found, in
    this order)."""
    _check_given(o)
    _check_choices(o)
    _check_ranges(o)
    _check_method_combinations(o)
    _check_distillation(o)
    _check_per_layer_settings(o)


def _check_given(o: TrainOptions) -> None:
    if not o.data:
        raise SortedChatError("--data: no training data given (on the command line or in the recipe)")
    if not o.out:
        raise SortedChatError("--out: no output directory given")


def _check_choices(o: TrainOptions) -> None:
    _choice(o.method, METHODS, "--method")
    _choice(o.objective, OBJECTIVES, "--objective")
    _choice(o.template, TEMPLATES, "--template")
    _choice(o.schedule, SCHEDULES, "--schedule")
    if o.mixed_precision is not None:
        _choice(o.mixed_precision, PRECISIONS, "--mixed-precision")


def _at_least(o: TrainOptions, names: tuple[str, ...], low: int, words: str) -> None:
    for name in names:
        if getattr(o, name) < low:
            raise SortedChatError(f"--{name.replace('_', '-')}: {words}")


def _check_finite(o: TrainOptions) -> None:
    """`--lr nan` or `inf` compares false with every bound below, so it is refused first."""
    for name, value in asdict(o).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise SortedChatError(f"--{name.replace('_', '-')}: must be a finite number, got {v}")


def _check_ranges(o: TrainOptions) -> None:
    _check_finite(o)
    _at_least(o, ("batch_size", "grad_accum", "max_length", "epochs", "log_interval", "keep_checkpoints"), 1,
              "must be at least 1")
    _at_least(o, ("max_steps", "holdout", "eval_interval", "save_interval", "warmup_steps", "exits_per_step"), 0,
              "must not be negative")
    if o.lr <= 0:
        raise SortedChatError("--lr: must be positive")
    if not 0 <= o.warmup_ratio < 1:
        raise SortedChatError("--warmup-ratio: must be in [0, 1)")


def _check_method_combinations(o: TrainOptions) -> None:
    """Flags that exclude each other, or that one --method does not take."""
    if o.holdout and o.eval_data:
        raise SortedChatError("--holdout and --eval-data exclude each other")
    if o.load_in_4bit and o.load_in_8bit:
        raise SortedChatError("--load-in-4bit and --load-in-8bit exclude each other")
    method = METHODS[o.method]
    if (o.load_in_4bit or o.load_in_8bit) and not o.lora and not method.quantized_without_lora:
        raise SortedChatError("--load-in-4bit/--load-in-8bit train LoRA adapters on a frozen base: add --lora")
    if o.merge and not o.lora:
        raise SortedChatError("--merge merges a LoRA adapter: add --lora")
    if o.lora and not method.trains_decoder:
        raise SortedChatError(f"--method {o.method} trains {method.own_parts.value} on a frozen model; it takes no "
                              "--lora")
    if not method.weighs_exits and (o.exit_weights or o.exits_per_step):
        raise SortedChatError(f"--method {o.method} trains the last exit only; --exit-weights/--exits-per-step do not "
                              "apply")
    if o.lenses and not method.lenses_allowed:
        allowed = " or ".join(name for name, m in METHODS.items() if m.lenses_allowed)
        raise SortedChatError(f"--lenses: --method {o.method} trains its own per-exit parts; lenses go with {allowed}")
    if o.init_lenses and not trains_lenses(o.method, o.lenses):
        raise SortedChatError("--init-lenses: this run trains no lenses (use --method lens or --lenses)")
    if o.init_adapter and not o.lora:
        raise SortedChatError("--init-adapter continues a LoRA adapter: add --lora")


def _check_distillation(o: TrainOptions) -> None:
    if o.kd_top_k < 0 or o.kd_negatives < 1:
        raise SortedChatError("--kd-top-k must not be negative and --kd-negatives must be at least 1")
    if o.kd_top_k and not METHODS[o.method].distils_top_k:
        raise SortedChatError(f"--kd-top-k: --method {o.method} trains {METHODS[o.method].own_parts.value} with full "
                              "heads; use the exact losses (--kd-top-k 0)")
    if o.kd_top_k and not OBJECTIVES[o.objective].needs_teacher:
        distilling = " or ".join(name for name, objective in OBJECTIVES.items() if objective.needs_teacher)
        raise SortedChatError(f"--kd-top-k distils from the teacher: use --objective {distilling}")


def _check_per_layer_settings(o: TrainOptions) -> None:
    """Layer dropout, and the lenses' and exits' own settings."""
    if not 0 <= o.layer_dropout < 1:
        raise SortedChatError("--layer-dropout: must be in [0, 1)")
    if o.layer_dropout and not METHODS[o.method].trains_decoder:
        raise SortedChatError(f"--layer-dropout trains the layers; --method {o.method} keeps them frozen")
    _at_least(o, ("lens_lr",), 0, "must not be negative")
    if o.exit_weights and any(w < 0 for w in o.exit_weights):
        raise SortedChatError("--exit-weights: weights must not be negative")
