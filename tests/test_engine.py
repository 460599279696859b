"""The layered-KV engine against transformers: exact greedy equality, exact K/V after mixed depths."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from sortedchat import SortedChatError
from sortedchat.engine import ChatSession, Mode, ModeKind, SamplingConfig
from sortedchat.engine.state import LayeredState

from helpers.engine import PROMPTS, fresh_prefill_kv, hf_greedy, no_stop, prompt_ids, run


@pytest.mark.parametrize("messages", PROMPTS)
def test_full_depth_equals_hf_generate(tiny, messages):
    ids = prompt_ids(tiny, messages)
    assert run(no_stop(ChatSession(tiny)), ids) == hf_greedy(tiny, ids, 24)


@pytest.mark.parametrize("messages", PROMPTS)
@pytest.mark.parametrize("draft", [1, 2, 4, 5])
@pytest.mark.parametrize("draft_len", [1, 3, 6])
def test_speculative_greedy_equals_full_greedy(tiny, messages, draft, draft_len):
    ids = prompt_ids(tiny, messages)
    full = run(no_stop(ChatSession(tiny)), ids)
    spec = no_stop(ChatSession(tiny, Mode.speculative(draft, draft_len=draft_len, pace=False)))
    assert run(spec, ids) == full
    assert spec.last_stats.verifications > 0


def test_draft_stop_ends_each_draft_at_an_unsure_token_and_keeps_full_greedy(tiny):
    """--draft-stop 1: no draft is ever sure enough to go on, so every round drafts exactly one token."""
    ids = prompt_ids(tiny, PROMPTS[0])
    full = run(no_stop(ChatSession(tiny)), ids)
    spec = no_stop(ChatSession(tiny, Mode.speculative(2, draft_len=6, draft_stop=1.0, pace=False)))
    assert run(spec, ids) == full
    stats = spec.last_stats
    assert stats.verifications > 0 and stats.drafted == stats.verifications
    with pytest.raises(SortedChatError, match="draft stop 1.5 is outside 0..1"):
        Mode.speculative(2, draft_stop=1.5).validate(tiny.num_layers)


def test_mode_kind_is_always_a_member_that_equals_its_plain_name():
    """Front ends may still name a kind "auto": it becomes `ModeKind.AUTO`, which equals and prints as "auto"."""
    mode = replace(Mode(), kind="speculative", depth=2)
    assert mode.kind is ModeKind.SPECULATIVE and mode == Mode.speculative(2)
    assert ModeKind.AUTO == "auto" and f"{ModeKind.AUTO}" == "auto" and json.dumps(ModeKind.DEPTH) == '"depth"'
    with pytest.raises(SortedChatError, match=r"unknown mode 'fast' \(depth, auto, speculative\)"):
        Mode(kind="fast")


def test_a_session_checks_every_mode_it_is_given(tiny):
    """The one check of a mode runs where a session takes it: at construction and at each assignment (a front
    end's mid-answer switch fails there, and the session keeps its mode). Without a layer count (before a
    model loads) the checks that need it wait."""
    with pytest.raises(SortedChatError, match=r"depth 7 is outside 1..6"):
        ChatSession(tiny, Mode.fixed(7))
    session = ChatSession(tiny, Mode.fixed(2))
    with pytest.raises(SortedChatError, match=r"speculative draft depth must be below the last layer \(6\)"):
        session.mode = Mode.speculative(6)
    assert session.mode == Mode.fixed(2)
    assert Mode.fixed(99).validate(None) == Mode.fixed(99)
    with pytest.raises(SortedChatError, match="threshold 2 is outside 0..1"):
        Mode.auto(threshold=2).validate(None)


def test_fixed_depth_equals_truncated_model(tiny):
    """Depth k is exactly the sub-model of the first k layers with the shared norm and head."""
    ids = prompt_ids(tiny, PROMPTS[0])
    got = run(no_stop(ChatSession(tiny, Mode.fixed(4))), ids, n=12)
    seq = list(ids)
    for _ in range(12):
        out = tiny.model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        seq.append(int(tiny.head(out.hidden_states[4][:, -1], 4).argmax()))
    assert got == seq[len(ids) :]


def test_teacher_forcing_reports_each_steps_choice_on_the_given_answer(tiny):
    """Forced decoding picks at depth k given the reference prefix: the model's own answer is reproduced,
    and on another answer each choice is the sub-model's argmax after that answer's prefix."""
    ids = prompt_ids(tiny, PROMPTS[0])
    full = run(no_stop(ChatSession(tiny)), ids, n=10)
    forced_full = [e.token_id for e in no_stop(ChatSession(tiny)).generate_ids(ids, SamplingConfig(), forced=full)]
    assert forced_full == full
    shallow = no_stop(ChatSession(tiny, Mode.fixed(2)))
    chosen = [e.token_id for e in shallow.generate_ids(ids, SamplingConfig(max_new_tokens=99), forced=full)]
    expected = []
    for i in range(len(full)):
        out = tiny.model(input_ids=torch.tensor([ids + full[:i]]), output_hidden_states=True)
        expected.append(int(tiny.head(out.hidden_states[2][:, -1], 2).argmax()))
    assert chosen == expected and len(chosen) == len(full)
    with pytest.raises(SortedChatError, match="teacher forcing measures fixed-depth or auto mode"):
        ChatSession(tiny, Mode.speculative(2)).generate_ids(ids, forced=full)
    switched = no_stop(ChatSession(tiny))  # a front end switches to speculative mid-answer: no drafting then
    stream = switched.generate_ids(ids, SamplingConfig(), forced=full)
    chosen = [next(stream).token_id]
    switched.mode = Mode.speculative(2)
    chosen += [e.token_id for e in stream]
    assert chosen == full and switched.last_stats.drafted == 0


def test_pacer_pauses_drafting_while_it_is_slower_and_probes_again_with_growing_pauses():
    from sortedchat.engine.pacing import Pacer

    pacer = Pacer(first_pause=2, max_pause=8)
    assert pacer.draft_now()
    pacer.record_draft(1.0, 2)  # nothing to compare with: measure full depth first
    assert pacer.pause == 2 and not pacer.draft_now()
    pacer.record_full(0.1)
    pacer.record_full(0.1)
    assert pacer.draft_now() and pacer.full_rate == pytest.approx(0.1)
    pauses = []
    for _ in range(4):  # drafting keeps losing: 2, 4, 8, 8 full-depth tokens between probes
        pacer.record_draft(1.0, 2)
        pauses.append(pacer.pause)
        while not pacer.draft_now():
            pacer.record_full(0.1)
    assert pauses == [2, 4, 8, 8]
    for _ in range(20):  # drafting got faster: the average follows and drafting goes on
        pacer.record_draft(0.02, 2)
        while not pacer.draft_now():
            pacer.record_full(0.1)
    assert pacer.draft_rate < pacer.full_rate and pacer.next_pause == 2
    pacer.record_draft(0.02, 2)
    assert pacer.draft_now()


def test_paced_speculation_decodes_at_full_depth_while_drafting_loses_and_stays_exact(tiny):
    from sortedchat.engine.drafting import Drafter
    from sortedchat.engine.pacing import Pacer

    class DraftingLoses(Pacer):  # the clock rigged: drafting 1 s per token, full depth 1 ms
        def record_draft(self, seconds, tokens):
            super().record_draft(1.0, tokens)

        def record_full(self, seconds, tokens=1):
            super().record_full(0.001, tokens)

    ids = prompt_ids(tiny, PROMPTS[0])
    full = run(no_stop(ChatSession(tiny)), ids, n=30)
    session = no_stop(ChatSession(tiny, Mode.speculative(2, draft_len=2)))
    session.drafter = Drafter(2, 2, pacer=DraftingLoses(first_pause=4, max_pause=16))
    events = list(session.generate_ids(ids, SamplingConfig(max_new_tokens=30)))
    assert [e.token_id for e in events] == full
    stats = session.last_stats
    assert stats.paced >= 4 + 4 + 8 and 1 <= stats.verifications <= 4
    always = no_stop(ChatSession(tiny, Mode.speculative(2, draft_len=2, pace=False)))
    always.drafter = Drafter(2, 2, pacer=DraftingLoses())
    assert run(always, ids, n=30) == full and always.last_stats.paced == 0
    session.mode = Mode.speculative(4, draft_len=2)  # another draft depth: its speed is measured afresh
    assert run(session, ids, n=4) == full[:4] and type(session.drafter.pacer) is Pacer
    assert (session.drafter.depth, session.drafter.start_len) == (4, 2)


def test_a_later_mode_drafts_its_own_length(tiny):
    """The adaptive draft length belongs to the drafter of one (draft depth, length): a mode that asks for another
    length starts drafting at that length, not at what the earlier mode's rounds had adapted to."""
    ids = prompt_ids(tiny, PROMPTS[0])
    full = run(no_stop(ChatSession(tiny)), ids, n=12)
    session = no_stop(ChatSession(tiny, Mode.speculative(2, draft_len=2, pace=False)))
    sizes, draft = [], session._draft
    session._draft = lambda pending, k, n, *rest: sizes.append(n) or draft(pending, k, n, *rest)
    assert run(session, ids, n=12) == full and sizes[0] == 2
    session.mode = Mode.speculative(2, draft_len=6, pace=False)
    sizes.clear()
    assert run(session, ids, n=12) == full and sizes[0] == 6


