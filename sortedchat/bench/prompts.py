"""Benchmark prompts: the shipped default set, or a user's file.

A `.txt` file holds one prompt per line (blank lines and lines starting with `#` are skipped). A `.jsonl`
file holds one record per line, a `.json` file a list of records; a record is a string, an object with
a `prompt` string, or an object with `messages` (a chat-template conversation ending with a user turn).
"""

from __future__ import annotations

import json
from pathlib import Path

from sortedchat import SortedChatError

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.txt")


def _conversation(record, where: str) -> list[dict]:
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, dict):
        raise SortedChatError(f"{where}: expected a string or an object with 'prompt' or 'messages'")
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise SortedChatError(f"{where}: every message needs a 'role' and a 'content' string")
        if messages[-1]["role"] != "user":
            raise SortedChatError(f"{where}: the conversation must end with a user message")
        return messages
    raise SortedChatError(f"{where}: expected a non-empty 'prompt' string or a 'messages' list")


def load_prompts(path: str | Path | None = None) -> list[list[dict]]:
    """Conversations to answer, each ending with the user's turn."""
    path = Path(path).expanduser() if path is not None else DEFAULT_PROMPTS
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SortedChatError(f"--prompts {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    out = []
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SortedChatError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(records, list):
            raise SortedChatError(f"{path}: expected a JSON list of prompts")
        out = [_conversation(r, f"{path}: item {i}") for i, r in enumerate(records, 1)]
    else:
        jsonl = path.suffix.lower() == ".jsonl"
        for number, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line or (not jsonl and line.startswith("#")):
                continue
            where = f"{path}: line {number}"
            if jsonl:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SortedChatError(f"{where}: invalid JSON ({exc.msg})") from None
            else:
                record = line
            out.append(_conversation(record, where))
    if not out:
        raise SortedChatError(f"--prompts {path}: no prompts in the file")
    return out
