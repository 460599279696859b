"""The frozen teacher's top-K next-token distribution at every scored position, computed once and cached.

Distilling the exits toward the starting model's full depth (`--objective kd`, `ce+kd`) used to run the
teacher and a full-vocabulary KL at every step. The teacher never changes, so its distribution at each
response position is a function of (model, tokens) alone: compute it once per record, keep the K most
likely ids and their log-probabilities (the rest of the mass is one "rest" bucket), and every later step
and epoch reads them. The cache file is keyed on the model's weight files, the encoded records and K, so
a different model, data, template, max length or K never reads a stale one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sortedchat.config import atomic_write
from sortedchat.paths import cache_dir
from sortedchat.training.templates import IGNORE, Encoded

CACHE_FORMAT = 1


@dataclass
class TeacherTopK:
    """Per record: the teacher's top-K ids [n, K] and log-probs [n, K] at its n scored positions, in order."""

    ids: list[torch.Tensor]
    logp: list[torch.Tensor]

    def gather(self, records: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `records`, concatenated in that order (the order the objective flattens positions)."""
        return torch.cat([self.ids[r] for r in records]).long(), torch.cat([self.logp[r] for r in records]).float()


def model_identity(directory: str | os.PathLike) -> str:
    """Names, sizes and modification times of a model directory's weight and config files."""
    parts = []
    for p in sorted(Path(directory).iterdir()):
        if p.suffix in (".safetensors", ".json", ".bin") and p.is_file():
            st = p.stat()
            parts.append(f"{p.name}|{st.st_size}|{st.st_mtime_ns}")
    return "\n".join(parts)


def cache_key(identity: str, encoded: list[Encoded], k: int) -> str:
    digest = hashlib.sha256(f"teacher-top-k v{CACHE_FORMAT}|{identity}|k={k}".encode())
    for e in encoded:
        digest.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
        digest.update(torch.tensor(e.labels, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute_top_k(model, encoded: list[Encoded], k: int, device: torch.device, max_tokens: int = 4096,
                  progress=None) -> TeacherTopK:
    """Run the frozen model over every record (grouped by length, `max_tokens` per call) and keep its
    top-K at the positions whose next token is scored (labels != IGNORE), in float32."""
    was_training = model.training
    model.eval()
    ids_out: list[torch.Tensor | None] = [None] * len(encoded)
    logp_out: list[torch.Tensor | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    done, start = 0, 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(encoded[order[end]].input_ids) <= max_tokens:
            end += 1
        group = order[start:end]
        width = max(len(encoded[i].input_ids) for i in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(group):
            n = len(encoded[i].input_ids)
            ids[row, :n] = torch.tensor(encoded[i].input_ids)
            mask[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, i in enumerate(group):
            labels = torch.tensor(encoded[i].labels)
            select = (labels[1:] != IGNORE).nonzero().squeeze(1).to(device)
            logp = torch.log_softmax(logits[row, select].float(), dim=-1)
            top = logp.topk(min(k, logp.shape[-1]), dim=-1)
            ids_out[i] = top.indices.to(torch.int32).cpu()
            logp_out[i] = top.values.cpu()
        done += len(group)
        start = end
        if progress is not None:
            progress(done, len(encoded))
    if was_training:
        model.train()
    return TeacherTopK(ids_out, logp_out)  # type: ignore[arg-type]


def save(path: Path, top: TeacherTopK) -> None:
    """One safetensors file: concatenated rows plus per-record lengths; written atomically."""
    lengths = torch.tensor([t.shape[0] for t in top.ids], dtype=torch.int64)
    state = {"ids": torch.cat(top.ids), "logp": torch.cat(top.logp), "lengths": lengths}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load(path: Path) -> TeacherTopK:
    data = load_file(str(path))
    lengths = data["lengths"].tolist()
    return TeacherTopK(list(data["ids"].split(lengths)), list(data["logp"].split(lengths)))


def teacher_top_k(model, identity: str, encoded: list[Encoded], k: int, device: torch.device,
                  say=print) -> TeacherTopK:
    """The cached top-K for these records, computing and storing it on a miss."""
    path = cache_dir() / "teacher-top-k" / f"{cache_key(identity, encoded, k)}.safetensors"
    if path.is_file():
        top = load(path)
        if len(top.ids) == len(encoded):
            say(f"teacher top-{k}: read from {path}")
            return top
    say(f"teacher top-{k}: one pass of the frozen model over {len(encoded)} records (cached in {path.parent})")
    top = compute_top_k(model, encoded, k, device)
    save(path, top)
    return top
