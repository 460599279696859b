"""`sortedchat serve` on the tiny model: the real server (uvicorn on a thread of this process, on a free port of
127.0.0.1) driven by the official `openai` client. Answers must be the engine's own, token for token; every
refusal must be an OpenAI error body with its status. Tests that need the engine held at a known point submit a
`Gate` job next to the HTTP ones: the engine thread waits inside the gate's deliveries until the test lets it go.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from typer.testing import CliRunner

from sortedchat.cli import app as cli_app
from sortedchat.cli.serve import build_app
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine.context import encode_chat
from sortedchat.server.running import in_background
from sortedchat.server.scheduler import Done, Job

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
POLLS = 2000  # bounded waits for a state of the server (each 10 ms at most)

# Per mode: the body fields that choose it, and the engine's Mode that must answer alike.
MODES = {
    "full": ({"mode": "full"}, Mode.fixed()),
    "depth 4": ({"mode": "depth", "depth": 4}, Mode.fixed(4)),
    "depth 2 propagate": ({"depth": 2, "kv": "propagate"}, Mode.fixed(2, kv="propagate")),
    "auto": ({"mode": "auto"}, Mode.auto()),
    "auto 0.2": ({"mode": "auto", "threshold": 0.2}, Mode.auto(0.2)),
    "speculative 2": ({"mode": "speculative", "depth": 2, "draft_len": 3}, Mode.speculative(2, draft_len=3)),
}


@pytest.fixture(scope="module")
def server(tiny):
    """(base URL, scheduler) of a server over the tiny model: full depth by default, 4 slots, 2 waiting places."""
    app = build_app(tiny, "tiny", Mode.fixed(), SamplingConfig(), KEY, slots=4, queue=2)
    with in_background(app) as url:
        yield url, app.state.scheduler
    assert not app.state.scheduler._thread.is_alive()  # the engine thread ended with the server


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def direct(sm, mode: Mode, messages=HELLO, **sampling) -> tuple[str, list[int], str]:
    """What a fresh ChatSession (what `sortedchat ask` runs) answers: text, exit layers, finish reason."""
    session = ChatSession(sm, mode)
    events = list(session.generate_ids(encode_chat(sm, messages), SamplingConfig(**sampling)))
    finish = "stop" if session.last_stats.stopped in ("eos", "repetition") else "length"
    return "".join(e.text for e in events), [e.exit_layer for e in events], finish


def paced(mode: Mode, exits: list[int]) -> list[int] | int:
    """The exit layers to compare: in speculative mode only their number, since which tokens are drafted depends
    on the pacer's clock (it drafts only while drafting measures faster); the text is the full model's anyway."""
    return len(exits) if mode.kind == "speculative" else exits


def streamed(url: str, fields: dict, messages=HELLO, **kw) -> tuple[str, list[dict], str, object]:
    """A streamed answer: its text, each token chunk's choice extras, the finish reason, the usage."""
    text, extras, finish, usage = "", [], None, None
    for chunk in client(url).chat.completions.create(model="tiny", messages=messages, stream=True,
                                                      stream_options={"include_usage": True}, extra_body=fields,
                                                      **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            if "exit_layer" in (choice.model_extra or {}):
                extras.append(choice.model_extra)
    return text, extras, finish, usage


def wait_for(condition, what: str) -> None:
    for _ in range(POLLS):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"the server never reached: {what}")


class Gate:
    """Deliveries of a job the test submits itself: the engine thread waits in each token's delivery until the
    test releases it (`let`), so the test knows exactly how many steps the other jobs got meanwhile."""

    def __init__(self, sm, tokens: int = 50):
        self.items: list = []
        self.permits = threading.Semaphore(0)
        self.job = Job(prompt=encode_chat(sm, HELLO), mode=Mode.fixed(), deliver=self.deliver,
                       sampling=SamplingConfig(max_new_tokens=tokens, stop_at_end_of_turn=False))

    def deliver(self, item) -> None:
        self.items.append(item)
        if not isinstance(item, Done):
            assert self.permits.acquire(timeout=60), "the test never let the gate job go on"

    def let(self, steps: int = 1) -> None:
        self.permits.release(steps)


