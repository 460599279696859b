"""A chat longer than the model's context (the tiny model holds 512 positions): the oldest turns drop out of what
the model sees and the chat goes on; a message too long on its own is refused before it is stored; the answer is
capped to the room left; a long prompt pass reports its progress; an answer that loops is stopped."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine.context import ContextFull, encode_chat
from sortedchat.engine.repetition import RepetitionGuard
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.tui.dialogue import Dialogue
from sortedchat.tui.settings import parse_settings
from sortedchat.tui.storage import ChatStore

from helpers.engine import hf_greedy, no_stop
from helpers.tui import named

SYSTEM = "Be brief."
LONG = "The quick brown fox jumps over the lazy dog. " * 3  # about 45 tokens a message
TOO_LONG = "word " * 600
PERIOD = 5  # the looping model's cycle


def make_dialogue(tiny, tmp_path) -> Dialogue:
    return Dialogue(no_stop(ChatSession(named(tiny))), ChatStore(tmp_path / "chats.sqlite3"), "tiny")


def turn(d: Dialogue, text: str = LONG, max_new_tokens: int = 12) -> list[str]:
    """Send `text` and answer it in full; what the user was told."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    notes = d.send(text, SYSTEM, sampling)
    d.generate(sampling)
    assert d.finish() == []
    return notes


