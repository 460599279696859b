"""The model's own answers as training text: sampled replies to instructions, questions and passages.

Distilling the exits toward the model's own full depth needs no human answers, and the model's own replies
are exactly the text it later decodes. This module turns prompt sources (Alpaca instructions, closed-book
questions, plain-text articles cut into passages) into chat JSONL records (`messages`) that `sortedchat
train --data` reads. Generation is batched with transformers' `generate` (left padding, prompts sorted by
length); records are appended to the output as each batch finishes, so an interrupted run resumes where
it stopped (prompts already answered, counted per sample, are skipped).

`python -m sortedchat.training.selfgen` follows the command line's rules: the model loads as `--model` does
everywhere (`loading`: safetensors only, a one-line error for what cannot load), inputs and outputs are
checked before the model loads, and errors a user can fix end it with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sortedchat import SortedChatError
from sortedchat.config import atomic_write_text
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.outputs import check_output_file
from sortedchat.training.data import load_records

PASSAGE_TASKS = (
    "Summarize the following passage in two or three sentences.",
    "What is the main point of this passage? Answer briefly.",
    "Write one question that this passage answers, then answer it.",
    "Explain this passage in simple words.",
)


@dataclass(frozen=True)
class Prompt:
    """One user message to answer, with the name of its source (for the record and the cache key)."""

    key: str
    text: str
    max_new_tokens: int


def alpaca_prompts(path: Path, skip_last: int, max_new_tokens: int) -> list[Prompt]:
    """Instructions (with their input) of an Alpaca JSON file, leaving out the last `skip_last` records."""
    records = json.loads(path.read_text(encoding="utf-8"))
    keep = records[: len(records) - skip_last] if skip_last else records
    out = []
    for i, r in enumerate(keep):
        text = r["instruction"].strip()
        if r.get("input", "").strip():
            text += "\n\n" + r["input"].strip()
        out.append(Prompt(f"alpaca:{i}", text, max_new_tokens))
    return out


def question_prompts(path: Path, max_new_tokens: int) -> list[Prompt]:
    """Closed-book questions of a QA JSONL file (one JSON object per line; lines end at \\n only)."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        if line.strip():
            out.append(Prompt(f"qa:{i}", json.loads(line)["question"].strip(), max_new_tokens))
    return out


def passage_prompts(path: Path, max_new_tokens: int, passage_chars: int = 700,
                    limit: int | None = None) -> list[Prompt]:
    """Passages of a plain-text file (one article per line), each paired with one of PASSAGE_TASKS in turn."""
    out = []
    for a, article in enumerate(path.read_text(encoding="utf-8").split("\n")):
        sentences = re.split(r"(?<=[.!?])\s*(?=[A-Z])", article.strip())
        passage, n = "", 0
        for s in sentences:
            passage = f"{passage} {s}".strip()
            if len(passage) >= passage_chars:
                task = PASSAGE_TASKS[len(out) % len(PASSAGE_TASKS)]
                out.append(Prompt(f"wiki:{a}:{n}", f"{task}\n\n{passage}", max_new_tokens))
                passage, n = "", n + 1
    return out[:limit] if limit else out


def passage_continuations(path: Path, passage_chars: int = 700) -> list[dict]:
    """Chat records with real text as the answer, no generation: "Continue this passage" + its first half,
    answered by its second half. Distillation toward the model's own full depth scores every answer token,
    so human text is as usable as sampled text, and costs nothing to make."""
    out = []
    for a, article in enumerate(path.read_text(encoding="utf-8").split("\n")):
        sentences = re.split(r"(?<=[.!?])\s*(?=[A-Z])", article.strip())
        passage: list[str] = []
        for s in sentences:
            passage.append(s)
            if sum(len(x) for x in passage) >= passage_chars and len(passage) >= 2:
                half = len(passage) // 2
                out.append({"source": f"wiki-continue:{a}:{len(out)}", "messages": [
                    {"role": "user", "content": "Continue this passage:\n\n" + " ".join(passage[:half])},
                    {"role": "assistant", "content": " ".join(passage[half:])}]})
                passage = []
    return out


def training_corpus(alpaca: Path, questions: Path | None, passages: Path | None, replies: Path | None,
                    holdout: int, out: Path) -> dict[str, int]:
    """One chat JSONL for `sortedchat train`: the Alpaca records but the last `holdout`, closed-book
    questions with their answers, passage continuations and the model's own replies (if any were made).
    Written atomically, ASCII-escaped (one record per line whatever the text holds). Returns counts."""
    records = json.loads(alpaca.read_text(encoding="utf-8"))
    rows = []
    for i, r in enumerate(records[: len(records) - holdout]):
        user = r["instruction"].strip() + ("\n\n" + r["input"].strip() if r.get("input", "").strip() else "")
        rows.append({"source": f"alpaca:{i}", "messages": [{"role": "user", "content": user},
                                                         {"role": "assistant", "content": r["output"]}]})
    counts = {"alpaca": len(rows)}
    if questions:
        qa = [json.loads(x) for x in questions.read_text(encoding="utf-8").split("\n") if x.strip()]
        rows += [{"source": f"qa:{i}", "messages": [{"role": "user", "content": q["question"]},
                                                    {"role": "assistant", "content": q["answer"]}]}
                 for i, q in enumerate(qa)]
        counts["questions"] = len(qa)
    if passages:
        cont = passage_continuations(passages)
        rows += cont
        counts["passages"] = len(cont)
    if replies and replies.is_file():
        own = [json.loads(x) for x in replies.read_text(encoding="utf-8").split("\n") if x.strip().endswith("}")]
        rows += own
        counts["own replies"] = len(own)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return counts


