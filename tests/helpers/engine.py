"""The engine against transformers: prompts, HF's own greedy answer and prefill K/V, a greedy run of a session."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from sortedchat.engine import SamplingConfig
from sortedchat.hf_contract import cache_keyword

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sorted fine-tuning?"}],
]


def hf_greedy(sm, prompt_ids, n):
    ids = torch.tensor([prompt_ids], device=sm.device)
    out = sm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


def run(session, prompt_ids, n=24, **kw):
    return [ev.token_id for ev in session.generate_ids(prompt_ids, SamplingConfig(max_new_tokens=n, **kw))]


def no_stop(session):
    session.stop_ids = set()  # random weights: let every answer run to max_new_tokens
    return session


def prompt_ids(sm, messages):
    from sortedchat.engine.context import encode_chat

    return encode_chat(sm, messages)


def fresh_prefill_kv(sm, tokens):
    cache = DynamicCache(config=sm.model.config)
    sm.model(input_ids=torch.tensor([tokens], device=sm.device), use_cache=True,
             **{cache_keyword(type(sm.model)): cache})  # as each transformers version names it
    return cache


def count_graph_calls(sm, monkeypatch) -> list[int]:
    """How many layer steps of `sm` go through its compiled graph from now on (a list of one count): `--compile`'s
    tests check that the graph ran, not only the eager fallback."""
    from sortedchat.engine import compiled

    graph = compiled._GRAPHS[sm.model]
    calls, run = [0], graph.run

    def counted(inputs):
        out = run(inputs)
        calls[0] += out is not None  # a failed run decodes eagerly: not counted
        return out

    monkeypatch.setattr(graph, "run", counted)
    return calls
