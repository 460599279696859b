"""`sortedchat train`: one run of SoFT, SFT or SFT+ICT through accelerate, from setup to the exported model.

Design points, each for a reason:
- The data order is a function of (seed, step) alone and a step's loss is normalised by the number of
  response tokens in the whole global batch, so a resumed run repeats exactly the batches it would have
  seen, and N processes with micro-batches of b give the same gradient as one process with N*b.
- Ctrl+C only raises a flag: the current step finishes, a checkpoint is saved, and the run stops cleanly
  (a second Ctrl+C aborts at once). With several processes the flag is agreed on before acting on it.
- The same `SortedObjective` computes the training loss and the per-exit evaluation CE.
- A full disk loses as little as it can. A periodic checkpoint that cannot be written is a warning: the run
  goes on (its state is in memory, the previous checkpoint stays, the next interval tries again). At the end
  the model is written before the final checkpoint (it is the smaller and the one the user wants), and a
  write that fails ends the run with one line saying what was saved and where.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from sortedchat import SortedChatError, first_line
from sortedchat.config import SortedConfig, atomic_write_text, validate_exits
from sortedchat.default_model import SHIPPED_ADAPTER, base_model_dir
from sortedchat.loading import LoadOptions, load_exit_lenses, load_sorted_model
from sortedchat.outputs import write_error
from sortedchat.sorted_model import ExitHeads, ExitLenses
from sortedchat.training import checkpoints as ckpt
from sortedchat.training.data import RecordSet, load_records
from sortedchat.training.export import base_model_name, export_model
from sortedchat.training.methods import METHODS, OBJECTIVES, ExitPart, trains_lenses
from sortedchat.training.objectives import SortedObjective, decoder_of, lm_head_of
from sortedchat.training.progress import TrainProgress, format_exit_losses
from sortedchat.training.recipe import TrainOptions
from sortedchat.training.teacher_cache import model_identity, teacher_top_k
from sortedchat.training.templates import (
    collate_rows,
    encode_all,
    micro_batches,
    packed_micro_batches,
    step_indices,
    steps_per_epoch,
)

# bitsandbytes (imported by peft) warns at import about an optional CPU kernel package we do not use.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

METRICS_NAME = "metrics.jsonl"
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainResult:
    out: Path
    step: int
    total_steps: int
    interrupted: bool
    checkpoint: Path | None
    metrics: dict = field(default_factory=dict)


def make_accelerator(o: TrainOptions):
    """An Accelerator for this run. Several runs in one process (tests, benchmarks) each get a fresh state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one global state per process and refuses a second run with other settings.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if o.device not in ("auto", "cpu", "cuda"):
        raise SortedChatError(f"--device: {o.device!r} is not one of auto, cpu, cuda (multi-GPU: accelerate launch)")
    if o.device == "cuda" and not torch.cuda.is_available():
        raise SortedChatError("--device cuda: no CUDA device is available on this machine")
    cpu = o.device == "cpu" or (o.device == "auto" and not torch.cuda.is_available())
    if cpu and o.mixed_precision == "fp16":
        raise SortedChatError("--mixed-precision fp16 needs a GPU; use bf16 on a CPU")
    # ICT with sampled exits leaves some heads without a gradient in a step.
    unused = METHODS[o.method].own_parts is ExitPart.HEADS and o.exits_per_step > 0
    return Accelerator(
        mixed_precision=o.mixed_precision, cpu=cpu, gradient_accumulation_steps=o.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively; elsewhere autocast emulates them, very slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class Trainer:
    """Set up with `setup()`, then `run()`; `train_step(step)` is public for the cost benchmark."""

    def __init__(self, opts: TrainOptions, console: Console | None = None):
        self.opts = opts
        self.method = METHODS[opts.method]
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Path(opts.out).expanduser()
        self.tokens_seen = 0
        self.elapsed = 0.0
        self._stop = False

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        o = self.opts
        self.acc = make_accelerator(o)
        self.main = self.acc.is_main_process
        if self.acc.device.type == "cpu" and o.mixed_precision == "bf16" and not cpu_has_native_bf16():
            self._say("[yellow]warning: --mixed-precision bf16 on a CPU without AVX512-BF16 or AMX is emulated and "
                      "was measured ~50x slower than float32 here; use --mixed-precision no[/yellow]")
        if not o.resume and self.out.is_dir() and any(self.out.iterdir()):
            raise SortedChatError(f"--out {self.out}: already holds files; choose another directory, "
                                  "or pass --resume to continue the run saved there")
        self.train_set, self.eval_set = self._load_data()
        self._say(f"data: {len(self.train_set.examples)} training records from {self.train_set.source}"
                  + (f" ({self.train_set.skipped} malformed skipped)" if self.train_set.skipped else "")
                  + (f", {len(self.eval_set.examples)} held out for evaluation" if self.eval_set else ""))
        from accelerate.utils import set_seed

        set_seed(o.seed)
        self._load_model()
        self._choose_exits()
        self._build_objective()
        self._encode()
        self._build_optimizer()
        return self

    def _say(self, message: str) -> None:
        if self.main:
            self.console.print(message)

    def _load_data(self) -> tuple[RecordSet, RecordSet | None]:
        o = self.opts
        train = load_records(o.data, o.skip_bad, "--data")
        if o.holdout:
            return train.holdout(o.holdout)
        return train, (load_records(o.eval_data, o.skip_bad, "--eval-data") if o.eval_data else None)

    def _load_model(self) -> None:
        o = self.opts
        quantized = o.load_in_4bit or o.load_in_8bit
        spec = o.model
        if spec == "default":
            spec = str(base_model_dir())
        if o.lora and not o.merge and (Path(spec).expanduser() / "adapter_config.json").is_file():
            raise SortedChatError(f"--model {o.model}: is itself an adapter; a new --lora adapter needs a plain base "
                                  "(train with --merge, or start from merged weights)")
        device = self.acc.device
        load = LoadOptions(device=device.type if device.type == "cpu" else str(device),
                           dtype="auto" if quantized else "float32",
                           load_in_4bit=o.load_in_4bit, load_in_8bit=o.load_in_8bit,
                           trust_remote_code=o.trust_remote_code, allow_pickle=o.allow_pickle)
        with self.console.status("loading model", spinner="dots") if self.main else contextlib.nullcontext():
            self.sm = load_sorted_model(spec, load)
        self.tokenizer = self.sm.tokenizer
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _choose_exits(self) -> None:
        o, L = self.opts, self.sm.num_layers
        self.exits = validate_exits(list(o.exits), L, "--exits") if o.exits else list(self.sm.exits)
        self.loss_exits = self.method.loss_exits.of(self.exits, L)
        if not self.loss_exits:
            raise SortedChatError(f"--method {o.method} trains a part per intermediate exit; --exits names none "
                                  "below the last layer")
        weights = o.exit_weights or [1.0] * len(self.loss_exits)
        if len(weights) != len(self.loss_exits):
            raise SortedChatError(f"--exit-weights: {len(weights)} weights for {len(self.loss_exits)} trained exits "
                                  f"({','.join(map(str, self.loss_exits))})")
        if sum(weights) <= 0:
            raise SortedChatError("--exit-weights: at least one weight must be positive")
        self.exit_weight = dict(zip(self.loss_exits, weights))
        if o.exits_per_step > len(self.loss_exits):
            raise SortedChatError(f"--exits-per-step {o.exits_per_step}: only {len(self.loss_exits)} exits are trained")
        if self.method.keeps_last and o.exits_per_step == 1 and len(self.loss_exits) > 1:
            raise SortedChatError("--exits-per-step 1 would train the last exit only (that is --method sft); "
                                  "use 2 or more")

    def _build_objective(self) -> None:
        o, method, model = self.opts, self.method, self.sm.model
        model.config.use_cache = False
        teacher, heads, lenses = None, None, None
        if trains_lenses(o.method, o.lenses):
            lenses = ExitLenses(self.exits[:-1], model.config.hidden_size)
            if o.init_lenses:
                self._start_lenses_from(lenses, o.init_lenses, model.config.hidden_size)
            lenses = lenses.to(self.acc.device)
        if method.trains_decoder:
            model, teacher = self._trainable_decoder(model)
        else:  # a frozen model is its own teacher: the objective reads its last hidden state, no second pass
            model.requires_grad_(False)
            model.eval()
            if method.own_parts is ExitPart.HEADS:
                heads = self._new_exit_heads(model)
        ds = self.acc.state.deepspeed_plugin
        impl = "module" if ds is not None and ds.zero_stage == 3 else "fused"
        self.objective = SortedObjective(model, self.sm.num_layers, o.objective, heads, teacher, impl, lenses,
                                         freeze_decoder=not method.trains_decoder, top_k=o.kd_top_k)

    def _start_lenses_from(self, lenses, source: str, hidden_size: int) -> None:
        """--init-lenses: a trained model's lenses at the exits both have; an exit it has no lens for starts
        as the identity, and a lens at an exit this run does not train is an error (it would be dropped)."""
        trained = load_exit_lenses(source, hidden_size)
        extra = [e for e in trained.exits if not lenses.has(e)]
        if extra:
            raise SortedChatError(f"--init-lenses {source}: has lenses at exits {','.join(map(str, extra))}, "
                                  f"which this run does not train (its exits: {','.join(map(str, self.exits[:-1]))})")
        with torch.no_grad():
            for e in trained.exits:
                lenses.lenses[str(e)].load_state_dict(trained.lenses[str(e)].state_dict())
        self._say(f"lenses at exits {','.join(map(str, trained.exits))} start from {source}")

    def _new_exit_heads(self, model):
        """ICT: one head per trained exit, each starting as a copy of the shared LM head (float32)."""
        cfg = model.config
        heads = ExitHeads(self.loss_exits, cfg.hidden_size, cfg.vocab_size, decoder_of(model).norm)
        with torch.no_grad():
            for e in self.loss_exits:
                heads.heads[str(e)].weight.copy_(lm_head_of(model).weight)
        return heads.to(device=self.acc.device, dtype=torch.float32)

    def _trainable_decoder(self, model):
        """SoFT/SFT: the model made trainable (k-bit preparation, gradient checkpointing, LoRA), and the frozen
        copy of the start that KD distils from (None when there is none to keep: CE, LoRA, cached top-K)."""
        o = self.opts
        teacher = None
        if OBJECTIVES[o.objective].needs_teacher and not o.lora and not o.kd_top_k:
            teacher = copy.deepcopy(model).requires_grad_(False).eval()
        if o.load_in_4bit or o.load_in_8bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=o.gradient_checkpointing)
        if o.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if o.lora:
            model = self._with_lora(model)
        model.train()
        return model, teacher

    def _with_lora(self, model):
        from peft import LoraConfig, get_peft_model

        o = self.opts
        if o.init_adapter:
            return self._continue_adapter(model, o.init_adapter)
        targets = o.lora_targets if o.lora_targets == "all-linear" else [t.strip() for t in o.lora_targets.split(",")]
        keep = [m.strip() for m in o.lora_modules_to_save.split(",") if m.strip()] or None
        config = LoraConfig(r=o.lora_rank, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                            target_modules=targets, modules_to_save=keep, task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
                warnings.simplefilter("ignore", FutureWarning)
                return get_peft_model(model, config)
        except ValueError as exc:
            raise SortedChatError(f"--lora-targets {o.lora_targets}: {exc}") from None

    def _continue_adapter(self, model, source: str):
        """--init-adapter: a saved adapter, trainable, so a run continues where an earlier one stopped (one
        more epoch without a new adapter stacked on a merged copy). Its rank and alpha must be the ones this
        run records; its own target modules are kept."""
        from peft import PeftConfig, get_peft_model
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        o = self.opts
        directory = SHIPPED_ADAPTER if source == "default" else Path(source).expanduser()
        if not (directory / "adapter_config.json").is_file():
            raise SortedChatError(f"--init-adapter {source}: no adapter_config.json there (a PEFT adapter directory)")
        saved = PeftConfig.from_pretrained(str(directory))
        kind = getattr(saved.peft_type, "value", saved.peft_type)
        if kind != "LORA":
            raise SortedChatError(f"--init-adapter {source}: a {kind} adapter; only LoRA adapters can be continued")
        if (saved.r, saved.lora_alpha) != (o.lora_rank, o.lora_alpha):
            raise SortedChatError(f"--init-adapter {source}: a LoRA adapter of rank {saved.r}, alpha "
                                  f"{saved.lora_alpha}; this run asks for --lora-rank {o.lora_rank} "
                                  f"--lora-alpha {o.lora_alpha}")
        saved.inference_mode = False
        try:  # another base's adapter: modules it targets are missing, or shapes differ
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = get_peft_model(model, saved)
                loaded = set_peft_model_state_dict(model, load_peft_weights(str(directory), device="cpu"))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SortedChatError(f"--init-adapter {source}: does not fit --model {o.model}: "
                                  f"{first_line(exc)}") from None
        missing = [k for k in loaded.missing_keys if "lora_" in k]
        if loaded.unexpected_keys or missing:
            name = (loaded.unexpected_keys or missing)[0]
            raise SortedChatError(f"--init-adapter {source}: does not fit --model {o.model}: "
                                  f"{len(loaded.unexpected_keys)} of its weights have no place in the model and "
                                  f"{len(missing)} of the model's adapter weights are not in it (e.g. {name})")
        self._say(f"LoRA adapter starts from {source}")
        return model

    def _encode(self) -> None:
        o = self.opts
        self.train_enc, dropped = encode_all(self.train_set.examples, self.tokenizer, o.template, o.max_length)
        if dropped:
            self._say(f"{dropped} records dropped: their response starts after --max-length {o.max_length} tokens")
        self.eval_enc = []
        if self.eval_set is not None:
            self.eval_enc, _ = encode_all(self.eval_set.examples, self.tokenizer, o.template, o.max_length)
        W = self.acc.num_processes
        self.global_batch = o.batch_size * o.grad_accum * W
        self.per_epoch = steps_per_epoch(len(self.train_enc), self.global_batch)
        if self.per_epoch == 0:
            raise SortedChatError(f"--batch-size: one step takes {self.global_batch} records "
                                  f"(batch {o.batch_size} x accumulation {o.grad_accum} x {W} processes); "
                                  f"the data has {len(self.train_enc)}")
        self.total_steps = o.max_steps or o.epochs * self.per_epoch
        self.warmup = o.warmup_steps or math.ceil(o.warmup_ratio * self.total_steps)
        self.teacher_top = None
        # A trained decoder needs the teacher's top-K cached (else a teacher pass every step); a frozen one
        # (--method lens) is its own teacher: each step's forward yields the top-K at no extra pass.
        # the teacher is the base's full depth: a fresh LoRA's B = 0, a continued one is off
        if o.kd_top_k and self.method.trains_decoder:

            weights = self.sm.weights_path
            identity = model_identity(weights) if Path(weights).is_dir() else weights
            model = self.objective.model
            base_only = model.disable_adapter() if o.init_adapter else contextlib.nullcontext()
            with self.acc.main_process_first(), base_only:
                self.teacher_top = teacher_top_k(model, identity, self.train_enc, o.kd_top_k, self.acc.device,
                                                 self._say)

    def _build_optimizer(self) -> None:
        from transformers import get_scheduler

        o = self.opts
        lens_ids = {id(p) for p in self.objective.exit_lenses.parameters()} if self.objective.exit_lenses else set()
        params = [p for p in self.objective.parameters() if p.requires_grad and id(p) not in lens_ids]
        groups = [{"params": params}] if params else []
        if lens_ids:
            groups.append({"params": list(self.objective.exit_lenses.parameters()), "lr": o.lens_lr or o.lr})
        optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[o.schedule], optimizer, num_warmup_steps=self.warmup,
                                       num_training_steps=self.total_steps)
        self.objective, self.optimizer = self.acc.prepare(self.objective, optimizer)
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]
        self.acc.register_for_checkpointing(self.scheduler)
        self.acc.register_save_state_pre_hook(ckpt.keep_only_trainable)
        n = sum(p.numel() for p in self.trainable)
        self._say(f"{self.opts.method} on exits {','.join(map(str, self.loss_exits))} of {self.sm.num_layers} layers · "
                  f"{n / 1e6:.2f}M trainable parameters · {self.total_steps} steps of {self.global_batch} records "
                  f"({self.per_epoch} per epoch) · device {self.acc.device}"
                  + (f" x {self.acc.num_processes}" if self.acc.num_processes > 1 else "")
                  + (f" · {self.acc.mixed_precision}" if self.acc.mixed_precision != "no" else ""))

    # -- one step ----------------------------------------------------------------------------------
    def exits_for_step(self, step: int) -> tuple[list[int], list[float]]:
        """The exits trained at `step` and their loss weights (summing to 1); sampled from (seed, step)."""
        o, exits = self.opts, self.loss_exits
        n = o.exits_per_step
        if n and n < len(exits):
            gen = torch.Generator().manual_seed(o.seed * 7919 + step)
            if self.method.keeps_last:
                pool = exits[:-1]
                drawn = torch.randperm(len(pool), generator=gen)[: n - 1].tolist()
                exits = sorted(pool[i] for i in drawn) + [exits[-1]]
            else:
                exits = sorted(exits[i] for i in torch.randperm(len(exits), generator=gen)[:n].tolist())
        weights = [self.exit_weight[e] for e in exits]
        total = sum(weights) or 1.0
        return exits, [w / total for w in weights]

    def _batch(self, encoded, rows: list[list[int]], step: int | None = None) -> dict:
        """A micro-batch's tensors on the device; in training with cached teacher top-K, also the rows of
        this micro-batch's scored positions and the step's sampled negatives."""
        batch = {k: v.to(self.acc.device) for k, v in collate_rows(encoded, rows, self.pad_id).items()}
        if step is not None and self.opts.kd_top_k:
            batch["negatives"] = self._negatives(step)
            if self.teacher_top is not None:
                ids, logp = self.teacher_top.gather([i for row in rows for i in row])
                batch["teacher_top"] = (ids.to(self.acc.device), logp.to(self.acc.device))
        return batch

    def _negatives(self, step: int) -> torch.Tensor:
        """`--kd-negatives` distinct vocabulary ids, a function of (seed, step): shared by a step's positions."""
        vocab = lm_head_of(self.acc.unwrap_model(self.objective).model).weight.shape[0]
        gen = torch.Generator().manual_seed(self.opts.seed * 104_729 + step)
        n = min(self.opts.kd_negatives, vocab)
        return torch.randperm(vocab, generator=gen)[:n].to(self.acc.device)

    def dropped_layers(self, step: int) -> tuple[int, ...]:
        """The decoder layers (0-based) that `--layer-dropout` skips at `step`, from (seed, step): layer l of
        L is dropped with probability rate * l / (L - 1), so the first never and the last at the full rate."""
        rate, L = self.opts.layer_dropout, self.sm.num_layers
        if not rate:
            return ()
        gen = torch.Generator().manual_seed(self.opts.seed * 15_485_863 + step)
        draws = torch.rand(L, generator=gen)
        return tuple(i for i in range(L) if draws[i] < rate * i / max(L - 1, 1))

    def _micro_batches(self, step: int) -> list[list[list[int]]]:
        o = self.opts
        indices = step_indices(len(self.train_enc), self.global_batch, o.seed, step)
        if o.pack:
            return packed_micro_batches(self.train_enc, indices, o.batch_size, o.max_length)
        return micro_batches(self.train_enc, indices, o.batch_size)

    def train_step(self, step: int) -> dict:
        """One optimizer step over the global batch of `step`; returns its losses and token count."""
        o, acc = self.opts, self.acc
        W = acc.num_processes
        mbs = self._micro_batches(step)
        normalizer = sum(self.train_enc[i].targets for mb in mbs for row in mb for i in row)
        exits, coefs = self.exits_for_step(step)
        # accelerate divides by the accumulation steps and DDP averages over processes: undo both, so the
        # gradient is that of the mean over every response token of the global batch.
        scale = torch.tensor(coefs, dtype=torch.float32, device=acc.device) * (W * o.grad_accum / normalizer)
        sums = self._forward_backward(step, mbs[acc.process_index::W], exits, scale)
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        if W > 1:
            sums = acc.reduce(sums, "sum")
        return self._step_stats(sums, exits, coefs, normalizer)

    def _forward_backward(self, step: int, mbs: list, exits: list[int], scale: torch.Tensor) -> torch.Tensor:
        """This process's micro-batches of `step` through the objective, the optimizer stepping as accelerate
        accumulates: the summed CE per exit, KL per exit, and the token count, in one tensor."""
        o, acc = self.opts, self.acc
        ce_sums = torch.zeros(len(exits), device=acc.device)
        kl_sums = torch.zeros(len(exits), device=acc.device)
        tokens = torch.zeros((), device=acc.device)
        skip = self.dropped_layers(step)
        for mb in mbs:
            batch = self._batch(self.train_enc, mb, step) | {"skip_layers": skip}
            tokens += sum(len(self.train_enc[i].input_ids) for row in mb for i in row)
            with acc.accumulate(self.objective):
                total, ce, kl = self.objective(**batch, exits=exits, coefs=scale)
                acc.backward(total)
                if acc.sync_gradients and o.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.trainable, o.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            ce_sums += ce.detach()
            kl_sums += kl.detach()
        return torch.cat([ce_sums, kl_sums, tokens[None]])

    def _step_stats(self, sums: torch.Tensor, exits: list[int], coefs: list[float], normalizer: int) -> dict:
        """The step's loss, mean CE per exit (over the global batch's response tokens), tokens and lr."""
        n = len(exits)
        ce_mean = (sums[:n] / normalizer).tolist()
        kl_mean = (sums[n : 2 * n] / normalizer).tolist()
        alpha = self.objective_alpha
        loss = sum(c * (alpha * ce + (1 - alpha) * kl) for c, ce, kl in zip(coefs, ce_mean, kl_mean))
        return {"loss": loss, "exit_ce": dict(zip(exits, ce_mean)), "tokens": int(sums[-1].item()),
                "targets": normalizer, "lr": self.scheduler.get_last_lr()[0]}

    @property
    def objective_alpha(self) -> float:
        return self.acc.unwrap_model(self.objective).alpha

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[int, dict[str, float]]:
        """Response-token CE and perplexity of every exit on the evaluation data."""
        if not self.eval_enc:
            return {}
        acc, W = self.acc, self.acc.num_processes
        self.objective.eval()
        mbs = micro_batches(self.eval_enc, list(range(len(self.eval_enc))), self.opts.batch_size)
        sums = torch.zeros(2 * len(self.exits) + 1, device=acc.device)
        n_exits = len(self.exits)
        coefs = torch.zeros(len(self.exits), device=acc.device)
        rounds = math.ceil(len(mbs) / W)  # every process runs as many forwards (FSDP gathers in each)
        for r in range(rounds):
            i = r * W + acc.process_index
            mb = mbs[min(i, len(mbs) - 1)]
            _, ce, _, agree = self.objective(**self._batch(self.eval_enc, mb), exits=self.exits, coefs=coefs,
                                             agreement=True)
            if i < len(mbs):
                sums[:n_exits] += ce
                sums[n_exits:-1] += agree
                sums[-1] += sum(self.eval_enc[row[0]].targets for row in mb)
        if W > 1:
            sums = acc.reduce(sums, "sum")
        self.objective.train()
        if not self.method.trains_decoder:
            acc.unwrap_model(self.objective).model.eval()
        n = sums[-1].item()
        return {e: {"ce": sums[i].item() / n, "ppl": math.exp(min(sums[i].item() / n, 50)),
                    "agree": sums[n_exits + i].item() / n} for i, e in enumerate(self.exits)}

    # -- the run -----------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the run it continues."""
        o = self.opts
        return {
            "model": o.model, "data": self.train_set.source, "data_sha256": self.train_set.sha256,
            "holdout": o.holdout, "template": o.template, "max_length": o.max_length, "method": o.method,
            "objective": o.objective, "exits": self.exits, "exit_weights": o.exit_weights,
            "exits_per_step": o.exits_per_step, "total_steps": self.total_steps, "lr": o.lr,
            "lenses": trains_lenses(o.method, o.lenses), "lens_lr": o.lens_lr, "init_lenses": o.init_lenses,
            "init_adapter": o.init_adapter,
            "kd_top_k": o.kd_top_k, "kd_negatives": o.kd_negatives, "pack": o.pack, "layer_dropout": o.layer_dropout,
            "schedule": o.schedule, "warmup_steps": self.warmup, "weight_decay": o.weight_decay,
            "global_batch": self.global_batch, "seed": o.seed, "lora": self._lora_settings(),
        }

    def _lora_settings(self) -> dict | None:
        o = self.opts
        if not o.lora:
            return None
        return {"rank": o.lora_rank, "alpha": o.lora_alpha, "dropout": o.lora_dropout, "targets": o.lora_targets,
                "modules_to_save": o.lora_modules_to_save or None,
                "quantized": "4bit" if o.load_in_4bit else "8bit" if o.load_in_8bit else None}

    def _record(self, line: dict) -> None:
        """One line of metrics.jsonl; a full disk costs the line (with a warning), not the run."""
        if self.main:
            try:
                with open(self.out / METRICS_NAME, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(line) + "\n")
            except OSError as exc:
                self._say(f"[yellow]warning: could not add step {line.get('step')} to {self.out / METRICS_NAME} "
                          f"({exc.strerror or exc})[/yellow]")

    def _resume(self) -> int:
        found = ckpt.checkpoint_dirs(self.out)
        if not found:
            raise SortedChatError(f"--resume: no checkpoint in {self.out / ckpt.CHECKPOINTS}")
        _, path = found[-1]
        state = ckpt.load_checkpoint(self.acc, path)
        ckpt.check_same_run(state.get("run", {}), json.loads(json.dumps(self.fingerprint())), path)
        self.tokens_seen, self.elapsed = state.get("tokens", 0), state.get("seconds", 0.0)
        if self.main:  # forget metrics logged after the checkpoint: those steps run again
            metrics = self.out / METRICS_NAME
            if metrics.is_file():
                kept = [ln for ln in metrics.read_text(encoding="utf-8").splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= state["step"]]
                atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
        self._say(f"resuming from {path} (step {state['step']} of {self.total_steps})")
        return state["step"]

    def save_checkpoint(self, step: int) -> Path:
        state = {"step": step, "tokens": self.tokens_seen, "seconds": self.elapsed, "run": self.fingerprint()}
        return ckpt.save_checkpoint(self.acc, self.out, step, state, self.opts.keep_checkpoints)

    def _stop_agreed(self) -> bool:
        if self.acc.num_processes == 1:
            return self._stop
        flag = self.acc.reduce(torch.tensor([float(self._stop)], device=self.acc.device), "sum")
        return bool(flag.item() > 0)

    def _on_interrupt(self, previous):
        def handler(signum, frame):
            self._stop = True
            signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
            if self.main:
                self.console.print("[yellow]Ctrl+C: finishing this step and saving a checkpoint "
                                   "(press again to abort without saving)[/yellow]")
        return handler

    def run(self, callback=None) -> TrainResult:
        """Train to the last step (or until Ctrl+C), checkpointing and logging on the way; then export."""
        self.out.mkdir(parents=True, exist_ok=True)
        step = self._resume() if self.opts.resume else 0
        previous = self._catch_interrupt()
        try:
            step, last_train, interrupted = self._train_steps(step, callback)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if interrupted:
            return TrainResult(self.out, step, self.total_steps, True, self.save_checkpoint(step))
        metrics = {"train": last_train, "eval": self.evaluate()}
        if metrics["eval"]:
            self._record({"step": step, "eval": metrics["eval"]})
        not_exported = self.export(step, metrics)
        try:
            path = self.save_checkpoint(step)
        except ckpt.NotSaved as exc:
            if not_exported:
                raise SortedChatError(f"{not_exported}, and {exc}") from None
            raise SortedChatError(f"the model is saved in {self.out}, but {exc}") from None
        if not_exported:
            raise SortedChatError(f"{not_exported}; the final checkpoint is saved in {path}: free some space and run "
                                  "the same command with --resume to write the model")
        return TrainResult(self.out, step, self.total_steps, False, path, metrics)

    def _catch_interrupt(self):
        """Ctrl+C finishes the step instead of raising; the handler it replaces (None off the main thread,
        where Python cannot install one)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_interrupt(previous))
        return previous

    def _train_steps(self, step: int, callback) -> tuple[int, dict[int, float], bool]:
        """Steps from `step` until the last one or an agreed stop: the step reached, the exit CEs logged last,
        and whether the run stopped before its last step."""
        o = self.opts
        window, last_train = _LogWindow(), {}
        with TrainProgress(self.total_steps, step, self.console, self.main, o.log_interval) as progress:
            while step < self.total_steps:
                stats, seconds = self._timed_step(step)
                step += 1
                window.add(stats, seconds)
                means = window.exit_means()
                progress.update(step, window.mean_loss(), means, window.rate(), stats["lr"])
                if step % o.log_interval == 0 or step == self.total_steps:
                    last_train = means
                    self._record({"step": step, "loss": window.mean_loss(), "lr": stats["lr"], "exit_ce": means,
                                  "tokens": self.tokens_seen, "tokens_per_second": window.rate(),
                                  "seconds": self.elapsed})
                    window = _LogWindow()
                self._evaluate_and_save_at_intervals(step, progress)
                if callback is not None:
                    callback(step)
                if self._stop_agreed():
                    return step, last_train, step < self.total_steps
        return step, last_train, False

    def _timed_step(self, step: int) -> tuple[dict, float]:
        """One optimizer step, added to the run's time and token count: its stats and its seconds."""
        t0 = time.perf_counter()
        stats = self.train_step(step)
        seconds = time.perf_counter() - t0
        self.elapsed += seconds
        self.tokens_seen += stats["tokens"]
        return stats, seconds

    def _evaluate_and_save_at_intervals(self, step: int, progress: TrainProgress) -> None:
        """Mid-run evaluation and checkpoints; the last step gets both from `run`."""
        o = self.opts
        if o.eval_interval and step % o.eval_interval == 0 and step < self.total_steps:
            ev = self.evaluate()
            self._record({"step": step, "eval": ev})
            progress.print(f"eval @ {step}: " + format_exit_losses({e: m["ce"] for e, m in ev.items()}))
        if o.save_interval and step % o.save_interval == 0 and step < self.total_steps:
            try:
                self.save_checkpoint(step)
            except ckpt.NotSaved as exc:
                if self.main:
                    progress.print(f"[yellow]warning: {exc}; training goes on[/yellow]")

    def export(self, step: int, metrics: dict) -> str | None:
        """Write the model into OUT; why it could not be written (a full disk), None once it is there."""
        from accelerate.utils import DistributedType

        o, acc = self.opts, self.acc
        acc.wait_for_everyone()
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        full_state = acc.get_state_dict(self.objective) if sharded else None
        if self.main:
            inner = acc.unwrap_model(self.objective)
            # An adapter, or only the trained exit parts (`writes_weights` False): sortedchat.json names the base.
            adapter = (o.lora and not o.merge) or not self.method.writes_weights
            config = SortedConfig(exits=self.exits, base_model=base_model_name(o.model) if adapter else None,
                                  training=self._training_record(step, metrics))
            try:
                with self.console.status("writing the model", spinner="dots"):
                    export_model(self.out, inner.model, self.tokenizer, config, full_state, inner.exit_heads,
                                 o.merge, inner.exit_lenses, weights=self.method.writes_weights)
            except Exception as exc:
                reason = write_error(exc, self.out)
                if reason is None:
                    raise
                acc.wait_for_everyone()
                return f"could not write the model into {self.out} ({reason})"
            self.console.print(f"saved to {self.out}")
        acc.wait_for_everyone()
        return None

    def _training_record(self, step: int, metrics: dict) -> dict:
        o = self.opts
        data = self.train_set.describe() | {"holdout": o.holdout}
        return {
            "method": o.method, "objective": o.objective, "exits_trained": self.loss_exits,
            "exit_weights": o.exit_weights, "exits_per_step": o.exits_per_step, "recipe": o.recipe,
            "model": o.model, "data": data,
            "eval_data": self.eval_set.describe() if self.eval_set and o.eval_data else None,
            "template": o.template, "max_length": o.max_length, "steps": step, "total_steps": self.total_steps,
            "epochs": round(step / self.per_epoch, 3), "seed": o.seed, "global_batch": self.global_batch,
            "lr": o.lr, "schedule": o.schedule, "warmup_steps": self.warmup, "lora": self._lora_settings(),
            "merged": o.merge, "mixed_precision": self.acc.mixed_precision, "processes": self.acc.num_processes,
            "gradient_checkpointing": o.gradient_checkpointing, "tokens": self.tokens_seen,
            "seconds": round(self.elapsed, 1), "metrics": metrics,
            "options": {k: v for k, v in o.to_dict().items() if k not in ("out", "resume")},
        }


@dataclass
class _LogWindow:
    """Running sums over one log interval; an exit's CE is averaged over the steps that trained it."""

    ce: dict[int, float] = field(default_factory=dict)
    n: dict[int, int] = field(default_factory=dict)
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, stats: dict, seconds: float) -> None:
        for e, v in stats["exit_ce"].items():
            self.ce[e] = self.ce.get(e, 0.0) + v
            self.n[e] = self.n.get(e, 0) + 1
        self.loss += stats["loss"]
        self.steps += 1
        self.tokens += stats["tokens"]
        self.seconds += seconds

    def mean_loss(self) -> float:
        return self.loss / self.steps

    def exit_means(self) -> dict[int, float]:
        return {e: self.ce[e] / self.n[e] for e in self.ce}

    def rate(self) -> float:
        """Tokens per second over the window."""
        return self.tokens / max(self.seconds, 1e-9)


def train(opts: TrainOptions, console: Console | None = None, callback=None) -> TrainResult:
    """Set up and run one training run (the `sortedchat train` command without its argument parsing)."""
    return Trainer(opts, console).setup().run(callback)