def raw(url: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
        headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        res = conn.getresponse()
        return res.status, dict(res.getheaders()), json.loads(res.read())
    finally:
        conn.close()


def post_chat(url: str, body: dict, **kw) -> tuple[int, dict, dict]:
    return raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode(), **kw)


# -- answers -----------------------------------------------------------------------------------------------------
def test_models_and_health(server, tiny):
    url, _ = server
    (model,) = client(url).models.list().data
    assert model.id == "tiny" and model.model_extra["num_layers"] == 6 and model.model_extra["exits"] == [2, 4, 6]
    status, _, body = raw(url, "GET", "/health", key=None)  # no key needed to ask whether it is up
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny" and body["slots"] == 4


def test_answers_equal_ask_at_the_same_mode(server, tiny_dir):
    """`sortedchat ask --json`'s tokens (the command itself, its own model load) are the server's, whole and
    streamed."""
    url, _ = server
    res = CliRunner().invoke(cli_app, ["ask", HELLO[0]["content"], "--model", str(tiny_dir), "--device", "cpu",
                                       "--exits", "2,4,6", "--depth", "4", "-n", "16", "--json"])
    assert res.exit_code == 0, res.output
    events = [e for e in map(json.loads, res.stdout.splitlines()) if e["event"] == "token"]
    answer = client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=16,
                                                 extra_body={"mode": "depth", "depth": 4})
    choice = answer.choices[0]
    assert choice.message.content == "".join(e["text"] for e in events)
    assert choice.model_extra["exit_layers"] == [e["exit_layer"] for e in events] == [4] * len(events)
    text, extras, finish, usage = streamed(url, {"mode": "depth", "depth": 4}, max_tokens=16)
    assert text == choice.message.content and [x["exit_layer"] for x in extras] == [4] * len(events)
    assert finish == choice.finish_reason and usage.completion_tokens == answer.usage.completion_tokens == len(events)
    assert usage.model_extra["mean_exit"] == 4.0 and usage.model_extra["layer_compute_saved"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", MODES)
def test_every_mode_answers_as_the_engine_does(server, tiny, name):
    url, _ = server
    fields, mode = MODES[name]
    text, exits, finish = direct(tiny, mode, max_new_tokens=20)
    whole = client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=20, extra_body=fields)
    choice = whole.choices[0]
    assert (choice.message.content, paced(mode, choice.model_extra["exit_layers"]), choice.finish_reason) == \
        (text, paced(mode, exits), finish)
    assert whole.usage.completion_tokens == len(exits)
    assert whole.usage.model_extra["mean_exit"] == pytest.approx(sum(choice.model_extra["exit_layers"]) / len(exits))
    s_text, extras, s_finish, usage = streamed(url, fields, max_tokens=20)
    assert (s_text, paced(mode, [x["exit_layer"] for x in extras]), s_finish) == (text, paced(mode, exits), finish)
    assert usage.prompt_tokens == whole.usage.prompt_tokens and usage.completion_tokens == len(exits)
    limit = mode.depth if mode.kind == "depth" and mode.depth else 6
    assert all(1 <= e <= limit for e in exits)
    if mode.kind == "speculative":  # drafted tokens left at the draft depth, the others at full depth
        assert all(x["exit_layer"] == (2 if x["drafted"] else 6) for x in extras)
        # Two answers, two pacer clocks: which tokens are drafted may differ between them, so each is checked alone.
        extra = choice.model_extra
        assert len(extra["drafted"]) == len(exits)
        assert all(e == (2 if d else 6) for e, d in zip(extra["exit_layers"], extra["drafted"]))
    else:
        assert all("drafted" not in x for x in extras)


def test_absent_fields_take_the_servers_options(tiny):
    """A server started at depth 2 answers a request that names no mode at depth 2, and one that names depth 4
    at depth 4."""
    app = build_app(tiny, "tiny", Mode.fixed(2), SamplingConfig(max_new_tokens=6), None)
    with in_background(app) as url:
        plain = client(url, "unused").chat.completions.create(model="tiny", messages=HELLO)
        deeper = client(url, "unused").chat.completions.create(model="tiny", messages=HELLO, extra_body={"depth": 4})
    assert (plain.choices[0].message.content, plain.choices[0].model_extra["exit_layers"]) == \
        direct(tiny, Mode.fixed(2), max_new_tokens=6)[:2]
    assert deeper.choices[0].model_extra["exit_layers"] == direct(tiny, Mode.fixed(4), max_new_tokens=6)[1]


