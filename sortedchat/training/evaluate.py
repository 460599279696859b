"""`sortedchat eval`: how good each exit of one or more models is, side by side.

Per exit, on the response tokens of the data: cross-entropy, perplexity, top-1 accuracy, and agreement
of the exit's top-1 with the same model's last exit (how often a shallow exit already says what the full
model would), and with `--quantize int8|int4` its agreement with the float32 model's full depth (`agree_f32`). With
QA data also closed-book exact match: the greedy answer generated at that depth
(through the chat engine, so exactly what a user would see) against every alias, normalised the TriviaQA
way. Results go to a table, a JSON file and, if asked, a plot of quality against depth.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from pathlib import Path

import torch

from sortedchat import SortedChatError
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.quantize import quantize_model
from sortedchat.training.data import RecordSet
from sortedchat.training.objectives import CHUNK_ELEMENTS, decoder_of
from sortedchat.training.templates import IGNORE, collate, encode_all, prompt_ids

Tick = Callable[[int], None]
_PUNCTUATION = set(string.punctuation + "‘’´`")


def normalize_answer(text: str) -> str:
    """TriviaQA's answer normalisation: lower case, punctuation to spaces, no articles, single spaces."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, aliases: list[str]) -> bool:
    """Whether the prediction equals any alias after normalisation (an empty prediction never matches)."""
    guess = normalize_answer(prediction)
    return bool(guess) and any(guess == normalize_answer(a) for a in aliases)


