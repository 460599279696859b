"""System prompt and sampling settings; saved to the config file when the user presses Save."""

from __future__ import annotations

from dataclasses import replace

from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Footer, Input, Label, Static, TextArea

from sortedchat.tui.settings import Settings, check_value, settings_path

# field -> (label, hint)
FIELDS = {
    "temperature": ("Temperature", "0 = greedy"),
    "top_p": ("Top-p", "nucleus sampling, (0, 1]"),
    "top_k": ("Top-k", "0 = off"),
    "max_new_tokens": ("Max tokens", "per answer"),
    "seed": ("Seed", "empty = a new random seed each answer"),
}


class SettingsScreen(ModalScreen[Settings | None]):
    """Dismisses with the new settings, or None when cancelled."""

    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "cancel", "Cancel")]  # in its own footer

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def compose(self):
        with VerticalScroll(id="settings"):
            yield Static("Settings", classes="dialog-title")
            yield Label("System prompt (used from the next new chat)")
            yield TextArea(self.settings.system_prompt, id="system_prompt", soft_wrap=True, compact=True)
            for name, (label, hint) in FIELDS.items():
                value = getattr(self.settings, name)
                with Horizontal(classes="setting"):
                    yield Label(label, classes="setting-label")
                    yield Input("" if value is None else str(value), placeholder=hint, id=name, compact=True)
            with Horizontal(classes="setting"):
                yield Label("Repeats", classes="setting-label")
                yield Checkbox("stop an answer that keeps repeating itself", self.settings.repeat_stop,
                               id="repeat_stop", compact=True)
            yield Static("", id="settings-error")
            yield Static(f"Saved in {settings_path()}", classes="help-note")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#system_prompt", TextArea).focus()  # typing goes somewhere at once

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        values = {"system_prompt": self.query_one("#system_prompt", TextArea).text,
                  "repeat_stop": self.query_one("#repeat_stop", Checkbox).value}
        for name, (label, _) in FIELDS.items():
            raw = self.query_one(f"#{name}", Input).value.strip()
            if name == "seed" and not raw:
                values[name] = None
                continue
            try:
                number = float(raw) if name in ("temperature", "top_p") else int(raw)
                values[name] = check_value(name, number)
            except ValueError as exc:
                why = str(exc) if "must" in str(exc) else "must be a number"
                self.query_one("#settings-error", Static).update(f"{label} {why}, got {raw!r}")
                self.query_one(f"#{name}", Input).focus()
                return
        self.dismiss(replace(self.settings, **values))
