"""The main screen: legend, conversation (and the layer lens beside it), message box, status line.

The screen only lays widgets out and binds the keys; what the keys do lives in the app, which owns
the model, the chat session and the saved chats.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer

from sortedchat.tui.settings import KEY_ACTIONS
from sortedchat.tui.widgets.conversation import Conversation
from sortedchat.tui.widgets.lens import LayerLens
from sortedchat.tui.widgets.prompt import PromptInput
from sortedchat.tui.widgets.status import ExitLegend, ExitSparkline, StatusBar

# Action id -> footer label; the keys come from KEY_ACTIONS (remapped through the app's keymap).
# All are listed in the help screen; the footer leaves out the ones marked in HIDDEN to stay short.
FOOTER = {
    "help": "Help",
    "shallower": "Shallower",
    "deeper": "Deeper",
    "auto": "Auto",
    "speculative": "Speculative",
    "threshold_down": "Thr−",
    "threshold_up": "Thr+",
    "view": "View",
    "lens": "Lens",
    "kv": "KV",
    "stop": "Stop",
    "new_chat": "New",
    "chats": "Chats",
    "settings": "Settings",
    "export": "Export",
}
HIDDEN = {"threshold_down", "threshold_up", "kv", "export"}


class ChatScreen(Screen):
    # Priority: these keys act wherever the focus is (the message box would otherwise take F6/F7).
    BINDINGS = [Binding(KEY_ACTIONS[a][0], f"app.{a}", label, id=a, priority=True, show=a not in HIDDEN)
                for a, label in FOOTER.items()]

    def __init__(self, exits: list[int], num_layers: int):
        super().__init__()
        self.exits, self.num_layers = exits, num_layers
        self.conversation = Conversation(id="conversation")
        self.lens = LayerLens(num_layers, exits[0])
        self.prompt = PromptInput(id="prompt")
        self.status = StatusBar(id="status")
        self.sparkline = ExitSparkline(num_layers, exits[0], id="sparkline")

    def compose(self):
        with Horizontal(id="topline"):
            yield ExitLegend(self.exits, self.num_layers, id="legend")
            yield self.sparkline
        with Horizontal(id="main"):
            yield self.conversation
            yield self.lens
        yield self.prompt
        yield self.status
        yield Footer(compact=True)

    def on_mount(self) -> None:
        keys = self.app.settings.keymap()
        send = self.app.get_key_display(Binding(keys["send"].split(",")[0], ""))
        newline = self.app.get_key_display(Binding(keys["newline"].split(",")[0], ""))
        self.prompt.border_title = f"message · {send} sends · {newline} new line"
        self.prompt.focus()
