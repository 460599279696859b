"""Every key and what it does (as remapped in the config file), and how to read the colours."""

from __future__ import annotations

from rich.table import Table
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from sortedchat.tui.settings import ACTIONS, key_name, settings_path

COLOURS = (
    "Each token takes the colour of the exit it left the model at: warm for shallow exits, cool for "
    "full depth (legend at the top left; the sparkline at the top right shows the latest tokens). "
    "Click a token, or press {lens} and move with ← →: the layer lens shows what every exit predicted there. "
    "Where the model was evaluated, the legend's agree% gives each exit's share of held-out tokens on which it "
    "predicts what full depth predicts: the lower it is, the more answers at that depth wander and repeat themselves."
)


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", key_display="esc")]

    def __init__(self, keymap: dict[str, str]):
        super().__init__()
        self.keymap = keymap

    def compose(self):
        table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for name, action in ACTIONS.items():
            keys = " / ".join(self.app.get_key_display(Binding(k, "")) for k in self.keymap[name].split(","))
            table.add_row(keys, action.help)
        with VerticalScroll(id="help"):
            yield Static("Keys  (Esc, F1 or q closes this help; Ctrl+P opens the command palette)",
                         classes="dialog-title")
            yield Static(table)
            yield Static(f'Remap keys in [keys] of {settings_path()} (e.g. deeper = "ctrl+up")',
                         classes="help-note", markup=False)
            yield Static("Colours", classes="dialog-title")
            yield Static(COLOURS.format(lens=key_name(self.keymap, "lens", self.app.get_key_display)))
        yield Footer()