def first_answer_line(text: str) -> str:
    """The part of a generated answer that is graded: its first non-empty line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _response_states(sm, encoded, exits: set[int], batch_size: int, tick: Tick | None):
    """Per chunk of response tokens, in one fixed order: the hidden state of each exit in `exits` and the targets
    (a model's full forward per batch of sequences sorted by length; chunks bound the logits' memory)."""
    ordered = sorted(encoded, key=lambda x: len(x.input_ids))
    pad = sm.tokenizer.pad_token_id if sm.tokenizer.pad_token_id is not None else sm.tokenizer.eos_token_id
    chunk = max(1, CHUNK_ELEMENTS // sm.model.config.vocab_size)
    for start in range(0, len(ordered), batch_size):
        group = ordered[start : start + batch_size]
        batch = {k: v.to(sm.device) for k, v in collate(group, pad).items()}
        out = decoder_of(sm.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False, output_hidden_states=True)
        select = batch["labels"][:, 1:] != IGNORE
        targets = batch["labels"][:, 1:][select]
        states = {e: out.hidden_states[e][:, :-1][select] for e in exits}
        for c in range(0, targets.numel(), chunk):
            yield {e: h[c : c + chunk] for e, h in states.items()}, targets[c : c + chunk]
        if tick:
            tick(len(group))


@torch.no_grad()
def full_depth_top1(sm, encoded, batch_size: int = 8, tick: Tick | None = None) -> torch.Tensor:
    """The full depth's top-1 at every response token, in `score_exits`' order: the reference its `reference`
    takes (`sortedchat eval --quantize` computes it on the float32 model before quantizing it)."""
    L = sm.num_layers
    return torch.cat([sm.normed_head(states[L]).argmax(-1)
                      for states, _ in _response_states(sm, encoded, {L}, batch_size, tick)])


@torch.no_grad()
def score_exits(sm, encoded, exits: list[int], batch_size: int = 8, tick: Tick | None = None,
                reference: torch.Tensor | None = None) -> dict[int, dict]:
    """CE, perplexity, top-1 and agreement with the last exit, per exit, over the response tokens; with
    `reference` (`full_depth_top1` of another model, float32's), agreement with it too (`agree_ref`)."""
    L = sm.num_layers
    sums = {e: {"ce": 0.0, "top1": 0, "agree": 0, "agree_ref": 0} for e in exits}
    count = 0
    for states, y in _response_states(sm, encoded, set(exits) | {L}, batch_size, tick):
        last_top = sm.normed_head(states[L]).argmax(-1)
        ref = None if reference is None else reference[count : count + y.numel()].to(last_top.device)
        count += y.numel()
        for e in exits:
            logits = (sm.normed_head(states[e]) if e == L else sm.head(states[e], e)).float()
            top = logits.argmax(-1)
            sums[e]["ce"] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            sums[e]["top1"] += (top == y).sum().item()
            sums[e]["agree"] += (top == last_top).sum().item()
            if ref is not None:
                sums[e]["agree_ref"] += (top == ref).sum().item()
    if count == 0:
        raise SortedChatError("the evaluation data has no response tokens")
    return {e: {"ce": s["ce"] / count, "ppl": math.exp(min(s["ce"] / count, 50)), "top1": s["top1"] / count,
                "agree": s["agree"] / count, "tokens": count}
            | ({} if reference is None else {"agree_f32": s["agree_ref"] / count}) for e, s in sums.items()}


def qa_exact_match(sm, examples, exits: list[int], template: str, max_new_tokens: int = 24,
                   tick: Tick | None = None) -> tuple[dict[int, float], list[dict]]:
    """Closed-book exact match per exit (greedy, fixed depth) and every prediction made."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    hits = {e: 0 for e in exits}
    predictions = [{"question": ex.messages[0]["content"], "aliases": ex.aliases, "answers": {}} for ex in examples]
    prompts = [prompt_ids(ex, sm.tokenizer, template) for ex in examples]
    for e in exits:
        session = ChatSession(sm, Mode.fixed(e))
        for ex, ids, record in zip(examples, prompts, predictions):
            text = first_answer_line("".join(ev.text for ev in session.generate_ids(ids, sampling)))
            record["answers"][e] = text
            hits[e] += exact_match(text, ex.aliases)
            if tick:
                tick(1)
    return {e: hits[e] / len(examples) for e in exits}, predictions


def model_template(sm, override: str | None) -> str:
    """The prompt template a model was trained with (from sortedchat.json), unless overridden."""
    return override or (sm.config.training or {}).get("template") or "chat"


def evaluate_model(sm, records: RecordSet, template: str | None, max_length: int, batch_size: int,
                   qa: bool, max_new_tokens: int, tick: Tick | None = None, quantize: str | None = None) -> dict:
    """Every metric of one model on one record set, as the JSON `sortedchat eval` writes. With `quantize`, `sm`
    (float32) first gives the reference, its full depth's top-1 per response token, then is quantized in place
    and scored: each exit's `agree_f32` is its agreement with float32 full depth."""
    template = model_template(sm, template)
    encoded, dropped = encode_all(records.examples, sm.tokenizer, template, max_length)
    if not encoded:
        raise SortedChatError(f"{records.source}: no record has a response within --max-length {max_length}")
    reference = None
    if quantize:
        reference = full_depth_top1(sm, encoded, batch_size, tick)
        quantize_model(sm, quantize)
    metrics = score_exits(sm, encoded, sm.exits, batch_size, tick, reference)
    result = {"model": sm.source, "layers": sm.num_layers, "exits": sm.exits, "template": template,
              "records": len(encoded), "dropped": dropped, "metrics": metrics}
    if quantize:
        result["quantize"] = quantize
    if qa:
        em, predictions = qa_exact_match(sm, records.examples, sm.exits, template, max_new_tokens, tick)
        for e in sm.exits:
            metrics[e]["em"] = em[e]
        result["predictions"] = predictions
    return result


def results_table(results: list[dict], title: str):
    """A rich table: one row per exit layer; per model (A, B, ... named in the caption) CE / ppl / top-1 /
    agreement (/ EM). Short column names keep two models side by side within 80 columns."""
    from rich.table import Table

    letters = [chr(ord("A") + i) for i in range(len(results))]
    caption = "  ".join(f"{x}: {r['model']}" + (f" ({r['quantize']}; =f32: top-1 as float32 full depth's)"
                                                  if r.get("quantize") else "") for x, r in zip(letters, results))
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    table.add_column("exit", justify="right")
    keys = [("ce", "CE", "{:.3f}"), ("ppl", "ppl", "{:.4g}"), ("top1", "top-1", "{:.1%}"),
            ("agree", "agree", "{:.1%}"), ("agree_f32", "=f32", "{:.1%}"), ("em", "EM", "{:.1%}")]
    shown = [(k, label, fmt) for k, label, fmt in keys if any(k in m for r in results for m in r["metrics"].values())]
    for x in letters:
        for _, label, _ in shown:
            table.add_column(f"{x} {label}", justify="right")
    layers = sorted({e for r in results for e in r["metrics"]})
    for e in layers:
        row = [str(e)]
        for r in results:
            m = r["metrics"].get(e)
            row += [fmt.format(m[k]) if m and k in m else "" for k, _, fmt in shown]
        table.add_row(*row)
    return table


def short_name(model: str, index: int) -> str:
    name = Path(model.rstrip("/")).name or model
    return f"{name}" if len(name) <= 24 else f"#{index + 1} {name[:20]}…"


def plot_results(results: list[dict], path: Path, title: str) -> Path:
    """Quality against depth, one line per model: CE, top-1 and (with QA) exact match."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("ce", "response-token CE (lower is better)"), ("top1", "top-1 accuracy")]
    if any("em" in m for r in results for m in r["metrics"].values()):
        panels.append(("em", "closed-book exact match"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    all_layers = sorted({e for r in results for e in r["metrics"]})
    for ax, (key, label) in zip(axes[0], panels):
        for i, r in enumerate(results):
            layers = sorted(r["metrics"])
            ax.plot(layers, [r["metrics"][e][key] for e in layers], marker="o", label=short_name(r["model"], i))
        ax.set_xticks(all_layers)
        ax.set_xlabel("exit layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def to_json(results: list[dict], data: dict) -> dict:
    """JSON-ready form (exit layers become string keys)."""
    out = []
    for r in results:
        r = dict(r)
        r["metrics"] = {str(e): m for e, m in sorted(r["metrics"].items())}
        if "predictions" in r:
            r["predictions"] = [p | {"answers": {str(e): a for e, a in p["answers"].items()}} for p in r["predictions"]]
        out.append(r)
    return {"data": data, "models": out}
