"""Resumable checkpoints in `OUT/checkpoints/step-NNNNNNNN/`, written so that a crash never leaves a broken one.

accelerate writes the state (trainable weights, optimizer, RNG states, the scheduler and, under FSDP or
DeepSpeed, their sharded layouts) into a hidden temporary directory; only when every process is done is it
renamed into place. A directory named `step-*` is therefore always complete, and pruning renames an old one
to a hidden name before deleting it, so a kill during the delete leaves nothing that looks like a checkpoint.
`trainer_state.json` lists every file with its size; resuming checks them first. Only trainable weights are
stored: a LoRA checkpoint holds the adapter, not the frozen base.

A write that fails (a full disk) removes the temporary directory, keeps the older checkpoints and raises
`NotSaved`, one line that names the newest checkpoint still there; the trainer decides what follows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sortedchat import SortedChatError
from sortedchat.config import atomic_write_text
from sortedchat.outputs import write_error

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / CHECKPOINTS
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        try:
            found.append((int(p.name.split("-", 1)[1]), p))
        except ValueError:
            continue
    return sorted(found)


def keep_only_trainable(models, weights, output_dir) -> None:
    """accelerate save hook: drop frozen tensors (a LoRA run stores its adapter, not the base)."""
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in list(state):
            if key not in trainable:
                del state[key]


class NotSaved(SortedChatError):
    """A checkpoint could not be written: its temporary directory is gone, the older checkpoints are kept."""


def _write_failure(write, folder: Path) -> str | None:
    """Run `write()` (into `folder`); why it failed when it is a failed write (a full disk), None when it worked."""
    try:
        write()
    except Exception as exc:
        reason = write_error(exc, folder)
        if reason is None:
            raise
        return reason
    return None


def _agreed(accelerator, reason: str | None) -> str | None:
    """Whether a write failed on any process (each calls this): its reason, as this process knows it."""
    if getattr(accelerator, "num_processes", 1) == 1:
        return reason
    import torch

    flag = accelerator.reduce(torch.tensor([float(reason is not None)], device=accelerator.device), "sum")
    return reason or ("a write failed on another process" if flag.item() > 0 else None)


def _fresh(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _publish(tmp: Path, final: Path, trainer_state: dict) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    atomic_write_text(tmp / STATE_NAME, json.dumps(dict(trainer_state, files=files), indent=2) + "\n")
    tmp.rename(final)


def save_checkpoint(accelerator, out: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save on every process, publish atomically from the main one, then drop all but the newest `keep`."""
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    if final.is_dir():  # already saved at this step (e.g. Ctrl+C right after a scheduled save)
        return final
    tmp = root / f".tmp-step-{step:08d}"
    main = accelerator.is_main_process
    reason = _write_failure(lambda: _fresh(tmp), root) if main else None
    accelerator.wait_for_everyone()
    reason = reason or _write_failure(lambda: accelerator.save_state(str(tmp)), root)
    accelerator.wait_for_everyone()
    if main and reason is None:
        reason = _write_failure(lambda: _publish(tmp, final, trainer_state), root)
    reason = _agreed(accelerator, reason)
    if reason is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        older = checkpoint_dirs(out)
        kept = f"the newest checkpoint is still {older[-1][1]}" if older else "no earlier checkpoint was saved"
        raise NotSaved(f"could not write the checkpoint of step {step} into {root} ({reason}); {kept}")
    if main:
        for left in root.glob(".pruned-step-*"):  # a kill interrupted an earlier prune
            shutil.rmtree(left, ignore_errors=True)
        for _, old in checkpoint_dirs(out)[:-keep]:
            pruned = old.rename(root / f".pruned-{old.name}")
            shutil.rmtree(pruned, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the trainer state saved with them."""
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SortedChatError(f"--resume: {path} is not a usable checkpoint ({exc})") from None
    verify_checkpoint(path, state)
    accelerator.load_state(str(path), strict=False)
    return state


def verify_checkpoint(path: Path, state: dict) -> None:
    """Every file the checkpoint was saved with is there at its size; else say which is not, and what to do."""
    files = state.get("files")
    if files is None:  # saved before checkpoints listed their files: at least the weights
        files = {} if any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*")) \
            else {"model.safetensors": None}
    for name, size in files.items():
        f = path / name
        if not f.is_file() or (size is not None and f.stat().st_size != size):
            why = "is missing" if not f.is_file() else f"has {f.stat().st_size} bytes, not {size}"
            older = [p for _, p in checkpoint_dirs(path.parent.parent) if p != path and p.name < path.name]
            then = (f"delete that folder to resume from {older[-1].name}" if older
                    else "delete that folder and start again without --resume")
            raise SortedChatError(f"--resume: {path} is incomplete ({name} {why}); {then}")


def check_same_run(saved: dict, current: dict, path: Path) -> None:
    """A resumed run must be the run that was interrupted: name the first setting that differs."""
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise SortedChatError(
                f"--resume: {path} was trained with {key}={saved[key]!r}, this run has {key}={value!r}"
            )
