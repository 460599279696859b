"""A chat-completion body turned into what the engine runs: the prompt's tokens, a `Mode` and a `SamplingConfig`.

Fields the body leaves out take the server's own options (`Defaults`, from the command line) and, for auto mode,
the checkpoint's calibrated thresholds. The mode is checked by `Mode.validate` alone (the engine's one check of a
mode); its error becomes a 400 naming the body field that caused it (`_blame`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from sortedchat import SortedChatError
from sortedchat.engine.context import encode_chat
from sortedchat.engine.modes import Mode, ModeKind
from sortedchat.engine.sampling import SamplingConfig
from sortedchat.server.errors import ApiError

MODE_NAMES = ("full", "depth", "auto", "speculative")  # "full" is depth mode at every layer
ROLES = ("system", "developer", "user", "assistant")
NUMBER, INTEGER, TEXT, FLAG = (int, float), (int,), (str,), (bool,)
# The body's fields that choose a mode or sampling, with the types they take.
MODE_FIELDS = {"depth": INTEGER, "threshold": NUMBER, "draft_len": INTEGER, "kv": TEXT, "mode": TEXT}
SAMPLING_FIELDS = {"temperature": NUMBER, "top_p": NUMBER, "top_k": INTEGER, "seed": INTEGER}


@dataclass(frozen=True)
class Defaults:
    """What the server's command line chose: the name it serves the model under, and the mode and sampling of a
    request that names none (`sampling.max_new_tokens` is the answer length when the body gives no max_tokens)."""

    model_id: str
    mode: Mode
    sampling: SamplingConfig


@dataclass(frozen=True)
class ChatRequest:
    prompt: list[int]
    mode: Mode
    sampling: SamplingConfig
    stream: bool
    include_usage: bool


def parse_chat(body: object, sm, defaults: Defaults) -> ChatRequest:
    """The request `body` (parsed JSON) asks for, or an `ApiError` naming the first field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = _field(body, "model", TEXT)
    if model is not None and model != defaults.model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {defaults.model_id!r}",
                       "model", "model_not_found")
    if _field(body, "n", INTEGER) not in (None, 1):
        raise ApiError(400, "n: this server gives one choice per request", "n", "unsupported_value")
    if body.get("stop"):
        raise ApiError(400, "stop: stop sequences are not supported (the model's end-of-turn tokens end an answer)",
                       "stop", "unsupported_value")
    stream = bool(_field(body, "stream", FLAG))
    options = _field(body, "stream_options", (dict,)) or {}
    prompt = _prompt(body, sm)
    return ChatRequest(prompt, _mode(body, sm.num_layers, defaults.mode), _sampling(body, defaults.sampling),
                       stream, stream and bool(options.get("include_usage")))


def _field(body: dict, name: str, kinds: tuple[type, ...]):
    """`body[name]`, None when absent or null, or a 400 when it has the wrong type."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__.replace("str", "string").replace("dict", "object") for k in kinds)
        raise ApiError(400, f"{name} must be {expected}, got {value!r}", name, "invalid_type")
    return value


def _given(body: dict, fields: dict[str, tuple[type, ...]]) -> dict:
    return {name: v for name, kinds in fields.items() if (v := _field(body, name, kinds)) is not None}


def _blame(build: Callable[[dict], object], given: dict):
    """`build(given)`; when the engine refuses it, a 400 with its message naming the field whose removal
    makes the rest acceptable (the field the message is about)."""
    try:
        return build(given)
    except SortedChatError as exc:
        def passes(name: str) -> bool:
            try:
                build({k: v for k, v in given.items() if k != name})
                return True
            except SortedChatError:
                return False

        param = next((name for name in given if passes(name)), None)
        raise ApiError(400, str(exc).removeprefix("--"), param, "invalid_value") from None


def _mode(body: dict, num_layers: int, base: Mode) -> Mode:
    given = _given(body, MODE_FIELDS)
    if given.get("mode") not in (None, *MODE_NAMES):
        raise ApiError(400, f"mode {given['mode']!r} is not one of {', '.join(MODE_NAMES)}", "mode", "invalid_value")
    if given.get("mode") == "full" and "depth" in given:
        raise ApiError(400, "depth: mode full runs every layer; give a depth with mode depth or speculative",
                       "depth", "invalid_value")

    def build(fields: dict) -> Mode:
        name = fields.get("mode")
        kind = base.kind if name is None else ModeKind.DEPTH if name == "full" else ModeKind(name)
        start = base if kind is base.kind and name != "full" else Mode(
            kind, kv=base.kv if kind is not ModeKind.SPECULATIVE else "exact", draft_len=base.draft_len,
            draft_stop=base.draft_stop, pace=base.pace)
        return dataclasses.replace(start, **{k: v for k, v in fields.items() if k != "mode"}).validate(num_layers)

    return _blame(build, given)


def _sampling(body: dict, base: SamplingConfig) -> SamplingConfig:
    given = _given(body, SAMPLING_FIELDS)
    length = _field(body, "max_completion_tokens", INTEGER) or _field(body, "max_tokens", INTEGER)
    if length is not None and length < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {length}", "max_tokens", "invalid_value")
    ignore_eos = _field(body, "ignore_eos", FLAG)  # vLLM's field: run to max_tokens past end-of-turn tokens
    changes = {"max_new_tokens": length or base.max_new_tokens,
               "stop_at_end_of_turn": base.stop_at_end_of_turn if ignore_eos is None else not ignore_eos}
    return _blame(lambda fields: dataclasses.replace(base, **changes, **fields).validate(), given)


def _prompt(body: dict, sm) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages",
                       "invalid_value")
    plain = [_message(m, i) for i, m in enumerate(messages)]
    try:
        prompt = encode_chat(sm, plain)
    except Exception as exc:  # noqa: BLE001 - the model's chat template refuses these messages (its own words)
        raise ApiError(400, f"messages: the model's chat template refused them: {exc}", "messages",
                       "invalid_value") from None
    limit = sm.max_positions
    if limit and len(prompt) >= limit:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; the model's context holds {limit} (with room for "
                       "at least one answer token)", "messages", "context_length_exceeded")
    return prompt


def _message(message: object, i: int) -> dict:
    """One message as the chat template takes it: a role and its text (text parts joined)."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(400, f"{where} must be an object whose role is one of {', '.join(ROLES)}", where,
                       "invalid_value")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be text (a string or a list of text parts)", f"{where}.content",
                       "invalid_value")
    if any("\ud800" <= ch <= "\udfff" for ch in content):
        raise ApiError(400, f"{where}.content is not valid Unicode (a lone surrogate)", f"{where}.content",
                       "invalid_value")
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": content}