def _done_keys(path: Path) -> dict[str, int]:
    """How many samples of each prompt key the output already holds (a torn last line is ignored)."""
    counts: dict[str, int] = {}
    if not path.is_file():
        return counts
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            key = json.loads(line)["source"]
        except (ValueError, KeyError, TypeError):
            continue
        counts[key] = counts.get(key, 0) + 1
    return counts


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[Prompt], out_path: Path, samples: int = 1, batch_size: int = 32,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, log=print) -> int:
    """Sample `samples` replies per prompt and append them to `out_path` as chat records; returns how many."""
    done = _done_keys(out_path)
    todo = [p for p in prompts for s in range(samples) if done.get(p.key, 0) <= s]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p.text}], tokenize=False,
                                           add_generation_prompt=True) for p in todo]
    encoded = [tokenizer(chat, add_special_tokens=False)["input_ids"] for chat in chats]
    order = sorted(range(len(todo)), key=lambda i: (todo[i].max_new_tokens, len(encoded[i])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    written = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as out:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            torch.manual_seed(seed + b)
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max(todo[i].max_new_tokens for i in idx),
                                 pad_token_id=pad)
            for row, i in enumerate(idx):
                reply = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
                if not reply:
                    continue
                record = {"source": todo[i].key, "messages": [{"role": "user", "content": todo[i].text},
                                                               {"role": "assistant", "content": reply}]}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            out.flush()
            os.fsync(out.fileno())
            log(f"{b + len(idx)}/{len(order)} replies")
    return written


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the frozen starting model (as `sortedchat --model` takes it)")
    ap.add_argument("--out", required=True, type=Path, help="chat JSONL to append to (resumable)")
    ap.add_argument("--alpaca", type=Path, help="Alpaca JSON: its instructions")
    ap.add_argument("--alpaca-holdout", type=int, default=200, help="leave out the last N Alpaca records")
    ap.add_argument("--alpaca-limit", type=int, default=None, help="answer only the first N instructions")
    ap.add_argument("--questions-limit", type=int, default=None, help="answer only the first N questions")
    ap.add_argument("--questions", type=Path, help="QA JSONL: its questions")
    ap.add_argument("--passages", type=Path, help="plain text, one article per line: passages to summarise")
    ap.add_argument("--passage-limit", type=int, default=None)
    ap.add_argument("--samples", type=int, default=1, help="replies per Alpaca instruction")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, help="instead of generating: write the training corpus (Alpaca but "
                    "the held-out records, questions with answers, passage continuations, and the replies in --out)")
    ap.add_argument("--heldout", type=Path, help="with --corpus: also write the held-out Alpaca records here")
    return ap.parse_args(argv)


def _check_paths(args: argparse.Namespace) -> None:
    """The inputs exist and the outputs can be written, before anything long starts."""
    for flag, path in (("--alpaca", args.alpaca), ("--questions", args.questions), ("--passages", args.passages)):
        if path is not None and not path.is_file():
            raise SortedChatError(f"{flag} {path}: no such file")
    # The record files go through `sortedchat train`'s reader once, so a bad record is one line naming its file
    # and line here, before the model loads, not a traceback halfway through.
    for flag, path, kind in (("--alpaca", args.alpaca, "alpaca"), ("--questions", args.questions, "qa")):
        if path is not None and (found := load_records(str(path), flag=flag).kind) != kind:
            raise SortedChatError(f"{flag} {path}: expected {kind} records, found {found} records")
    if args.corpus and args.alpaca is None:
        raise SortedChatError("--corpus: give --alpaca too (the corpus starts from its records)")
    outputs = [("--corpus", args.corpus), ("--heldout", args.heldout)] if args.corpus else [("--out", args.out)]
    for flag, path in outputs:
        if path is not None:
            check_output_file(path, flag)


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    try:
        _check_paths(args)
        if args.corpus:
            _write_corpus(args)
        else:
            _generate_replies(args)
    except SortedChatError as exc:
        raise SystemExit(f"error: {exc}") from None


def _write_corpus(args: argparse.Namespace) -> None:
    counts = training_corpus(args.alpaca, args.questions, args.passages, args.out, args.alpaca_holdout, args.corpus)
    print(f"{args.corpus}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if args.heldout:
        records = json.loads(args.alpaca.read_text(encoding="utf-8"))[-args.alpaca_holdout:]
        atomic_write_text(args.heldout, json.dumps(records, indent=1) + "\n")


def _generate_replies(args: argparse.Namespace) -> None:
    if not any(src and limit != 0 for src, limit in ((args.alpaca, args.alpaca_limit),
                                                      (args.questions, args.questions_limit),
                                                      (args.passages, args.passage_limit))):
        return  # every source capped at 0: no model to load

    sm = load_sorted_model(args.model, LoadOptions(device="cpu", dtype="float32"))
    model, tokenizer = sm.model, sm.tokenizer
    if args.alpaca and args.alpaca_limit != 0:
        prompts = alpaca_prompts(args.alpaca, args.alpaca_holdout, 160)[: args.alpaca_limit]
        generate(model, tokenizer, prompts, args.out,
                 samples=args.samples, batch_size=args.batch_size, seed=args.seed)
    if args.questions and args.questions_limit != 0:
        generate(model, tokenizer, question_prompts(args.questions, 48)[: args.questions_limit], args.out,
                 batch_size=args.batch_size,
                 seed=args.seed)
    if args.passages and args.passage_limit != 0:
        generate(model, tokenizer, passage_prompts(args.passages, 160, limit=args.passage_limit), args.out,
                 batch_size=args.batch_size, seed=args.seed)


if __name__ == "__main__":
    main()
