"""Every option of `sortedchat train`, and TOML recipes that set them (flags on the command line win).

A recipe is a flat TOML table whose keys are the option names with dashes as underscores
(`max_length = 256` is `--max-length 256`). Unknown keys and wrong types stop with the file and key named,
so a typo in a recipe never silently trains with a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sortedchat import SortedChatError

METHODS = ("soft", "sft", "ict", "lens")
OBJECTIVES = ("ce", "kd", "ce+kd")
TEMPLATES = ("chat", "alpaca")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainOptions:
    """One training run. Defaults follow the paper (Sorted LLaMA: mean loss over exits, lr 2e-5, cosine)."""

    model: str = "default"  # "default" = the built-in SmolLM2-135M-Instruct base; else a path or hub id
    data: str = ""
    out: str = ""
    eval_data: str | None = None
    holdout: int = 0  # hold out the last N records of --data for evaluation
    template: str = "chat"
    skip_bad: bool = False

    exits: list[int] | None = None  # None: the model's own exits, else the default spread
    method: str = "soft"
    objective: str = "ce"
    exit_weights: list[float] | None = None
    exits_per_step: int = 0  # 0 = every exit every step
    lenses: bool = False  # soft: train a per-exit affine lens with the model ("lens" trains lenses alone)
    lens_lr: float = 0.0  # 0 = --lr
    kd_top_k: int = 0  # > 0: distil from the teacher's cached top-K (candidate-set losses); 0 = exact
    kd_negatives: int = 256  # sampled ids per step that estimate the rest of the vocabulary (with kd_top_k)
    pack: bool = False  # pack records into rows of max_length instead of padding each one
    layer_dropout: float = 0.0  # LayerSkip: layer l of L skipped per step with probability rate * l / (L - 1)

    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4  # sequences per process per micro-batch
    grad_accum: int = 1
    max_length: int = 512
    seed: int = 0

    eval_interval: int = 0  # steps; 0 = only at the end
    save_interval: int = 0  # steps; 0 = only at the end (and on Ctrl+C)
    log_interval: int = 10
    keep_checkpoints: int = 2

    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    lora_modules_to_save: str = ""  # e.g. "model.norm": trained in full and stored with the adapter
    merge: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str | None = None  # None: accelerate's launch config decides ("no" when run directly)
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False

    recipe: str | None = None
    resume: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# Keys that a recipe may not set: where this run writes and whether it resumes belong to the command line.
CLI_ONLY = ("out", "resume", "recipe")


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainOptions)}


def coerce_option(name: str, value, where: str):
    """Check a recipe value against the option's type; lists of exits may be a list or '9,12,15'."""
    kind = _field_types()[name]
    if name == "exits":
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
            try:
                value = [int(v) for v in value]
            except ValueError:
                raise SortedChatError(f"{where}: 'exits' must be layer numbers, got {value!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise SortedChatError(f"{where}: 'exits' must be a list of layer numbers")
        return value
    if name == "exit_weights":
        if isinstance(value, str):
            try:
                value = [float(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError:
                raise SortedChatError(f"{where}: 'exit_weights' must be numbers, got {value!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise SortedChatError(f"{where}: 'exit_weights' must be a list of numbers")
        return [float(v) for v in value]
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise SortedChatError(f"{where}: '{name}' must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise SortedChatError(f"{where}: '{name}' must be a whole number, got {value!r}")
        return value
    if kind.startswith("float"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SortedChatError(f"{where}: '{name}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise SortedChatError(f"{where}: '{name}' must be a string, got {value!r}")
    return value


def load_recipe(path: str | Path) -> dict:
    """Read a recipe into {option: value}, checking every key and type."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SortedChatError(f"--recipe {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SortedChatError(f"--recipe {path}: invalid TOML ({exc})") from None
    known = _field_types()
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known or name in CLI_ONLY:
            raise SortedChatError(f"--recipe {path}: unknown option '{key}'")
        out[name] = coerce_option(name, value, f"--recipe {path}")
    return out


def resolve_options(cli: dict, recipe: str | None = None) -> TrainOptions:
    """Built-in defaults, then the recipe, then every command-line value that is not None."""
    given = {k: v for k, v in cli.items() if v is not None}
    values = (load_recipe(recipe) if recipe else {}) | given
    if values.get("method") == "sft":
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
    """Refuse impossible combinations before anything is loaded, naming the flag."""
    if not o.data:
        raise SortedChatError("--data: no training data given (on the command line or in the recipe)")
    if not o.out:
        raise SortedChatError("--out: no output directory given")
    _choice(o.method, METHODS, "--method")
    _choice(o.objective, OBJECTIVES, "--objective")
    _choice(o.template, TEMPLATES, "--template")
    _choice(o.schedule, SCHEDULES, "--schedule")
    if o.mixed_precision is not None:
        _choice(o.mixed_precision, PRECISIONS, "--mixed-precision")
    for name in ("batch_size", "grad_accum", "max_length", "epochs", "log_interval", "keep_checkpoints"):
        if getattr(o, name) < 1:
            raise SortedChatError(f"--{name.replace('_', '-')}: must be at least 1")
    for name in ("max_steps", "holdout", "eval_interval", "save_interval", "warmup_steps", "exits_per_step"):
        if getattr(o, name) < 0:
            raise SortedChatError(f"--{name.replace('_', '-')}: must not be negative")
    if o.lr <= 0:
        raise SortedChatError("--lr: must be positive")
    if not 0 <= o.warmup_ratio < 1:
        raise SortedChatError("--warmup-ratio: must be in [0, 1)")
    if o.holdout and o.eval_data:
        raise SortedChatError("--holdout and --eval-data exclude each other")
    if o.load_in_4bit and o.load_in_8bit:
        raise SortedChatError("--load-in-4bit and --load-in-8bit exclude each other")
    if (o.load_in_4bit or o.load_in_8bit) and not o.lora and o.method != "ict":
        raise SortedChatError("--load-in-4bit/--load-in-8bit train LoRA adapters on a frozen base: add --lora")
    if o.merge and not o.lora:
        raise SortedChatError("--merge merges a LoRA adapter: add --lora")
    if o.method == "ict" and o.lora:
        raise SortedChatError("--method ict trains new exit heads on a frozen model; it takes no --lora")
    if o.method == "sft" and (o.exit_weights or o.exits_per_step):
        raise SortedChatError("--method sft trains the last exit only; --exit-weights/--exits-per-step do not apply")
    if o.method in ("lens", "ict") and o.lenses:
        raise SortedChatError(f"--lenses: --method {o.method} trains its own per-exit parts; lenses go with soft or sft")
    if o.method == "lens" and (o.lora or o.merge):
        raise SortedChatError("--method lens trains per-exit lenses on a frozen model; it takes no --lora")
    if o.kd_top_k < 0 or o.kd_negatives < 1:
        raise SortedChatError("--kd-top-k must not be negative and --kd-negatives must be at least 1")
    if o.kd_top_k and o.method == "ict":
        raise SortedChatError("--kd-top-k: ICT trains new full heads; use the exact losses (--kd-top-k 0)")
    if o.kd_top_k and o.objective == "ce":
        raise SortedChatError("--kd-top-k distils from the teacher: use --objective kd or ce+kd")
    if not 0 <= o.layer_dropout < 1:
        raise SortedChatError("--layer-dropout: must be in [0, 1)")
    if o.layer_dropout and o.method in ("lens", "ict"):
        raise SortedChatError(f"--layer-dropout trains the layers; --method {o.method} keeps them frozen")
    if o.lens_lr < 0:
        raise SortedChatError("--lens-lr: must not be negative")
    if o.exit_weights and any(w < 0 for w in o.exit_weights):
        raise SortedChatError("--exit-weights: weights must not be negative")
