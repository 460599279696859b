"""Examples to token ids with response-only labels, and the seeded batches a training step uses.

The loss covers the assistant's tokens and the end-of-turn token that closes them (so a trained model
learns to stop); the prompt, the template's glue and padding never count. Labels are built from where each
segment of the rendered conversation came from, never by masking a token id: SmolLM2's pad token is its
end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sortedchat import SortedChatError
from sortedchat.engine.session import END_OF_TURN_TOKENS
from sortedchat.training.data import Example

IGNORE = -100
ALPACA_PREAMBLE = {
    True: "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n",
    False: "Below is an instruction that describes a task. "
           "Write a response that appropriately completes the request.\n\n",
}


@dataclass
class Encoded:
    """Token ids and labels (IGNORE outside responses) of one example."""

    input_ids: list[int]
    labels: list[int]

    @property
    def targets(self) -> int:
        """How many tokens the loss covers (each label is predicted from the position before it)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def end_of_turn_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}


def _chat_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of the conversation rendered by the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise SortedChatError("the model's tokenizer has no chat template; use --template alpaca")
    messages = example.chat_messages()
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not before.startswith(done) or not through.startswith(before):
            raise SortedChatError(
                f"{example.where}: the model's chat template does not render this conversation turn by turn; "
                "use --template alpaca"
            )
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return segments


def _alpaca_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The Stanford Alpaca prompt; later turns of a chat repeat the instruction/response pair."""
    system = next((m["content"] for m in example.messages if m["role"] == "system"), None)
    segments = [(system + "\n\n" if system else ALPACA_PREAMBLE[bool(example.input)], False)]
    for m in example.messages:
        if m["role"] == "user":
            context = f"### Input:\n{example.input}\n\n" if example.input and len(segments) == 1 else ""
            segments.append((f"### Instruction:\n{m['content']}\n\n{context}### Response:\n", False))
        elif m["role"] == "assistant":
            segments.append((m["content"] + (tokenizer.eos_token or ""), True))
            segments.append(("\n\n", False))
    return segments


def render(example: Example, tokenizer, template: str) -> list[tuple[str, bool]]:
    return _alpaca_segments(example, tokenizer) if template == "alpaca" else _chat_segments(example, tokenizer)


def encode(example: Example, tokenizer, template: str, max_length: int, stops: set[int] | None = None) -> Encoded:
    """Token ids of the whole conversation; labels on response tokens up to the first end-of-turn token.

    `stops` (the end-of-turn ids) may be passed in: looking them up reads the whole vocabulary, which cost
    more than encoding a record when done once per record."""
    stops = end_of_turn_ids(tokenizer) if stops is None else stops
    ids: list[int] = []
    labels: list[int] = []
    for n, (text, is_response) in enumerate(render(example, tokenizer, template)):
        # Special tokens in the text (<|im_end|>) become their ids; a BOS is added only where the tokenizer
        # adds one to a fresh prompt and the template has not written it itself.
        add = template == "alpaca" and n == 0
        piece = tokenizer(text, add_special_tokens=add)["input_ids"] if text else []
        if not is_response:
            ids += piece
            labels += [IGNORE] * len(piece)
            continue
        end = next((i for i, t in enumerate(piece) if t in stops), None)
        if end is None:  # a template without an end-of-turn marker: end the response with EOS
            piece, end = piece + [tokenizer.eos_token_id], len(piece)
        ids += piece
        labels += piece[: end + 1] + [IGNORE] * (len(piece) - end - 1)
    return Encoded(ids[:max_length], labels[:max_length])


def prompt_ids(example: Example, tokenizer, template: str) -> list[int]:
    """Token ids of the conversation up to where the last response starts (for generating it)."""
    segments = render(example, tokenizer, template)
    last = max(i for i, (_, is_response) in enumerate(segments) if is_response)
    ids: list[int] = []
    for n, (text, _) in enumerate(segments[:last]):
        ids += tokenizer(text, add_special_tokens=template == "alpaca" and n == 0)["input_ids"]
    return ids


def encode_all(examples: list[Example], tokenizer, template: str, max_length: int) -> tuple[list[Encoded], int]:
    """Encode every example; those whose response is cut away entirely by max_length are dropped (counted)."""
    out, dropped = [], 0
    stops = end_of_turn_ids(tokenizer)
    for ex in examples:
        enc = encode(ex, tokenizer, template, max_length, stops)
        if enc.targets == 0:
            dropped += 1
            continue
        out.append(enc)
    return out, dropped


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding gets attention 0 and label IGNORE whatever the pad id is."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    return n_examples // global_batch


def step_indices(n_examples: int, global_batch: int, seed: int, step: int) -> list[int]:
    """The examples of optimizer step `step` (0-based): a seeded permutation per epoch, cut in order.

    A function of (seed, step) only, so a resumed run sees exactly the batches it would have seen.
    """
    per_epoch = steps_per_epoch(n_examples, global_batch)
    epoch, within = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=gen)
    return order[within * global_batch : (within + 1) * global_batch].tolist()


def micro_batches(encoded: list[Encoded], indices: list[int], micro: int) -> list[list[list[int]]]:
    """Split a step's examples into micro-batches of similar length (less padding, same gradient).

    Each micro-batch is a list of rows, each row a list of example indices (one per row without packing)."""
    chosen = sorted(indices, key=lambda i: len(encoded[i].input_ids))
    return [[[i] for i in chosen[s : s + micro]] for s in range(0, len(chosen), micro)]


def packed_micro_batches(encoded: list[Encoded], indices: list[int], micro: int, width: int) -> list[list[list[int]]]:
    """Pack a step's examples into rows of at most `width` tokens (first fit, longest first), `micro` rows
    per micro-batch: instead of padding every example to the longest, rows hold several whole examples."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -len(encoded[i].input_ids)):
        n = len(encoded[i].input_ids)
        slot = next((r for r, left in enumerate(room) if left >= n), None)
        if slot is None:
            rows.append([i])
            room.append(width - n)
        else:
            rows[slot].append(i)
            room[slot] -= n
    return [rows[s : s + micro] for s in range(0, len(rows), micro)]


def collate_rows(encoded: list[Encoded], rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors of a micro-batch. One example per row: right-padded with an attention mask (as `collate`).
    Several: concatenated with position ids restarting at each example and no attention mask, which
    transformers turns into a block-diagonal causal mask, so no example attends to another."""
    if all(len(r) == 1 for r in rows):
        return collate([encoded[r[0]] for r in rows], pad_id)
    width = max(sum(len(encoded[i].input_ids) for i in r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for row, members in enumerate(rows):
        at = 0
        for i in members:
            e = encoded[i]
            n = len(e.input_ids)
            ids[row, at : at + n] = torch.tensor(e.input_ids)
            labels[row, at : at + n] = torch.tensor(e.labels)
            positions[row, at : at + n] = torch.arange(n)
            at += n
        positions[row, at:] = torch.arange(width - at)  # padding: a segment of its own, never scored
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
