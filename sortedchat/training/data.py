"""Training and evaluation records: Alpaca, chat and QA, from local JSON/JSONL or through `datasets`.

Every record becomes an `Example` (a conversation whose assistant turns are the responses) that
remembers where it came from, so a malformed one is reported as `FILE: line N: problem` (or `row N` for
parquet/CSV/hub data) before any model is loaded. With `skip_bad` those records are dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from sortedchat import SortedChatError, first_line

ROLES = ("system", "user", "assistant")
QA_PROMPT = "Answer this trivia question in a few words.\nQuestion: {question}"
DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class Example:
    """One conversation; its assistant turns are what the loss is computed on."""

    messages: list[dict]
    where: str
    input: str = ""  # Alpaca's optional context, kept apart for the Alpaca prompt template
    aliases: list[str] = field(default_factory=list)  # QA: every accepted answer

    def chat_messages(self) -> list[dict]:
        """The conversation for a chat template: Alpaca's input joins the instruction."""
        if not self.input:
            return self.messages
        first = dict(self.messages[0])
        first["content"] = f"{first['content']}\n\n{self.input}"
        return [first, *self.messages[1:]]


@dataclass
class RecordSet:
    """Examples read from one source, with what identifies the data in `sortedchat.json`."""

    examples: list[Example]
    source: str
    kind: str  # alpaca | chat | qa
    sha256: str | None
    skipped: int = 0

    def holdout(self, n: int) -> tuple["RecordSet", "RecordSet"]:
        """(all but the last n records, the last n records): a reproducible held-out split."""
        if n >= len(self.examples):
            raise SortedChatError(f"--holdout {n}: {self.source} has only {len(self.examples)} usable records")
        keep, held = self.examples[: len(self.examples) - n], self.examples[len(self.examples) - n :]
        return (
            RecordSet(keep, self.source, self.kind, self.sha256, self.skipped),
            RecordSet(held, self.source, self.kind, self.sha256, 0),
        )

    def describe(self) -> dict:
        return {"path": self.source, "sha256": self.sha256, "format": self.kind, "records": len(self.examples),
                "skipped": self.skipped}


def last_records(items: list, holdout: int, limit: int, source: str) -> list:
    """What `eval` and `calibrate` score with `--holdout N --limit M`: the last N items (the records
    `train --holdout N` left out; 0 = all), then at most M of them (0 = no limit)."""
    if holdout < 0 or limit < 0:
        raise SortedChatError("--holdout/--limit: must not be negative")
    if holdout > len(items):
        raise SortedChatError(f"--holdout {holdout}: {source} has only {len(items)} usable records")
    items = items[-holdout:] if holdout else items
    return items[:limit] if limit else items


def _kind_of(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "question" in record and "answer" in record:
        return "qa"
    return None


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:  # absent, JSON null, or an empty CSV cell
        if required:
            raise ValueError(f"'{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    if required and not value.strip():
        raise ValueError(f"'{key}' is empty")
    return value


def _alpaca(record: dict, where: str) -> Example:
    instruction, output = _text(record, "instruction"), _text(record, "output")
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
    return Example(messages, where, input=_text(record, "input", required=False))


def _chat(record: dict, where: str) -> Example:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i + 1} needs a role ({'/'.join(ROLES)}) and a string content")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError("no assistant message to learn from")
    return Example(clean, where)


def _qa(record: dict, where: str) -> Example:
    question = _text(record, "question")
    answer = record["answer"]
    aliases = record.get("aliases") or []
    if isinstance(answer, dict):  # the TriviaQA layout on the hub: {"value": ..., "aliases": [...]}
        aliases = answer.get("aliases") or aliases
        answer = answer.get("value")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("'answer' must be a non-empty string (or a TriviaQA answer object)")
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError("'aliases' must be a list of strings")
    messages = [{"role": "user", "content": QA_PROMPT.format(question=question.strip())},
                {"role": "assistant", "content": answer.strip()}]
    return Example(messages, where, aliases=[answer, *[a for a in aliases if a != answer]])


PARSERS = {"alpaca": _alpaca, "chat": _chat, "qa": _qa}


def _json_records(path: Path, text: str):
    """(line, record) pairs of a JSON array or of JSON Lines, with the line each record starts on."""
    if text.lstrip().startswith("["):
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise SortedChatError(f"{path}: line {text.count(chr(10)) + 1}: the JSON array is not closed")
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise SortedChatError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
            yield line, record
    # JSON Lines end at "\n" only: str.splitlines() would also break inside strings at U+0085, U+2028,
    # U+2029, \x0b, \x0c and \x1c-\x1e, which JSON allows unescaped. A "\r" before "\n" is JSON whitespace.
    for number, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield number, SortedChatError(f"{path}: line {number}: invalid JSON ({exc.msg})")


def _dataset_rows(spec: str, path: Path | None):
    """(row, record) pairs through the datasets library: local parquet/CSV/arrow, or a hub id."""
    try:
        import datasets
    except ImportError:
        raise SortedChatError("reading this data needs the datasets library: pip install datasets") from None
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one-line error names what its log lines said
    datasets.disable_progress_bars()
    try:
        if path is not None:
            ds = datasets.load_dataset(DATASETS_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
        else:
            name, _, split = spec.partition("@")
            name, _, config = name.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many kinds (offline, missing split, bad file)
        raise SortedChatError(f"--data {spec}: cannot load dataset ({first_line(exc)})") from None
    for i, record in enumerate(ds, 1):
        yield i, record


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_records(spec: str, skip_bad: bool = False, flag: str = "--data") -> RecordSet:
    """Read and validate every record of `spec` (a file, or `hub/id[:config][@split]`)."""
    rows, unit, source, sha = _open_rows(spec, flag)
    examples, kind, skipped = [], None, 0
    for number, record in rows:
        where = f"{source}: {unit} {number}"
        try:
            kind = _kind_in_file(record, where, kind)
            try:
                examples.append(PARSERS[kind](record, where))
            except ValueError as exc:
                raise SortedChatError(f"{where}: {exc}") from None
        except SortedChatError:
            if not skip_bad:
                raise
            skipped += 1
    if not examples:
        raise SortedChatError(f"{flag} {spec}: no usable records" + (f" ({skipped} skipped)" if skipped else ""))
    return RecordSet(examples, source, kind, sha, skipped)


def _open_rows(spec: str, flag: str):
    """`spec`'s (number, record) pairs, what a number counts ("line" or "row"), the source errors name, and
    the file's SHA-256 (None for a hub dataset)."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            raise SortedChatError(f"{flag} {spec}: is a directory; give a .json, .jsonl, .parquet or .csv file")
        if path.suffix.lower() in DATASETS_SUFFIXES:
            rows, unit = _dataset_rows(spec, path), "row"
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise SortedChatError(f"{flag} {spec}: cannot read ({exc})") from None
            rows, unit = _json_records(path, text), "line"
        return rows, unit, str(path), _sha256(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SortedChatError(f"{flag} {spec}: no such file")
    return _dataset_rows(spec, None), "row", spec, None


def _kind_in_file(record, where: str, kind: str | None) -> str:
    """The record's kind, which must be the file's `kind` (None before the first record); a row that could not
    be read arrives as its error."""
    if isinstance(record, SortedChatError):
        raise record
    this = _kind_of(record)
    if this is None:
        found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise SortedChatError(
            f"{where}: not a record: expected instruction/output (Alpaca), messages (chat) or "
            f"question/answer (QA) fields, found {found or 'nothing'}"
        )
    if kind is not None and this != kind:
        raise SortedChatError(f"{where}: a {this} record in a file of {kind} records")
    return this
