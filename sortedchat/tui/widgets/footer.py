"""The chat screen's footer: its keys, less the least needed ones when they would not all fit the width."""

from __future__ import annotations

from rich.cells import cell_len
from textual.widgets import Footer

from sortedchat.tui.settings import ACTIONS

# When the footer is too narrow for every key, these go first, in this order (F1's help lists them all): Textual's
# command palette key and the message box's send key, then the app's actions by their `drop` rank.
DROP_FIRST = ["command_palette", "submit"] + sorted((a for a in ACTIONS if ACTIONS[a].drop is not None),
                                                    key=lambda a: ACTIONS[a].drop)


class ChatFooter(Footer):
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