def test_a_chat_longer_than_the_context_goes_on_and_says_once_which_turns_dropped(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    told = []
    for i in range(1, 16):
        told += [(note, d.fit.dropped_turns) for note in turn(d, f"{i}. {LONG}")]
    assert d.stats.tokens == 12 and d.fit.dropped_turns > 0  # the 15th message was answered in full
    [(note, dropped)] = told
    assert note == (f"The model no longer sees turns 1–{dropped} of this chat (its context holds 512 tokens); they "
                    "stay saved. The oldest turns keep dropping out as the chat goes on; a new chat starts afresh.")
    seen = d.session.last_fit
    assert len(seen.prompt) + 12 <= 512
    assert seen.messages == [d.history[0]] + d.history[1 + 2 * seen.dropped_turns: -1]  # the system prompt stays
    assert seen.prompt == encode_chat(d.session.sm, seen.messages)
    saved = d.store.load(d.chat_id).messages  # the store keeps every turn
    assert [m.content for m in saved if m.role == "user"] == [f"{i}. {LONG}" for i in range(1, 16)]
    assert d.context() == (pytest.approx((len(seen.prompt) + 12) / 512), seen.dropped_turns)


def test_the_window_moves_in_steps_and_the_turns_between_reuse_the_kv(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    system_only = len(encode_chat(d.session.sm, [{"role": "system", "content": SYSTEM}]))
    turns = []
    for i in range(1, 25):
        turn(d, f"{i}. {LONG}")
        turns.append((d.fit.dropped_turns, d.stats.reused_tokens, len(d.fit.prompt), d.stats.prompt_tokens))
    moves = [i for i in range(1, len(turns)) if turns[i][0] != turns[i - 1][0]]
    # Turns of about 65 tokens in 512 positions: a move leaves a quarter (128) free, so it holds for 3 turns.
    assert moves[0] > 3 and len(moves) >= 2 and all(b - a >= 3 for a, b in zip(moves, moves[1:]))
    assert all(turns[i][0] - turns[i - 1][0] >= 2 for i in moves)  # each move drops several turns at once
    for i in range(1, len(turns)):
        reused = turns[i][1]
        if i in moves:  # a new start: only what precedes the first message is reused, the rest is prefilled anew
            assert reused < system_only
        else:  # the previous prompt and most of its answer (re-tokenized text can differ at its end) are reused
            assert reused >= turns[i - 1][2]
    assert turns[-1][3] == turns[-1][2] and turns[-1][2] + 12 <= 512


def test_a_message_too_long_for_the_context_is_refused_before_it_is_stored(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    size = len(encode_chat(d.session.sm, [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": TOO_LONG}]))
    with pytest.raises(ContextFull) as refused:
        d.send(TOO_LONG, SYSTEM, SamplingConfig(max_new_tokens=300))
    assert str(refused.value) == (f"the message is {size} tokens (with the system prompt and chat markup); the "
                                  "model's context holds 512 tokens and keeps 128 of them for the answer, so at most "
                                  "384 fit")
    assert d.history == [] and d.chat_id is None and d.store.chats() == [] and not d.generating
    turn(d, "Hello")
    before = [(m.role, m.content) for m in d.store.load(d.chat_id).messages]
    with pytest.raises(ContextFull):
        d.send(TOO_LONG, SYSTEM)
    assert [(m.role, m.content) for m in d.store.load(d.chat_id).messages] == before
    assert [m["content"] for m in d.history] == [SYSTEM, "Hello", d.history[2]["content"]]
    turn(d, "Again")  # the chat goes on
    assert [m.content for m in d.store.load(d.chat_id).messages if m.role == "user"] == ["Hello", "Again"]


def test_max_new_tokens_is_capped_to_the_room_left(tiny):
    session = no_stop(ChatSession(tiny))
    messages = [{"role": "user", "content": LONG * 6}]
    prompt = encode_chat(tiny, messages)
    fit = session.fit(messages, SamplingConfig(max_new_tokens=1000))
    assert fit.prompt == prompt and fit.max_new_tokens == 512 - len(prompt) and fit.dropped_turns == 0
    events = list(session.generate(messages, SamplingConfig(max_new_tokens=1000, repeat_stop=False)))
    stats = session.last_stats
    assert len(events) == 512 - len(prompt) and stats.stopped == "context"
    assert stats.context_fill == 1.0 and stats.context_limit == 512


def test_a_long_prompt_pass_runs_in_pieces_reports_them_and_matches_one_pass(tiny):
    session = ChatSession(tiny)
    prompt = encode_chat(tiny, [{"role": "user", "content": LONG * 7}])
    progress = []
    tokens = [e.token_id for e in session.generate_ids(prompt, SamplingConfig(max_new_tokens=8), on_prefill=lambda *p:
                                                        progress.append(p))]
    rest = len(prompt) - 1
    assert 256 < rest <= 512 and progress == [(0, rest), (256, rest), (rest, rest)]
    assert tokens == hf_greedy(tiny, prompt, len(tokens))[: len(tokens)]
    assert session.last_stats.prefilled_tokens == rest and session.last_stats.reused_tokens == 0
    short = []
    list(ChatSession(tiny).generate_ids(prompt[:100], SamplingConfig(max_new_tokens=2), on_prefill=lambda *p:
                                        short.append(p)))
    assert short == []  # one piece: nothing to report


# -- an answer that repeats itself ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def looping_dir(tiny, tmp_path_factory):
    """The tiny model made to write a cycle of PERIOD tokens: its layers add nothing (zero output projections), so
    the hidden state is the token's embedding, and its own head maps each token's embedding to the next of its
    cycle."""
    model = copy.deepcopy(tiny.model)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        vocab = emb.shape[0] // PERIOD * PERIOD
        head = torch.full_like(emb, 0.0)
        for t in range(vocab):
            head[PERIOD * (t // PERIOD) + (t + 1) % PERIOD] = emb[t] * 10
        model.lm_head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False)
        model.lm_head.weight.copy_(head)
    path = tmp_path_factory.mktemp("looping")
    model.save_pretrained(path, safe_serialization=True)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def looping(looping_dir):
    return load_sorted_model(str(looping_dir), LoadOptions(device="cpu", exits=[2, 4, 6]))


def test_an_answer_that_repeats_itself_stops_unless_told_otherwise(looping):
    session = ChatSession(looping, Mode.fixed(2))
    messages = [{"role": "user", "content": "Hello there"}]
    tokens = [e.token_id for e in session.generate(messages, SamplingConfig(max_new_tokens=100))]
    assert tokens[PERIOD:] == tokens[:-PERIOD] and len(set(tokens)) == PERIOD  # it loops from the first token
    assert len(tokens) == 32 and session.last_stats.stopped == "repetition"  # 3 repeats, over 32 tokens
    tokens = [e.token_id for e in session.generate(messages, SamplingConfig(max_new_tokens=100, repeat_stop=False))]
    assert len(tokens) == 100 and session.last_stats.stopped == "max_tokens"
    bench = SamplingConfig(max_new_tokens=100, stop_at_end_of_turn=False)  # a fixed-length run never stops early
    assert len(list(session.generate(messages, bench))) == 100


@pytest.mark.parametrize("period, stops_at", [(1, 32), (8, 32), (20, 60), (64, 192)])
def test_a_loop_must_repeat_three_times_over_32_tokens(period, stops_at):
    guard = RepetitionGuard()
    cycle = list(range(100, 100 + period))
    stopped = [guard.push(t) for t in ([7, 8, 9] + cycle * 200)[:3 + stops_at]]
    assert stopped == [False] * (2 + stops_at) + [True]


def test_a_text_that_varies_never_stops():
    guard = RepetitionGuard()
    text = [i % 50 for i in range(300)] + list(range(1000, 1500))  # repeats of 50 tokens, twice at most, then none
    assert not any(guard.push(t) for t in text[:100] + text[300:])


def test_ask_no_repeat_stop_and_the_settings_key(looping_dir):
    def summary(*flags):
        res = subprocess.run([sys.executable, "-m", "sortedchat", "ask", "Hello there", "--model", str(looping_dir),
                              "--device", "cpu", "--depth", "2", "-n", "80", "--json", *flags],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.splitlines()[-1])

    stopped, ran_on = summary(), summary("--no-repeat-stop")
    assert (stopped["tokens"], stopped["stopped"]) == (32, "repetition")
    assert (ran_on["tokens"], ran_on["stopped"]) == (80, "max_tokens")
    assert parse_settings("[chat]\nrepeat_stop = false\n", "c.toml").sampling().repeat_stop is False
    with pytest.raises(Exception, match=r"c.toml: line 2: \[chat\] repeat_stop must be true or false, got 'no'"):
        parse_settings("[chat]\nrepeat_stop = 'no'\n", "c.toml")


def test_plain_chat_stops_a_looping_answer_and_says_why(looping, tmp_path):
    from rich.console import Console

    from sortedchat.cli.chat import plain_chat

    console = Console(record=True, width=200)
    lines = iter(["Hello there", "/quit"])
    plain_chat(looping, Mode.fixed(2), SamplingConfig(max_new_tokens=100), console=console,
               read=lambda _: next(lines), store=ChatStore(tmp_path / "chats.sqlite3"))
    assert "stopped: it repeated itself (--no-repeat-stop lets an answer run on)" in console.export_text()


def test_the_app_says_why_a_looping_answer_stopped_and_its_settings_let_answers_run_on(looping, tmp_path):
    from sortedchat.tui.screens.settings import SettingsScreen
    from sortedchat.tui.settings import load_settings, settings_path

    from helpers.tui import ask, dialogue, make_app, run_async, status, wait_for

    app = make_app(looping, tmp_path, max_new_tokens=100, mode=Mode.fixed(2))

    @run_async
    async def run():
        async with app.run_test(size=(110, 34)) as pilot:
            await ask(pilot, app)
            said = [n.message for n in app._notifications]
            assert ("The answer was stopped: it kept repeating itself. Untick Repeats in the settings (^o) to let "
                    "answers run on.") in said
            assert " · stopped: it repeated itself · " in status(app)
            await pilot.press("ctrl+o")
            await wait_for(pilot, lambda: isinstance(app.screen, SettingsScreen))
            app.screen.query_one("#repeat_stop").focus()
            await pilot.press("space", "ctrl+s")
            await wait_for(pilot, lambda: not isinstance(app.screen, SettingsScreen))
            assert load_settings().repeat_stop is False and "repeat_stop = false" in settings_path().read_text()
            await ask(pilot, app)
            assert len(dialogue(app).events) == 100 and dialogue(app).stats.stopped == "max_tokens"


def test_the_dialogue_keeps_how_far_a_long_prompt_pass_went(tiny, tmp_path):
    d = make_dialogue(tiny, tmp_path)
    turn(d, LONG * 7, max_new_tokens=2)
    rest = d.stats.prefilled_tokens
    assert rest > 256 and d.prefill == (rest, rest)  # what the app's status line showed last
    turn(d, "Hello", max_new_tokens=2)
    assert d.prefill is None  # a short pass: nothing to show