def test_auto_unreachable_thresholds_equal_full_depth(tiny):
    ids = prompt_ids(tiny, PROMPTS[1])
    full = run(no_stop(ChatSession(tiny)), ids)
    auto = no_stop(ChatSession(tiny, Mode.auto(threshold=1.0)))
    events = list(auto.generate_ids(ids, SamplingConfig(max_new_tokens=24)))
    assert [e.token_id for e in events] == full
    assert {e.exit_layer for e in events} == {6}


def test_auto_threshold_zero_equals_first_exit(tiny):
    ids = prompt_ids(tiny, PROMPTS[1])
    first = run(no_stop(ChatSession(tiny, Mode.fixed(2))), ids)
    auto = no_stop(ChatSession(tiny, Mode.auto(threshold=0.0)))
    events = list(auto.generate_ids(ids, SamplingConfig(max_new_tokens=24)))
    assert [e.token_id for e in events] == first
    assert {e.exit_layer for e in events} == {2}




def test_mixed_depths_then_drain_matches_fresh_prefill(tiny):
    """Tokens at depths 2, 6, 4, auto and speculative: after draining, every layer's K/V is exact."""
    ids = prompt_ids(tiny, PROMPTS[2])
    session = no_stop(ChatSession(tiny, Mode.fixed(2)))
    plan = [Mode.fixed(2), Mode.fixed(6), Mode.fixed(4), Mode.auto(0.3), Mode.speculative(2, 3), Mode.fixed(1)]
    tokens = list(ids)
    gen = session.generate_ids(ids, SamplingConfig(max_new_tokens=30))
    for i, ev in enumerate(gen):
        tokens.append(ev.token_id)
        session.mode = plan[(i // 5) % len(plan)]
        session.state.check_invariants()
    state = session.state
    assert state.kv_len[0] > state.kv_len[-1]  # a backlog was left by shallow tokens
    # The next full-depth token drains it and must match the full model.
    out = state.run(6, [tokens[-1]])
    next_full = int(tiny.head(out[:, -1], 6).argmax())
    state.check_invariants()
    ref = fresh_prefill_kv(tiny, tokens)
    # Same arithmetic, other matmul shapes: float32 round-off grows with depth (measured up to 1.6e-5 at
    # layer 6 on values of magnitude ~6), so the tolerance is relative to that scale.
    for i in range(tiny.num_layers):
        torch.testing.assert_close(state.cache.layers[i].keys, ref.layers[i].keys, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(state.cache.layers[i].values, ref.layers[i].values, atol=1e-4, rtol=1e-5)
    logits = tiny.model(input_ids=torch.tensor([tokens])).logits[0, -1]
    assert next_full == int(logits.argmax())


def test_multi_turn_reuse_equals_fresh_prefill(tiny):
    session = no_stop(ChatSession(tiny))
    convo = [{"role": "user", "content": "Hello! How are you today?"}]
    answer = "".join(e.text for e in session.generate(convo, SamplingConfig(max_new_tokens=10)))
    convo += [{"role": "assistant", "content": answer}, {"role": "user", "content": "What is the capital of France?"}]
    second = [e.token_id for e in session.generate(convo, SamplingConfig(max_new_tokens=10))]
    assert session.last_stats.reused_tokens > 10
    fresh = no_stop(ChatSession(tiny))
    assert [e.token_id for e in fresh.generate(convo, SamplingConfig(max_new_tokens=10))] == second
    assert fresh.last_stats.reused_tokens == 0


def test_depth_switch_mid_chat_costs_one_catch_up_pass(tiny):
    """Going deeper after shallow tokens runs each deep layer once over its backlog, not a re-prefill."""
    ids = prompt_ids(tiny, PROMPTS[0])
    session = no_stop(ChatSession(tiny, Mode.fixed(2)))
    run(session, ids, n=8)
    state = session.state
    backlog = state.kv_len[1] - state.kv_len[5]
    before = state.layer_evals
    state.run(6, [5])
    assert state.layer_evals - before == 2 * 1 + 4 * (backlog + 1)


def test_layer_call_contract(tiny):
    """The HF decoder layer call we rely on: returns the hidden states and appends q positions of K/V."""
    state = LayeredState(tiny)
    out = state.run(1, [3, 4, 5])
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, tiny.model.config.hidden_size)
    assert state.cache.layers[0].get_seq_length() == 3
    assert state.waiting[1].shape[1] == 3


def test_sampling_is_seeded_and_spec_sampling_runs(tiny):
    ids = prompt_ids(tiny, PROMPTS[0])
    a = run(no_stop(ChatSession(tiny)), ids, temperature=0.8, top_p=0.9, seed=7)
    b = run(no_stop(ChatSession(tiny)), ids, temperature=0.8, top_p=0.9, seed=7)
    assert a == b
    spec = run(no_stop(ChatSession(tiny, Mode.speculative(2))), ids, temperature=0.8, seed=7)
    assert len(spec) == 24


def test_a_session_stops_at_the_end_of_turn_tokens_its_vocabulary_has(tiny):
    """The tiny tokenizer has <|im_end|> (its eos) and <|endoftext|> among the end-of-turn names, not <|eot_id|> and
    the others, which map to nothing rather than to some other token."""
    tok = tiny.tokenizer
    assert ChatSession(tiny).stop_ids == {tok.convert_tokens_to_ids("<|im_end|>"),
                                          tok.convert_tokens_to_ids("<|endoftext|>")}
    assert "<|eot_id|>" not in tok.get_vocab()


def test_an_end_of_turn_name_the_vocabulary_lacks_is_not_its_unknown_token():
    from types import SimpleNamespace

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from sortedchat.engine.session import stop_token_ids

    vocab = {"<unk>": 0, "<|im_end|>": 1, "hi": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                                  eos_token="hi")
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 0  # the unknown token's id, for every name it lacks
    sm = SimpleNamespace(tokenizer=tok, model=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)))
    assert stop_token_ids(sm) == {2, 1}  # its eos and <|im_end|>, not <unk>


