"""The main screen: legend, conversation (and the layer lens beside it), message box, status line.

The screen only lays widgets out and binds the keys; what the keys do lives in the app, which owns
the model, the chat session and the saved chats. Below 110 columns the screen has the class `-narrow`
and the layer lens sits under the conversation instead of beside it (app.tcss).
"""

from __future__ import annotations

from rich.cells import cell_len
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

from sortedchat.tui.settings import KEY_ACTIONS
from sortedchat.tui.widgets.conversation import Conversation, Welcome
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
    "stop": "Stop/close",
    "new_chat": "New",
    "chats": "Chats",
    "settings": "Settings",
    "export": "Export",
    "regenerate": "Regenerate",
    "copy": "Copy",
    "rename": "Rename",
}
HIDDEN = {"threshold_down", "threshold_up", "kv", "export", "regenerate", "copy", "rename"}
# When the footer is too narrow for every key, these go first, in this order (F1's help lists them all).
DROP_FIRST = ["command_palette", "submit", "settings", "speculative", "view", "lens", "chats", "new_chat", "auto"]


class ChatFooter(Footer):
    """The footer, less its least needed keys when they would not all fit the width."""

    def compose(self):
        keys = list(super().compose())
        width = self.size.width or self.app.size.width

        def used() -> int:
            return sum(cell_len(k.key_display) + 1 + cell_len(k.description) + 1 for k in keys)

        for action in DROP_FIRST:
            if used() <= width:
                break
            keys = [k for k in keys if k.action.removeprefix("app.") != action]
        yield from keys

    _width = 0

    def on_resize(self, event) -> None:
        if event.size.width != self._width:  # keys dropped at one width may fit at the new one
            self._width = event.size.width
            self.call_after_refresh(self.recompose)


class ChatScreen(Screen):
    # Priority: these keys act wherever the focus is (the message box would otherwise take F6/F7).
    BINDINGS = [Binding(KEY_ACTIONS[a][0], f"app.{a}", label, id=a, priority=True, show=a not in HIDDEN)
                for a, label in FOOTER.items()] + [
        Binding("pageup", "scroll_conversation(-1)", show=False, priority=True),
        Binding("pagedown", "scroll_conversation(1)", show=False, priority=True),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]

    def __init__(self, exits: list[int], num_layers: int):
        super().__init__()
        self.exits, self.num_layers = exits, num_layers
        self.conversation = Conversation(id="conversation")
        self.lens = LayerLens(num_layers, exits[0])
        self.prompt = PromptInput(id="prompt")
        self.status = StatusBar(id="status")
        self.sparkline = ExitSparkline(num_layers, exits[0], id="sparkline")

    def compose(self):
        keys = self.app.settings.keymap()
        self.keys_shown = {action: self.app.get_key_display(Binding(k.split(",")[0], "")) for action, k in keys.items()}
        self.conversation.welcome_keys = self.keys_shown
        with Horizontal(id="topline"):
            yield ExitLegend(self.exits, self.num_layers, id="legend")
            yield self.sparkline
        with Horizontal(id="main"):
            with self.conversation:
                yield Welcome(self.keys_shown)
            yield self.lens
        yield self.prompt
        yield self.status
        yield ChatFooter(compact=True)

    def on_mount(self) -> None:
        shown = self.keys_shown
        self.prompt.border_title = f"message · {shown['send']} sends · {shown['newline']} new line · ↑ ↓ earlier"
        self.prompt.focus()

    def action_scroll_conversation(self, pages: int) -> None:
        """PageUp/PageDown scroll the conversation from wherever the focus is (the message box too)."""
        if pages < 0:
            self.conversation.scroll_page_up(animate=False)
        else:
            self.conversation.scroll_page_down(animate=False)