def test_a_sampled_answer_follows_its_seed(server, tiny):
    url, _ = server
    text, exits, _ = direct(tiny, Mode.fixed(), max_new_tokens=12, temperature=0.9, seed=7)
    answer = client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0.9,
                                                 seed=7)
    assert answer.choices[0].message.content == text


def test_a_next_turn_reuses_the_prompt_kv_of_the_one_before(server, tiny):
    url, _ = server
    first = client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=8)
    turn = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "What is the capital of France?"}]
    second = client(url).chat.completions.create(model="tiny", messages=turn, max_tokens=8)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.choices[0].message.content == direct(tiny, Mode.fixed(), turn, max_new_tokens=8)[0]


def together(url: str, scheduler, sm, asks: list[tuple[dict, list[dict]]], tokens: int) -> list[tuple]:
    """`asks` ((body fields, messages) each) streamed at once to `tokens` tokens, as `streamed` gives them: a gate
    job holds the engine until every request is in, so that they start in the same round."""
    gate = Gate(sm, tokens=1)
    scheduler.submit(gate.job)
    wait_for(lambda: len(gate.items) == 1, "the gate job holds the engine")
    with ThreadPoolExecutor(len(asks)) as pool:
        futures = [pool.submit(streamed, url, fields | {"ignore_eos": True}, messages, max_tokens=tokens)
                   for fields, messages in asks]
        wait_for(lambda: sum(scheduler.counts()[k] for k in ("active", "waiting")) == len(asks) + 1,
                 "all requests are in")
        gate.let(1)
        return [future.result() for future in futures]


def test_four_concurrent_clients_at_different_modes_all_get_their_answers(server, tiny):
    """Four streams at once, each answered as it would be alone, their steps computed together."""
    url, scheduler = server
    names = ["full", "depth 4", "auto", "speculative 2"]
    expected = {name: direct(tiny, MODES[name][1], max_new_tokens=40, stop_at_end_of_turn=False) for name in names}
    before, batched = scheduler.counts()["finished"], scheduler.batched_steps
    answers = together(url, scheduler, tiny, [(MODES[name][0], HELLO) for name in names], 40)
    for name, (text, extras, finish, _) in zip(names, answers):
        want_text, want_exits, want_finish = expected[name]
        mode = MODES[name][1]
        assert (text, paced(mode, [x["exit_layer"] for x in extras]), finish) == \
            (want_text, paced(mode, want_exits), want_finish), name
    counts = scheduler.counts()
    assert (counts["active"], counts["waiting"], counts["finished"]) == (0, 0, before + 5)
    # Three of them take a slot at once (the gate job holds the fourth); they step together from then on.
    assert scheduler.batched_steps - batched >= 3 * 30


QUESTIONS = [[{"role": "user", "content": text}] for text in (
    "Hi", "What is the capital of France? Tell me about Paris and its museums.",
    "The quick brown fox jumps over the lazy dog.")]


def test_requests_at_different_depths_and_prompt_lengths_batch_together(server, tiny):
    """Three fixed-depth answers over prompts of different lengths and at depths 6, 3 and 5 (riding together
    through layers 1..3, two of them on to 5): each is what it is alone."""
    url, scheduler = server
    asks = [({"mode": "full"}, Mode.fixed()), ({"depth": 3}, Mode.fixed(3)),
            ({"depth": 5, "kv": "propagate"}, Mode.fixed(5, kv="propagate"))]
    expected = [direct(tiny, mode, question, max_new_tokens=30, stop_at_end_of_turn=False)
                for (_, mode), question in zip(asks, QUESTIONS)]
    batched = scheduler.batched_steps
    answers = together(url, scheduler, tiny, [(fields, q) for (fields, _), q in zip(asks, QUESTIONS)], 30)
    for (text, extras, finish, _), want in zip(answers, expected):
        assert (text, [x["exit_layer"] for x in extras], finish) == want
    assert scheduler.batched_steps - batched >= 3 * 25


