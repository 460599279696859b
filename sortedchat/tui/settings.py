"""The chat app's settings: a TOML file under the user config dir, every value checked when read.

A mistake in the file (bad TOML, a misspelt key, a value of the wrong type) is a `SortedChatError`
that names the file, the line and the key, so the command prints one line instead of a traceback.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomli_w

from sortedchat import SortedChatError
from sortedchat.config import atomic_write_text
from sortedchat.engine.sampling_config import RANGES, SamplingConfig, range_problem
from sortedchat.paths import config_dir

SETTINGS_NAME = "config.toml"
MODIFIERS = {"ctrl", "shift", "alt", "super", "meta", "hyper"}

@dataclass(frozen=True)
class Action:
    """One thing a key does, as every place in the app names it: its default keys (`[keys]` remaps them; the id
    is the `[keys]` name and the Textual binding id), its line in the help screen, its footer label, whether the
    footer shows it (the help lists them all), when the footer drops it for want of width (lower first; None:
    never), its command-palette entry (title, help; None: not in the palette), and who binds it: the chat screen,
    the app (every screen) or the message box. Texts that name a key take it from the keymap (`key_name`), never
    from here."""

    keys: str
    help: str
    label: str
    shown: bool = True
    drop: int | None = None
    palette: tuple[str, str] | None = None
    owner: str = "chat"  # "chat", "app" or "prompt"


ACTIONS: dict[str, Action] = {
    "help": Action("f1", "Show this help", "Help",
                   palette=("Keys and colours", "Show every key and how to read the colours")),
    "shallower": Action("f2", "Shallower: one exit less for the next tokens", "Shallower",
                        palette=("Shallower", "One exit less for the next tokens")),
    "deeper": Action("f3", "Deeper: one exit more for the next tokens", "Deeper",
                     palette=("Deeper", "One exit more for the next tokens")),
    "auto": Action("f4", "Toggle auto mode (exit at the first confident exit)", "Auto", drop=7,
                   palette=("Toggle auto mode", "Exit each token at the first confident exit")),
    "speculative": Action("f5", "Toggle speculative mode (draft at the current depth)", "Speculative", drop=2,
                          palette=("Toggle speculative mode",
                                   "Draft at the current depth, verify with the full model")),
    "threshold_down": Action("f6", "Auto: lower the thresholds (faster)", "Thr−", shown=False),
    "threshold_up": Action("f7", "Auto: raise the thresholds (closer to full depth)", "Thr+", shown=False),
    "view": Action("f8", "Switch between depth colours and rendered Markdown", "View", drop=3,
                   palette=("Toggle Markdown view", "Depth colours or rendered Markdown")),
    "lens": Action("f9", "Layer lens: every exit's predictions at the selected token", "Lens", drop=4,
                   palette=("Layer lens", "Every exit's predictions at a selected token")),
    "kv": Action("f12", "Exact or propagated K/V for the layers a token skips (auto and fixed depth)", "KV",
                 shown=False),
    "stop": Action("escape", "Stop the answer (the partial answer stays); else close the layer lens", "Stop/close"),
    "new_chat": Action("ctrl+n", "New chat", "New", drop=6, palette=("New chat", "Start an empty conversation")),
    "chats": Action("ctrl+l", "Saved chats: reopen, delete, export", "Chats", drop=5,
                    palette=("Saved chats", "Reopen, delete or export an earlier chat")),
    "settings": Action("ctrl+o", "Settings: system prompt and sampling", "Settings", drop=1,
                       palette=("Settings", "System prompt, temperature, top-p, max tokens, seed")),
    "export": Action("ctrl+s", "Export this chat to Markdown", "Export", shown=False,
                     palette=("Export chat to Markdown", "Write this chat to a .md file")),
    "regenerate": Action("ctrl+r", "Regenerate the last answer (in the current mode)", "Regenerate", shown=False,
                         palette=("Regenerate", "Answer the last message again, in the current mode")),
    "copy": Action("f10", "Copy the last answer to the clipboard", "Copy", shown=False,
                   palette=("Copy the last answer", "To the clipboard")),
    "rename": Action("ctrl+t", "Rename this chat", "Rename", shown=False,
                     palette=("Rename chat", "Give this chat another title")),
    "quit": Action("ctrl+q", "Quit", "Quit", owner="app"),
    "send": Action("enter", "Send the message", "Send", owner="prompt"),
    "newline": Action("ctrl+j", "New line in the message", "New line", shown=False, owner="prompt"),
}


def key_name(keymap: dict[str, str], action: str, display) -> str:
    """How a text names `action`'s key: its first key in `keymap` (remaps included), as `display` (the app's
    `get_key_display` of a binding) shows it, capitalised as in a sentence ("F9", "Esc", "^s")."""
    from textual.binding import Binding

    shown = display(Binding(keymap[action].split(",")[0], ""))
    return shown[:1].upper() + shown[1:]


@dataclass
class Settings:
    """What the config file holds. `keys` has only the remapped actions; `keymap()` fills in defaults."""

    model: str = ""
    device: str = "auto"
    dtype: str = "auto"
    system_prompt: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 512
    seed: int | None = None
    repeat_stop: bool = True  # stop an answer that repeats itself (engine/repetition.py)
    theme: str = ""  # the app's colour theme, as last chosen (empty: Textual's default)
    keys: dict[str, str] = field(default_factory=dict)

    def keymap(self) -> dict[str, str]:
        return {name: self.keys.get(name, action.keys) for name, action in ACTIONS.items()}

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            max_new_tokens=self.max_new_tokens, repeat_stop=self.repeat_stop,
        ).validate()


# Where each field lives in the file: section -> {key: field name}.
LAYOUT = {
    "model": {"spec": "model", "device": "device", "dtype": "dtype"},
    "chat": {
        "system_prompt": "system_prompt",
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "max_new_tokens": "max_new_tokens",
        "seed": "seed",
        "repeat_stop": "repeat_stop",
    },
    "ui": {"theme": "theme"},
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def settings_path() -> Path:
    return config_dir() / SETTINGS_NAME


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """The line of `key` inside `[section]` (or of the section header), for error messages."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1)
            if key is None and current == section:
                return number
        elif current == section and key is not None and re.match(rf"\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


def check_value(name: str, value):
    """Return `value` if it fits field `name`, else raise ValueError saying what was expected."""
    if name in ("model", "device", "dtype", "system_prompt", "theme"):
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if name == "dtype" and value not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}")
        return value
    if name in ("temperature", "top_p"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if problem := range_problem(name, value):
            raise ValueError(problem)
        return float(value)
    if name == "repeat_stop":
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if name in ("max_new_tokens", "top_k", "seed"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        if name in RANGES and (problem := range_problem(name, value)):
            raise ValueError(problem)
        return value
    raise ValueError("is not a setting")


def is_key_name(key: str) -> bool:
    """Whether Textual knows `key` (e.g. "f5", "ctrl+up", "alt+x", "plus"): a typo would never fire."""
    from textual.keys import KEY_NAME_REPLACEMENTS, Keys, key_to_character

    *modifiers, base = key.strip().split("+")
    if not base or not set(modifiers) <= MODIFIERS:
        return False
    named = {k.value.rpartition("+")[2] for k in Keys} | set(KEY_NAME_REPLACEMENTS.values())
    return len(base) == 1 or base in named or key_to_character(base) is not None


def is_printable(key: str) -> bool:
    """Whether `key` types a character ("a", "shift+a", "space", "question_mark"): the app's keys are global,
    so such a key would never reach the message box."""
    from textual.keys import KEY_NAME_REPLACEMENTS, key_to_character

    *modifiers, base = key.strip().split("+")
    if not set(modifiers) <= {"shift"}:
        return False
    char = key_to_character(base)
    return len(base) == 1 or base in KEY_NAME_REPLACEMENTS.values() or (char is not None and char.isprintable())


def parse_settings(text: str, source: str) -> Settings:
    """Settings from TOML `text`; `source` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SortedChatError(f"{source}: {exc}") from None

    def fail(section: str, key: str | None, why: str):
        line = _line_of(text, section, key)
        where = f"line {line}: " if line else ""
        what = f"[{section}] {key}" if key else f"[{section}]"
        raise SortedChatError(f"{source}: {where}{what} {why}")

    settings = Settings()
    for section, value in data.items():
        if section not in (*LAYOUT, "keys"):
            fail(section, None, f"is not a section (expected {', '.join([*LAYOUT, 'keys'])})")
        if not isinstance(value, dict):
            raise SortedChatError(f"{source}: {section} must be a [{section}] table")
    for section, keys in LAYOUT.items():
        for key, value in data.get(section, {}).items():
            if key not in keys:
                fail(section, key, f"is not a setting (expected one of {', '.join(keys)})")
            try:
                setattr(settings, keys[key], check_value(keys[key], value))
            except ValueError as exc:
                fail(section, key, f"{exc}, got {value!r}")
    for action, key in data.get("keys", {}).items():
        if action not in ACTIONS:
            fail("keys", action, f"is not an action (expected one of {', '.join(ACTIONS)})")
        if not isinstance(key, str) or not all(is_key_name(part) for part in key.split(",")):
            fail("keys", action, f"must be a key name such as \"f5\" or \"ctrl+t\", got {key!r}")
        parts = [part.strip() for part in key.split(",")]
        printable = next((part for part in parts if is_printable(part)), None)
        if printable is not None:
            fail("keys", action, f'= "{printable}" types a character, so the message box could not have it; '
                 "use a function key or a ctrl+ or alt+ combination")
        settings.keys[action] = ",".join(parts)
    owner: dict[str, str] = {}
    keymap = settings.keymap()
    for action in sorted(keymap, key=lambda a: a in settings.keys):  # report clashes at a remapped key
        for part in keymap[action].split(","):
            if part in owner:
                fail("keys", action, f'= "{part}" is already the key of {owner[part]}; give one of them another key')
            owner[part] = action
    return settings


def load_settings(path: Path | None = None) -> Settings:
    """The settings in `path` (default: the user config file); defaults when there is no file."""
    path = path or settings_path()
    if not path.is_file():
        return Settings()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SortedChatError(f"{path}: cannot read the settings ({exc})") from None
    return parse_settings(text, str(path))


def dump_settings(settings: Settings) -> str:
    data: dict[str, dict] = {}
    defaults = Settings()
    for section, keys in LAYOUT.items():
        for key, name in keys.items():
            value = getattr(settings, name)
            if value is None or (section in ("model", "ui") and value == getattr(defaults, name)):
                continue
            data.setdefault(section, {})[key] = value
    if settings.keys:
        data["keys"] = dict(settings.keys)
    return tomli_w.dumps(data)


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    """Write the settings atomically (a crash never leaves half a file)."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name == "keys" or value is None:
            continue
        try:
            check_value(f.name, value)
        except ValueError as exc:
            raise SortedChatError(f"setting {f.name} {exc}, got {value!r}") from None
    return atomic_write_text(path or settings_path(), dump_settings(settings))


def save_changes(changed: dict) -> Path | None:
    """Write `changed` over what the settings file holds; its path, or None when nothing changed. Values given
    on the command line (`-n 40`) apply to one run: only what the user changed in the app reaches the file."""
    if not changed:
        return None
    on_file = load_settings()
    for name, value in changed.items():
        setattr(on_file, name, value)
    return save_settings(on_file)