def test_stop_token_ends_answer_and_text_is_complete(tiny):
    session = ChatSession(tiny)
    eos = tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    session.stop_ids = {eos}
    ids = prompt_ids(tiny, PROMPTS[0])
    events = list(session.generate_ids(ids, SamplingConfig(max_new_tokens=40)))
    text = "".join(e.text for e in events)
    assert text == tiny.tokenizer.decode([e.token_id for e in events if not e.is_stop])


def test_ignoring_end_of_turn_runs_the_answer_to_max_new_tokens(tiny):
    """`stop_at_end_of_turn=False` (the bench's protocol): an answer that would end at its end-of-turn token
    goes on to exactly max_new_tokens, the end-of-turn token an ordinary one, in every mode."""
    ids = prompt_ids(tiny, PROMPTS[0])
    full = run(no_stop(ChatSession(tiny)), ids, n=12)
    end = full.index(full[5]) + 1  # where this answer ends when its 6th token ends a turn
    for mode in (Mode.fixed(), Mode.auto(threshold=1.0), Mode.speculative(2, draft_len=3, pace=False)):
        session = ChatSession(tiny, mode)
        session.stop_ids = {full[5]}
        assert run(session, ids, n=12) == full[:end] and session.last_stats.stopped == "eos"
        events = list(session.generate_ids(ids, SamplingConfig(max_new_tokens=12, stop_at_end_of_turn=False)))
        assert [e.token_id for e in events] == full and not any(e.is_stop for e in events)
        assert session.last_stats.stopped == "max_tokens"