def test_auto_requests_with_their_own_thresholds_batch_exit_by_exit(server, tiny):
    """Three auto-mode answers at thresholds of their own run to the first exit together, and on together as far as
    each goes: each leaves each token where it would alone (some early, some at the last layer)."""
    url, scheduler = server
    asks = [({"mode": "auto", "threshold": t}, Mode.auto(t)) for t in (0.2, 0.05, None)]
    expected = [direct(tiny, mode, question, max_new_tokens=30, stop_at_end_of_turn=False)
                for (_, mode), question in zip(asks, QUESTIONS)]
    assert len({e for _, exits, _ in expected for e in exits}) == 3  # tokens leave at every exit
    batched = scheduler.batched_steps
    answers = together(url, scheduler, tiny, [(fields, q) for (fields, _), q in zip(asks, QUESTIONS)], 30)
    for (text, extras, finish, _), want in zip(answers, expected):
        assert (text, [x["exit_layer"] for x in extras], finish) == want
    assert scheduler.batched_steps - batched >= 3 * 25


def test_speculative_requests_batch_their_drafts_and_verifications(tiny):
    """Three speculative answers on a server that always drafts (`--always-draft`), at draft depths 2, 2 and 4:
    their drafts and verifications run together, and each answer, drafted tokens included, is what it is alone."""
    app = build_app(tiny, "tiny", Mode.speculative(2, draft_len=3, pace=False), SamplingConfig(), None)
    scheduler = app.state.scheduler
    asks = [({}, Mode.speculative(2, draft_len=3, pace=False)),
            ({"draft_len": 2}, Mode.speculative(2, draft_len=2, pace=False)),
            ({"depth": 4}, Mode.speculative(4, draft_len=3, pace=False))]
    expected = [direct(tiny, mode, question, max_new_tokens=30, stop_at_end_of_turn=False)
                for (_, mode), question in zip(asks, QUESTIONS)]
    with in_background(app) as url:
        answers = together(url, scheduler, tiny, [(fields, q) for (fields, _), q in zip(asks, QUESTIONS)], 30)
    for (text, extras, finish, _), want, (_, mode) in zip(answers, expected, asks):
        assert (text, [x["exit_layer"] for x in extras], finish) == want
        assert any(x["drafted"] for x in extras)
        assert all(x["exit_layer"] == (mode.depth if x["drafted"] else 6) for x in extras)
    assert scheduler.batched_steps >= 3 * 5


