"""Streaming text pieces and the sampling guarantees of the engine."""

from __future__ import annotations

import collections

import torch

from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine.text import IncrementalText


def test_pieces_concatenate_to_the_decoded_text_without_broken_characters(tiny):
    tok = tiny.tokenizer
    text = "Café, naïve, 東京 and an emoji 🙂. Hello!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    stream = IncrementalText(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_tokens_add_no_text(tiny):
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    stream = IncrementalText(tiny.tokenizer, {eos})
    assert stream.push(eos) == "" and stream.ids == []


def test_speculative_sampling_follows_the_full_model_distribution(tiny):
    """Rejection sampling: tokens drafted at depth 1 are distributed as the full model's, not the draft's."""
    from sortedchat.engine.sampling import Sampler

    runs, cfg = 1500, dict(temperature=1.0, top_k=12, max_new_tokens=2)
    prompt = tiny.tokenizer("Hello! How are", add_special_tokens=False)["input_ids"]
    session = ChatSession(tiny, Mode.speculative(1, draft_len=1, pace=False))
    session.stop_ids = set()
    counts = collections.Counter()
    for seed in range(runs):
        session.restart_drafting()  # each run drafts one token, as the first
        first = next(iter(session.generate_ids(prompt, SamplingConfig(seed=seed, **cfg))))
        assert first.exit_layer in (1, 6)
        counts[first.token_id] += 1
    warp = Sampler(SamplingConfig(**cfg), tiny.device).distribution
    with torch.no_grad():
        out = tiny.model(input_ids=torch.tensor([prompt]), output_hidden_states=True)
        target = warp(out.logits[:, -1])[0]
        draft = warp(tiny.head(out.hidden_states[1][:, -1], 1))[0]
    empirical = torch.zeros_like(target)
    for t, c in counts.items():
        empirical[t] = c / runs
    assert 0.5 * (draft - target).abs().sum() > 0.3  # the draft alone would be far off
    assert 0.5 * (empirical - target).abs().sum() < 0.1  # sampling noise for 1500 draws over 12 tokens: ~0.04
