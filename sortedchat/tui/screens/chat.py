"""The main screen: legend, conversation (and the layer lens beside it), message box, status line.

The screen shows one `Dialogue` and turns the chat keys into calls on it. The answer is generated on a worker
thread that never touches a widget: a 30 Hz timer moves the tokens that arrived into the conversation in one
batch, so rendering can never hold the model back. Below 110 columns the screen has the class `-narrow` and
the layer lens sits under the conversation instead of beside it (app.tcss).
"""

from __future__ import annotations

import time
from pathlib import Path

from textual import work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen

from sortedchat import SortedChatError
from sortedchat.tui.dialogue import Dialogue
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.screens.rename import RenameScreen
from sortedchat.tui.screens.settings import SettingsScreen
from sortedchat.tui.settings import ACTIONS, key_name
from sortedchat.tui.storage import StoredToken
from sortedchat.tui.widgets.answer import AnswerView, TokenText
from sortedchat.tui.widgets.conversation import Conversation, Welcome
from sortedchat.tui.widgets.footer import ChatFooter
from sortedchat.tui.widgets.legend import ExitLegend
from sortedchat.tui.widgets.lens import LayerLens
from sortedchat.tui.widgets.prompt import PromptInput
from sortedchat.tui.widgets.status import ExitSparkline, StatusBar, status_parts

FLUSH_HZ = 30  # tokens reach the screen at most this often
GAUGE_HZ = 4  # the status line and sparkline, which need not follow every batch

APP_ACTIONS = {"help"}  # the app's own: it opens from every screen


class GenerationDone(Message, bubble=False):
    """The worker's answer has ended (finished, stopped, or failed)."""