@pytest.mark.parametrize("where", ["rows", "LayerPass"])
def test_a_failed_batched_step_answers_each_request_with_an_error_of_its_own(tiny, monkeypatch, where):
    """A batched layer (or the start of a pass) that raises ends those requests, each with its own error naming the
    cause; nothing escapes to the engine thread."""
    from sortedchat.engine.state import LayeredState
    from sortedchat.server import batching

    def broken(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(batching.LayerStep if where == "rows" else batching, where, broken)
    asks = [batching.LayersAsk(LayeredState(tiny), tiny.num_layers, [1, 2]) for _ in range(2)]
    answers, shared = batching.run_together(asks)
    assert [str(a) for a in answers] == ["a batched step failed (MemoryError: out of memory)"] * 2
    assert answers[0] is not answers[1] and all(isinstance(a.__cause__, MemoryError) for a in answers)
    assert shared == [False, False]


def test_without_batching_requests_take_single_steps_in_turn(tiny):
    app = build_app(tiny, "tiny", Mode.fixed(), SamplingConfig(), None, batch=False)
    scheduler = app.state.scheduler
    asks = [("Hi", {"mode": "full"}, Mode.fixed()), ("Hello! How are you today?", {"depth": 3}, Mode.fixed(3))]
    expected = [direct(tiny, mode, [{"role": "user", "content": text}], max_new_tokens=12, stop_at_end_of_turn=False)
                for text, _, mode in asks]
    with in_background(app) as url, ThreadPoolExecutor(2) as pool:
        gate = Gate(tiny, tokens=1)
        scheduler.submit(gate.job)
        wait_for(lambda: len(gate.items) == 1, "the gate job holds the engine")
        futures = [pool.submit(streamed, url, fields | {"ignore_eos": True}, [{"role": "user", "content": text}],
                               max_tokens=12) for text, fields, _ in asks]
        wait_for(lambda: scheduler.counts()["active"] == 3, "both requests are in")
        gate.let(1)
        for future, want in zip(futures, expected):
            text, extras, finish, _ = future.result()
            assert (text, [x["exit_layer"] for x in extras], finish) == want
    assert scheduler.batched_steps == 0


# -- the engine held at a known point ---------------------------------------------------------------------------
def test_a_client_that_disconnects_frees_its_slot_at_once(server, tiny):
    url, scheduler = server
    interrupted = scheduler.counts()["interrupted"]
    gate = Gate(tiny)
    scheduler.submit(gate.job)
    wait_for(lambda: len(gate.items) == 1, "the gate job holds the engine")
    stream = client(url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=100, stream=True,
                                                 extra_body={"ignore_eos": True})
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"
    gate.let(1)  # the engine admits the request and runs exactly one step of it before the gate's next token
    token = next(chunks)
    assert token.choices[0].model_extra["exit_layer"] == 6
    stream.close()
    wait_for(lambda: any(job.cancelled for job in list(scheduler.active)), "the request is cancelled")
    gate.let(1)  # the cancelled request's turn comes before the gate's: it ends there
    wait_for(lambda: scheduler.counts()["active"] == 1, "the slot is free")
    (ended,) = [job for job in scheduler.ended if job.cancelled][-1:]
    assert ended.stats.tokens == 1 and ended.stats.stopped == "interrupted"
    assert scheduler.counts()["interrupted"] == interrupted + 1
    # The next request gets a slot at once, though the gate still holds the engine.
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(client(url).chat.completions.create, model="tiny", messages=HELLO, max_tokens=5)
        wait_for(lambda: scheduler.counts()["active"] == 2, "the next request runs")
        assert scheduler.counts()["waiting"] == 0
        gate.let(1000)
        assert later.result().choices[0].message.content == direct(tiny, Mode.fixed(), max_new_tokens=5)[0]
    wait_for(lambda: scheduler.counts()["active"] == 0, "the gate job ends")
    assert gate.items[-1].error is None and gate.items[-1].stats.tokens == 50


def test_a_client_that_leaves_before_a_whole_answer_is_cancelled(server, tiny):
    url, scheduler = server
    interrupted = scheduler.counts()["interrupted"]
    gate = Gate(tiny, tokens=2)
    scheduler.submit(gate.job)
    wait_for(lambda: len(gate.items) == 1, "the gate job holds the engine")
    body = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 50}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        wait_for(lambda: scheduler.counts()["active"] == 2, "the request holds a slot")
    wait_for(lambda: scheduler.counts()["interrupted"] == interrupted + 1, "the request is cancelled")
    assert scheduler.counts()["active"] == 1  # it never took a step: the gate still holds the engine
    gate.let(1000)
    wait_for(lambda: scheduler.counts()["active"] == 0, "the gate job ends")


def test_a_full_queue_answers_503_with_retry_after(server, tiny):
    url, scheduler = server
    gates = [Gate(tiny, tokens=2) for _ in range(6)]  # 4 slots and 2 waiting places
    scheduler.submit(gates[0].job)
    wait_for(lambda: len(gates[0].items) == 1, "the first gate job holds the engine")
    for gate in gates[1:]:
        scheduler.submit(gate.job)
    status, headers, body = post_chat(url, {"model": "tiny", "messages": HELLO})
    assert status == 503 and headers["retry-after"] == "2"
    assert body["error"]["code"] == "server_busy" and "4 answers running and 2 waiting" in body["error"]["message"]
    for gate in gates:
        gate.let(1000)
    wait_for(lambda: scheduler.counts()["active"] == scheduler.counts()["waiting"] == 0, "the queue empties")


# -- refusals ---------------------------------------------------------------------------------------------------
def error_of(status: int, body: dict) -> tuple:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return status, err["type"], err["param"], err["code"]


@pytest.mark.parametrize("fields, param, message", [
    ({"depth": 9}, "depth", "depth 9 is outside 1..6"),
    ({"mode": "speculative", "depth": 6}, "depth", "draft depth must be below the last layer (6)"),
    ({"mode": "speculative", "kv": "propagate"}, "kv", "speculative decoding needs exact K/V"),
    ({"mode": "auto", "threshold": 1.5}, "threshold", "threshold 1.5 is outside 0..1"),
    ({"kv": "guess"}, "kv", "unknown K/V way 'guess'"),
    ({"mode": "speculative", "draft_len": 0}, "draft_len", "draft length must be at least 1"),
    ({"mode": "deep"}, "mode", "mode 'deep' is not one of full, depth, auto, speculative"),
    ({"mode": "full", "depth": 3}, "depth", "mode full runs every layer"),
    ({"depth": "4"}, "depth", "depth must be int, got '4'"),
    ({"temperature": -1}, "temperature", "temperature must be a"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
])
def test_a_bad_field_is_a_400_naming_it(server, fields, param, message):
    url, _ = server
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model="tiny", messages=HELLO, extra_body=fields)
    assert caught.value.status_code == 400 and caught.value.param == param and message in caught.value.message


def test_refusals_are_openai_errors_with_their_status(server, tiny):
    url, _ = server
    chat = "/v1/chat/completions"
    status, _, body = raw(url, "POST", chat, b'{"model": "tiny", "messages": [')
    assert error_of(status, body) == (400, "invalid_request_error", None, "invalid_json")
    assert "not valid JSON" in body["error"]["message"] and "line 1 column" in body["error"]["message"]
    status, _, body = post_chat(url, {"model": "gpt-4o", "messages": HELLO})
    assert error_of(status, body) == (404, "not_found_error", "model", "model_not_found")
    assert "'gpt-4o' does not exist" in body["error"]["message"]
    long = [{"role": "user", "content": "fox " * 600}]
    status, _, body = post_chat(url, {"model": "tiny", "messages": long})
    assert error_of(status, body) == (400, "invalid_request_error", "messages", "context_length_exceeded")
    size = len(encode_chat(tiny, long))
    assert f"the prompt is {size} tokens; the model's context holds 512" in body["error"]["message"]
    status, _, body = raw(url, "POST", chat, b" " * (5 << 20))
    assert error_of(status, body) == (413, "invalid_request_error", None, "request_too_large")
    status, _, body = post_chat(url, {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]})
    assert error_of(status, body)[:3] == (400, "invalid_request_error", "messages[0]")
    status, _, body = raw(url, "GET", "/v1/completions")
    assert error_of(status, body) == (404, "not_found_error", None, "not_found")


def test_the_api_key_is_enforced(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError) as caught:
        client(url, "sk-wrong").models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    status, _, body = post_chat(url, {"model": "tiny", "messages": HELLO}, key=None)
    assert error_of(status, body) == (401, "authentication_error", None, "missing_api_key")
    status, _, body = raw(url, "GET", "/v1/models", key="sk-wrong")
    assert error_of(status, body) == (401, "authentication_error", None, "invalid_api_key")


# -- the command ------------------------------------------------------------------------------------------------
def test_serve_checks_its_options_before_loading(tiny_dir):
    runner = CliRunner()
    res = runner.invoke(cli_app, ["serve", "--model", str(tiny_dir), "--depth", "9", "--port", "0"])
    assert res.exit_code != 0 and "--depth 9: the model has 6 layers" in str(res.exception)
    res = runner.invoke(cli_app, ["serve", "--model", str(tiny_dir), "--slots", "0", "--port", "0"])
    assert "--slots must be at least 1" in str(res.exception)


def test_serve_warns_when_it_listens_beyond_this_machine(tmp_path):
    """A non-local address without --api-key gets its warning before the model loads (here: fails to)."""
    res = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--port", "0", "--model",
                                       str(tmp_path / "missing")])
    assert "listening on 0.0.0.0 without --api-key" in res.output and res.exit_code != 0


def test_serve_help_lists_every_option():
    res = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0
    for flag in ("--model", "--host", "--port", "--api-key", "--slots", "--queue", "--batch", "--depth", "--auto",
                 "--threshold", "--speculative", "--draft-len", "--kv", "--temperature", "--top-p", "--seed",
                 "--max-new-tokens", "--threads", "--device", "--dtype", "--load-in-4bit", "--load-in-8bit"):
        assert flag in res.stdout, flag
    assert "extra_body" in res.stdout and "exit_layer" in res.stdout


def test_serve_names_a_port_it_cannot_listen_on(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = CliRunner().invoke(cli_app, ["serve", "--model", str(tiny_dir), "--port", str(port)])
    assert res.exit_code != 0 and f"--host 127.0.0.1 --port {port}: cannot listen there" in str(res.exception)