class ChatScreen(Screen):
    """One `Dialogue` on screen; the keys act on it, dialogs (saved chats, rename, settings) open over it."""

    # Priority: these keys act wherever the focus is (the message box would otherwise take F6/F7).
    # The chat screen's `settings.ACTIONS` (those the footer does not show are in the help screen).
    BINDINGS = [Binding(act.keys, f"app.{a}" if a in APP_ACTIONS else a, act.label, id=a, priority=True,
                        show=act.shown) for a, act in ACTIONS.items() if act.owner == "chat"] + [
        Binding("pageup", "scroll_conversation(-1)", show=False, priority=True),
        Binding("pagedown", "scroll_conversation(1)", show=False, priority=True),
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]

    def __init__(self, dialogue: Dialogue, show_speed: bool, export_dir: Path):
        super().__init__()
        sm = dialogue.session.sm
        self.dialogue, self.show_speed, self.export_dir = dialogue, show_speed, export_dir
        self.conversation = Conversation(sm.num_layers, sm.exits[0], id="conversation")
        self.lens = LayerLens(sm)
        self.prompt = PromptInput(id="prompt")
        self.status = StatusBar(id="status")
        self.sparkline = ExitSparkline(sm.num_layers, sm.exits[0], id="sparkline")
        self._gauges_at = 0.0
        self._reading_shown: tuple[int, int] | None = None  # the prompt pass's progress the status line shows

    def compose(self):
        sm = self.dialogue.session.sm
        keys = self.app.settings.keymap()
        self.keys_shown = {action: self.app.get_key_display(Binding(k.split(",")[0], "")) for action, k in keys.items()}
        self.conversation.welcome_keys = self.keys_shown
        self.dialogue.new_chat_hint = f"{self.keys_shown['new_chat']} starts a new chat"
        self.stop_key = key_name(keys, "stop", self.app.get_key_display)
        with Horizontal(id="topline"):
            yield ExitLegend(sm.exits, sm.num_layers, self.dialogue.control.agreement, id="legend")
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
        self._flush_timer = self.set_interval(1 / FLUSH_HZ, self._flush_tokens, pause=True)
        self.app.theme_changed_signal.subscribe(self, self._recolour)
        self.call_after_refresh(self.show_status)
        try:
            self.prompt.sent = self.dialogue.store.recent_prompts()
        except SortedChatError as exc:
            self.notify(str(exc), severity="warning")

    def on_unmount(self) -> None:
        self.dialogue.stop()  # the app is closing: let a running answer end at its next token

    def action_scroll_conversation(self, pages: int) -> None:
        """PageUp/PageDown scroll the conversation from wherever the focus is (the message box too)."""
        if pages < 0:
            self.conversation.scroll_page_up(animate=False)
        else:
            self.conversation.scroll_page_down(animate=False)

    @property
    def answer(self) -> AnswerView | None:
        """The answer being generated, or the last one."""
        return self.conversation.last_answer

    # -- sending and streaming ----------------------------------------------------------------------
    def on_prompt_input_submitted(self, message: PromptInput.Submitted) -> None:
        if self.dialogue.generating:
            self.notify(f"Still answering: {self.stop_key} stops the answer.", severity="warning")
            return
        if self.send(message.text):
            self.prompt.clear()

    def send(self, text: str) -> bool:
        """Start answering `text` as the next user message of this chat; False when it was refused (too long for
        the model's context: the user is told, and nothing was saved)."""
        try:
            notes = self.dialogue.send(text, self.app.settings.system_prompt, self.app.settings.sampling())
        except SortedChatError as exc:
            self.notify(f"{exc}; nothing was sent", severity="error", timeout=10)
            return False
        for note in notes:
            self.notify(note, severity="warning", timeout=15)
        self.conversation.add_user(text)
        self.prompt.remember(text)
        answer = self.dialogue.answer
        self.conversation.add_answer(self.dialogue.fit.messages, answer.modes[0])  # the lens shows what the model saw
        self._flush_timer.resume()
        self.show_status()
        self.refresh_bindings()
        self._generate()
        return True

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self) -> None:
        self.dialogue.generate(self.app.settings.sampling())
        self.post_message(GenerationDone())

    def _flush_tokens(self) -> None:
        """Move the tokens generated since the last flush onto the screen, in one batch."""
        batch = self.dialogue.take_tokens()
        if not batch:
            if self.dialogue.prefill != self._reading_shown:  # a long prompt pass moved on
                self.show_status()
            return
        self.conversation.add_tokens(StoredToken(e.token_id, e.text, e.exit_layer, e.confidence) for e in batch)
        self.sparkline.extend((e.exit_layer for e in batch), redraw=False)
        now = time.monotonic()
        if now - self._gauges_at >= 1 / GAUGE_HZ:
            self._gauges_at = now
            self.show_status()

    def on_generation_done(self, message: GenerationDone) -> None:
        self._flush_tokens()
        self._flush_timer.pause()
        for error in self.dialogue.finish():
            self.notify(error, severity="error", timeout=10)
        if self.dialogue.stats and self.dialogue.stats.stopped == "repetition":
            self.notify(f"The answer was stopped: it kept repeating itself. Untick Repeats in the settings "
                        f"({self.keys_shown['settings']}) to let answers run on.", severity="warning", timeout=10)
        self.show_status()
        self.refresh_bindings()

    def show_status(self) -> None:
        import torch  # loaded with the model, before this screen shows

        d = self.dialogue
        self.sparkline.refresh()
        self._reading_shown = d.prefill
        self.status.show(status_parts(d.model_name, d.control.label(), d.stats, self.show_speed, d.generating,
                                      d.session.sm.device, answer_mode=d.answer.modes[-1] if d.answer else None,
                                      context=d.context(), reading=d.prefill, threads=torch.get_num_threads()))

    async def _recolour(self, theme) -> None:
        """Exit colours follow the theme: they must stay readable on its background."""
        self.conversation.recolour()
        self.query_one(ExitLegend).refresh()
        self.sparkline.refresh()
        await self.lens.recolour()

    # -- depth and mode keys ------------------------------------------------------------------------
    def _set_mode(self, note: str | None) -> None:
        if self.dialogue.apply_mode():
            self.answer.show_modes(self.dialogue.answer.modes)
        if note:
            self.notify(note)
        self.show_status()

    def action_shallower(self) -> None:
        self._set_mode(self.dialogue.control.step(-1))

    def action_deeper(self) -> None:
        self._set_mode(self.dialogue.control.step(+1))

    def action_auto(self) -> None:
        self.dialogue.control.toggle_auto()
        self._set_mode(None)

    def action_speculative(self) -> None:
        self._set_mode(self.dialogue.control.toggle_speculative())

    def action_threshold_down(self) -> None:
        self._set_mode(self.dialogue.control.adjust_threshold(-1))

    def action_threshold_up(self) -> None:
        self._set_mode(self.dialogue.control.adjust_threshold(+1))

    def action_kv(self) -> None:
        self._set_mode(self.dialogue.control.toggle_kv())

    def action_stop(self) -> None:
        """Esc: stop the answer; with no answer running, close the layer lens."""
        if self.dialogue.generating:
            self.dialogue.stop()
        elif self.lens.display:
            self.action_lens()

    def check_action(self, action: str, parameters) -> bool | None:
        if self.app.screen is not self:
            return False  # a dialog is open over this screen: its footer shows none of these keys
        if action == "stop":
            return self.dialogue.generating or self.lens.display
        return True

    # -- views --------------------------------------------------------------------------------------
    def action_view(self) -> None:
        self.conversation.set_markdown(not self.conversation.markdown)
        if self.conversation.markdown:
            self.lens.display = False

    def action_lens(self) -> None:
        self.lens.display = not self.lens.display
        if not self.lens.display:
            self.prompt.focus()
            return
        if self.conversation.markdown:
            self.action_view()
        if self.answer is not None:
            view = self.answer.depth_view
            view.focus()
            if view.cursor is None:
                view.action_edge(1)  # the last token

    def on_token_text_selected(self, message: TokenText.Selected) -> None:
        if isinstance(message.view.parent, AnswerView):
            self.lens.inspect(message.view.parent, message.index)
            message.view.reveal(message.index)  # the lens may take the lower half of the conversation

    # -- chats --------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        if self.dialogue.generating:
            self.notify(f"Still answering: {self.stop_key} stops the answer first.", severity="warning")
        return self.dialogue.generating

    async def action_new_chat(self) -> None:
        if self._busy():
            return
        self.dialogue.new_chat()
        await self._clear_view()
        self.prompt.remember(self.prompt.text.strip())  # an unsent draft: ↑ brings it back
        self.prompt.clear()
        self.prompt.focus()

    def action_chats(self) -> None:
        if not self._busy():
            self.app.push_screen(ChatListScreen(self.dialogue.store, self.export_dir), self.open_chat)

    async def open_chat(self, chat_id: int | None) -> None:
        """Show a saved chat and continue it (None: the saved-chats list closed with no choice)."""
        if chat_id is None:
            return
        chat = self.dialogue.open(chat_id)
        await self._clear_view()
        self.conversation.show_chat(chat.messages)
        self.prompt.focus()

    async def _clear_view(self) -> None:
        await self.conversation.clear()
        self.sparkline.clear()
        self.lens.display = False
        self.show_status()

    async def forget(self, chat_id: int) -> None:
        """A chat was deleted: if it is the open one, the next message starts a new one."""
        if chat_id == self.dialogue.chat_id:
            self.dialogue.new_chat()
            await self._clear_view()

    def action_export(self) -> None:
        if self.dialogue.chat_id is None:
            self.notify("Nothing to export yet.")
            return
        try:
            self.notify(f"exported to {self.dialogue.store.export_to(self.dialogue.chat_id, self.export_dir)}")
        except (OSError, SortedChatError) as exc:
            self.notify(f"export failed: {exc}", severity="error")

    async def action_regenerate(self) -> None:
        """Answer the last message again, in the current mode; the old answer goes."""
        if self._busy():
            return
        again = self._same_answer_again()
        try:
            question = self.dialogue.take_back_last_turn()
        except SortedChatError as exc:
            self.notify(str(exc), severity="error")
            return
        if question is None:
            self.notify("Nothing to regenerate yet.")
            return
        await self.conversation.remove_last_turn()
        if not self.send(question):
            self.prompt.text = question  # refused (a setting changed since): the question waits in the message box
        elif again:
            self.notify(again, timeout=10)

    def _same_answer_again(self) -> str | None:
        """Why regenerating will write the last answer again, word for word (nothing samples differently, and the
        mode is the one it was written in), and what would change it; None when it will not."""
        settings, keys, answer = self.app.settings, self.keys_shown, self.dialogue.answer
        if answer is None or answer.modes != [self.dialogue.control.label()]:
            return None
        if settings.temperature == 0:
            why, fix = "temperature is 0", "raise it"
        elif settings.seed is not None:
            why, fix = f"the seed is fixed ({settings.seed})", "clear it"
        else:
            return None
        return (f"{why}: the same answer again; {fix} in settings ({keys['settings']}) or change the depth "
                f"({keys['shallower']}/{keys['deeper']}) for another")

    def action_copy(self) -> None:
        text = self.answer.text if self.answer else ""
        if not text:
            self.notify("No answer to copy yet.")
            return
        self.app.copy_to_clipboard(text)  # an OSC 52 escape: whether it lands is the terminal's choice, unseen here
        self.notify(f"sent the last answer ({len(text)} characters) to the terminal's clipboard (OSC 52); if nothing "
                    f"was copied, your terminal ignores it: {self.keys_shown['export']} saves the chat to a file",
                    timeout=10)

    def action_rename(self) -> None:
        if self.dialogue.chat_id is None:
            self.notify("Nothing to rename yet: the chat is saved with its first message.")
            return
        try:
            title = self.dialogue.title()
        except SortedChatError as exc:
            self.notify(str(exc), severity="error")
            return
        self.app.push_screen(RenameScreen(title), self._renamed)

    def _renamed(self, title: str | None) -> None:
        if title is None or self.dialogue.chat_id is None:
            return
        try:
            self.dialogue.rename(title)
            self.notify(f"renamed to {title!r}")
        except SortedChatError as exc:
            self.notify(str(exc), severity="error")

    def action_settings(self) -> None:
        self.app.push_screen(SettingsScreen(self.app.settings), self.app.apply_settings)

    def system_commands(self):
        """This screen's commands in the command palette (Ctrl+P): the `settings.ACTIONS` with a palette entry."""
        for name, act in ACTIONS.items():
            if act.palette is not None:
                owner = self.app if name in APP_ACTIONS else self
                yield SystemCommand(*act.palette, getattr(owner, f"action_{name}"))
