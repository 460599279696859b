"""The `sortedchat` app: chat with a sorted model and watch, per token, how deep it went.

The app owns the model, one `ChatSession` and the chat store; screens and widgets only show things
and post messages up. Blocking work runs in thread workers: loading the model, generating (the
engine's loop), and the layer lens's extra forward pass. The generation thread never touches a
widget: it saves each token and appends the event to a queue, and a 30 Hz timer on the UI side
drains the queue into the screen in one batch, so rendering can never hold the model back. Mode keys
assign `session.mode`, which the engine reads before every token, so a change applies to the next
token even in the middle of an answer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from platformdirs import user_downloads_path
from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message

from sortedchat import SortedChatError
from sortedchat.config import atomic_write_text
from sortedchat.tui.depth import DepthControl
from sortedchat.tui.screens.chat import ChatScreen
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.screens.help import HelpScreen
from sortedchat.tui.screens.loading import LoadingScreen
from sortedchat.tui.screens.rename import RenameScreen
from sortedchat.tui.screens.settings import SettingsScreen
from sortedchat.tui.settings import Settings, load_settings, save_settings
from sortedchat.tui.storage import ChatStore, StoredChat, StoredToken
from sortedchat.tui.widgets.answer import AnswerView, TokenText, mode_range
from sortedchat.tui.widgets.conversation import UserMessage
from sortedchat.tui.widgets.prompt import PromptInput
from sortedchat.tui.widgets.status import status_parts
from sortedchat.tui.warmup import warm_up

if TYPE_CHECKING:  # the engine imports torch: the app imports it only once the loading screen shows
    from sortedchat.engine import ChatSession, GenerationStats, Mode, TokenEvent
    from sortedchat.sorted_model import SortedModel

FLUSH_HZ = 30  # tokens reach the screen at most this often
GAUGE_HZ = 4  # the status line and sparkline, which need not follow every batch
LENS_TOP_K = 4
Loader = Callable[[Callable[[str, float | None], None]], "SortedModel"]


class GenerationDone(Message):
    def __init__(self, message_id: int, error: str | None):
        super().__init__()
        self.message_id, self.error = message_id, error


class LensReady(Message):
    def __init__(self, request: int, rows: dict[int, list[tuple[int, str, float]]]):
        super().__init__()
        self.request, self.rows = request, rows


def model_label(sm: SortedModel) -> str:
    """A short name for the status line: a local directory by its name, anything else as given."""
    source = sm.source or "model"
    path = Path(source)
    return path.name if path.exists() else source


class SortedChatApp(App):
    """Give it a loaded `model`, or a `loader(progress)` that loads one while a loading screen shows.

    `initial_mode(sm)` builds the starting mode once the model is known (it validates depths against
    the model); `show_speed=False` leaves tokens/s out of the status line (for repeatable screenshots).
    After `run()`, `error` holds the reason the app could not start, if any.
    """

    CSS_PATH = "app.tcss"
    TITLE = "sortedchat"
    INHERIT_BINDINGS = False
    BINDINGS = [
        Binding("f1", "help", "Help", id="help"),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
        Binding("ctrl+c", "help_quit", show=False, system=True),
    ]
    CHAT_ACTIONS = {"shallower", "deeper", "auto", "speculative", "threshold_down", "threshold_up", "kv", "view",
                    "lens", "stop", "new_chat", "chats", "settings", "export", "regenerate", "copy", "rename"}

    def __init__(
        self,
        model: SortedModel | None = None,
        loader: Loader | None = None,
        initial_mode: Callable[[SortedModel], Mode] | None = None,
        settings: Settings | None = None,
        store: ChatStore | None = None,
        show_speed: bool = True,
        export_dir: Path | None = None,
        loading_label: str = "the model",
    ):
        super().__init__()
        if model is None and loader is None:
            raise ValueError("SortedChatApp needs a model or a loader")
        self.sm, self.loader, self.initial_mode = model, loader, initial_mode
        self.settings = settings or Settings()
        self.store = store
        self.show_speed = show_speed
        self.export_dir = export_dir or Path.cwd()
        self.loading_label = loading_label
        self.error: str | None = None
        self.session: ChatSession | None = None
        self.control: DepthControl | None = None
        self.chat: ChatScreen | None = None
        self.history: list[dict] = []  # the conversation as the engine takes it
        self.chat_id: int | None = None
        self.generating = False
        self.markdown = False
        self.answer: AnswerView | None = None  # the answer being generated (or the last one)
        self.events: list[TokenEvent] = []  # events of that answer, as shown
        self.stats: GenerationStats | None = None
        self._pending: deque[TokenEvent] = deque()
        self._stop = threading.Event()
        self.model_name = ""
        self._lens_request = 0
        self._lens_token: tuple[int, StoredToken] | None = None
        self._gauges_at = 0.0
        self._flush_timer = None
        self.answer_modes: list[str] = []  # the modes the answer being generated has used, in order

    # -- start-up -----------------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.set_keymap(self.settings.keymap())
        if self.settings.theme in self.available_themes:
            self.theme = self.settings.theme
        elif self.settings.theme:
            self.notify(f"theme {self.settings.theme!r} is not installed; using {self.theme}", severity="warning")
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        if self.sm is not None:
            self._model_ready(self.sm)
        else:
            loading = LoadingScreen(self.loading_label)
            self.push_screen(loading)
            # A daemon thread, not a worker: Python waits for executor threads at exit, so Ctrl+Q during a
            # minute-long first conversion would wait for it. Conversions publish atomically; a killed one is redone.
            threading.Thread(target=self._load, args=(loading,), name="sortedchat-load", daemon=True).start()

    def _load(self, screen: LoadingScreen) -> None:
        def report(callback, *args) -> None:
            if self.is_running:  # the user may have quit while the model loads
                self.call_from_thread(callback, *args)

        try:
            sm = self.loader(lambda stage, fraction=None: report(screen.set_progress, stage, fraction))
        except SortedChatError as exc:
            report(self._fail, str(exc))
            return
        report(screen.set_progress, "warming up", None)
        try:
            mode = self.initial_mode(sm) if self.initial_mode else None
        except SortedChatError:
            mode = None  # `_model_ready` reports it
        warm_up(sm, mode, should_stop=self._stop.is_set)
        report(self._model_ready, sm)

    def _fail(self, reason: str) -> None:
        self.error = reason
        self.exit(return_code=1)

    def _model_ready(self, sm: SortedModel) -> None:
        from sortedchat.engine import ChatSession, Mode

        try:
            mode = (self.initial_mode(sm) if self.initial_mode else Mode.fixed()).validate(sm.num_layers)
            self.store = self.store or ChatStore()
        except SortedChatError as exc:
            self._fail(str(exc))
            return
        self.sm = sm
        self.model_name = model_label(sm)
        self.session = ChatSession(sm, mode)
        self.control = DepthControl.for_model(sm, mode)
        self.chat = ChatScreen(sm.exits, sm.num_layers)
        if isinstance(self.screen, LoadingScreen):
            self.switch_screen(self.chat)
        else:
            self.push_screen(self.chat)
        self._flush_timer = self.set_interval(1 / FLUSH_HZ, self._flush_tokens, pause=True)
        self.call_after_refresh(self._show_status)
        try:
            self.chat.prompt.sent = self.store.recent_prompts()
        except SortedChatError as exc:
            self.notify(str(exc), severity="warning")
        if self.store.notice:
            self.notify(self.store.notice, severity="warning", timeout=15)

    # -- sending and streaming ----------------------------------------------------------------------
    def on_prompt_input_submitted(self, message: PromptInput.Submitted) -> None:
        if self.generating:
            self.notify("Still answering: Esc stops the answer.", severity="warning")
            return
        self.chat.prompt.clear()
        self.send(message.text)

    def send(self, text: str) -> None:
        """Start answering `text` as the next user message of this chat."""
        if self.chat_id is None and self.settings.system_prompt:
            self.history.append({"role": "system", "content": self.settings.system_prompt})
        self.history.append({"role": "user", "content": text})
        label = self.control.label()
        try:
            self.chat_id, message_id = self.store.start_answer(self.chat_id, self.history, label, self.model_name)
        except SortedChatError as exc:  # the chat was deleted, or the file was damaged and set aside
            self.notify(f"{exc}; saving this conversation as a new chat", severity="warning", timeout=10)
            self.chat_id, message_id = self.store.start_answer(None, self.history, label, self.model_name)
        self.chat.conversation.add_user(text)
        self.chat.prompt.remember(text)
        self.answer = self._answer_view(list(self.history), label)
        self.answer_modes = [label]
        self.chat.conversation.add_answer(self.answer)
        self.events, self.stats = [], None
        self._stop.clear()
        self.generating = True
        self._flush_timer.resume()
        self._show_status()
        self.refresh_bindings()
        self._generate(list(self.history), message_id)

    def _answer_view(self, context: list[dict], label: str) -> AnswerView:
        return AnswerView(context, self.sm.num_layers, self.sm.exits[0], label, markdown=self.markdown)

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, context: list[dict], message_id: int) -> None:
        error = None
        try:
            sampling = self.settings.sampling()
            for ev in self.session.generate(context, sampling, should_stop=self._stop.is_set):
                self.store.add_token(message_id, ev.index, ev.token_id, ev.text, ev.exit_layer, ev.confidence)
                self._pending.append(ev)
        except SortedChatError as exc:
            error = str(exc)
        self.post_message(GenerationDone(message_id, error))

    def _flush_tokens(self) -> None:
        """Move the tokens generated since the last flush onto the screen, in one batch."""
        if not self._pending:
            return
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        self.events.extend(batch)
        self.stats = self.session.last_stats
        at_bottom = self.chat.conversation.at_bottom
        self.answer.add_tokens(StoredToken(e.token_id, e.text, e.exit_layer, e.confidence) for e in batch)
        self.chat.conversation.follow(at_bottom)
        self.chat.sparkline.extend((e.exit_layer for e in batch), redraw=False)
        now = time.monotonic()
        if now - self._gauges_at >= 1 / GAUGE_HZ:
            self._gauges_at = now
            self._show_status()

    def on_generation_done(self, message: GenerationDone) -> None:
        self._flush_tokens()
        self._flush_timer.pause()
        self.generating = False
        self.stats = self.session.last_stats if self.events else None
        content = self.answer.text
        try:
            self.store.finish_message(message.message_id, content, self.stats.to_dict() if self.stats else None)
            if len(self.answer_modes) > 1:
                self.store.set_message_mode(message.message_id, mode_range(self.answer_modes))
        except SortedChatError as exc:  # the tokens are saved; a damaged file was set aside
            self.notify(str(exc), severity="error", timeout=10)
        self.history.append({"role": "assistant", "content": content})
        if message.error:
            self.notify(message.error, severity="error", timeout=10)
        self._show_status()
        self.refresh_bindings()

    def _show_status(self) -> None:
        if self.chat is not None:
            self.chat.sparkline.refresh()
            self.chat.status.show(status_parts(self.model_name, self.control.label(), self.stats, self.show_speed,
                                               self.generating, self.sm.device))

    # -- depth and mode keys ------------------------------------------------------------------------
    def _set_mode(self, note: str | None) -> None:
        self.session.mode = self.control.mode()  # the engine picks it up before its next token
        if self.generating and self.control.label() != self.answer_modes[-1]:
            self.answer_modes.append(self.control.label())
            self.answer.show_modes(self.answer_modes)
        if note:
            self.notify(note)
        self._show_status()

    def action_shallower(self) -> None:
        self._set_mode(self.control.step(-1))

    def action_deeper(self) -> None:
        self._set_mode(self.control.step(+1))

    def action_auto(self) -> None:
        self.control.toggle_auto()
        self._set_mode(None)

    def action_speculative(self) -> None:
        self._set_mode(self.control.toggle_speculative())

    def action_threshold_down(self) -> None:
        self._set_mode(self.control.adjust_threshold(-1))

    def action_threshold_up(self) -> None:
        self._set_mode(self.control.adjust_threshold(+1))

    def action_kv(self) -> None:
        self._set_mode(self.control.toggle_kv())

    def action_stop(self) -> None:
        """Esc: stop the answer; with no answer running, close the layer lens."""
        if self.generating:
            self._stop.set()
        elif self.chat.lens.display:
            self.action_lens()

    # -- views --------------------------------------------------------------------------------------
    def action_view(self) -> None:
        self.markdown = not self.markdown
        for answer in self.chat.conversation.answers():
            answer.set_markdown(self.markdown)
        if self.markdown:
            self.chat.lens.display = False

    def action_lens(self) -> None:
        lens = self.chat.lens
        lens.display = not lens.display
        if lens.display:
            if self.markdown:
                self.action_view()
            answers = self.chat.conversation.answers()
            if answers:
                view = answers[-1].depth_view
                view.focus()
                if view.cursor is None:
                    view.action_edge(1)  # the last token
        else:
            self.chat.prompt.focus()

    def on_token_text_selected(self, message: TokenText.Selected) -> None:
        answer = message.view.parent
        if not isinstance(answer, AnswerView):
            return
        self.chat.lens.display = True
        token = answer.tokens[message.index]
        self._lens_request += 1
        self._lens_token = (message.index, token)
        self.chat.lens.show_pending(token.text, message.index)
        before = [t.token_id for t in answer.tokens[: message.index]]
        self._lens(self._lens_request, answer.context, before)

    @work(thread=True, exclusive=True, group="lens")
    def _lens(self, request: int, context: list[dict], before: list[int]) -> None:
        from sortedchat.engine.session import encode_chat

        ids = encode_chat(self.sm, context) + before
        preds = self.sm.exit_top_predictions(ids, k=LENS_TOP_K)
        decode = self.sm.tokenizer.decode
        rows = {e: [(tid, decode([tid]), p) for tid, p in preds[e]] for e in sorted(preds)}
        self.post_message(LensReady(request, rows))

    async def on_lens_ready(self, message: LensReady) -> None:
        if message.request != self._lens_request:
            return  # the user has selected another token since
        index, token = self._lens_token
        await self.chat.lens.show_predictions(token.text, index, token.token_id, token.exit_layer,
                                              token.confidence, message.rows)

    # -- chats --------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        if self.generating:
            self.notify("Still answering: Esc stops the answer first.", severity="warning")
        return self.generating

    async def action_new_chat(self) -> None:
        if self._busy():
            return
        await self._reset_chat()
        self.chat.prompt.remember(self.chat.prompt.text.strip())  # an unsent draft: ↑ brings it back
        self.chat.prompt.clear()
        self.chat.prompt.focus()

    async def _reset_chat(self) -> None:
        await self.chat.conversation.clear()
        self.history, self.chat_id, self.answer, self.events, self.stats = [], None, None, [], None
        self.session.reset()
        self.chat.sparkline.clear()
        self.chat.lens.display = False
        self._show_status()

    def action_chats(self) -> None:
        if not self._busy():
            self.push_screen(ChatListScreen(self.store, self.export_chat), self._open_chosen)

    async def _open_chosen(self, chat_id: int | None) -> None:
        if chat_id is not None:
            await self.open_chat(chat_id)

    async def open_chat(self, chat_id: int) -> None:
        """Show a saved chat and continue it."""
        chat: StoredChat = self.store.load(chat_id)
        await self._reset_chat()
        self.chat_id = chat_id
        for m in chat.messages:
            if m.role == "user":
                self.chat.conversation.add_user(m.content)
            elif m.role == "assistant":
                view = self._answer_view(list(self.history), m.mode)
                self.chat.conversation.add_answer(view)
                view.add_tokens(m.tokens)
                self.answer = view
            self.history.append({"role": m.role, "content": m.content})
        self.chat.prompt.focus()

    async def on_chat_list_screen_deleted(self, message: ChatListScreen.Deleted) -> None:
        if message.chat_id == self.chat_id:  # the open chat is gone: the next message starts a new one
            await self._reset_chat()

    def export_chat(self, chat_id: int) -> Path:
        path = self.export_dir / self.store.export_name(chat_id)
        return atomic_write_text(path, self.store.export_markdown(chat_id))

    def action_export(self) -> None:
        if self.chat_id is None:
            self.notify("Nothing to export yet.")
            return
        try:
            self.notify(f"exported to {self.export_chat(self.chat_id)}")
        except (OSError, SortedChatError) as exc:
            self.notify(f"export failed: {exc}", severity="error")

    async def action_regenerate(self) -> None:
        """Answer the last message again, in the current mode; the old answer goes."""
        if self._busy():
            return
        if self.chat_id is None or len(self.history) < 2 or self.history[-1]["role"] != "assistant":
            self.notify("Nothing to regenerate yet.")
            return
        try:
            self.store.drop_last_turn(self.chat_id)
        except SortedChatError as exc:
            self.notify(str(exc), severity="error")
            return
        self.history.pop()
        question = self.history.pop()["content"]
        conversation = self.chat.conversation
        await conversation.query(UserMessage).last().remove()
        await conversation.answers()[-1].remove()
        self.send(question)

    def action_copy(self) -> None:
        if self.answer is None or not self.answer.text:
            self.notify("No answer to copy yet.")
            return
        self.copy_to_clipboard(self.answer.text)
        self.notify(f"copied the last answer ({len(self.answer.text)} characters)")

    def action_rename(self) -> None:
        if self.chat_id is None:
            self.notify("Nothing to rename yet: the chat is saved with its first message.")
            return
        try:
            title = self.store.load(self.chat_id).title
        except SortedChatError as exc:
            self.notify(str(exc), severity="error")
            return
        self.push_screen(RenameScreen(title), self._renamed)

    def _renamed(self, title: str | None) -> None:
        if title is None or self.chat_id is None:
            return
        try:
            self.store.rename_chat(self.chat_id, title)
            self.notify(f"renamed to {title!r}")
        except SortedChatError as exc:
            self.notify(str(exc), severity="error")

    # -- dialogs ------------------------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.settings.keymap()))

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.settings), self._settings_saved)

    def _settings_saved(self, settings: Settings | None) -> None:
        if settings is None:
            return
        changed = {f: getattr(settings, f) for f in vars(settings) if getattr(settings, f) != getattr(self.settings, f)}
        self.settings = settings
        path = self._save_settings(changed)
        if path is not None:
            self.notify(f"settings saved to {path}")

    def _save_settings(self, changed: dict) -> Path | None:
        """Write `changed` over what the config file holds: values given on the command line (`-n 40`)
        apply to this run only and stay out of the file."""
        if not changed:
            return None
        try:
            on_file = load_settings()
            for name, value in changed.items():
                setattr(on_file, name, value)
            return save_settings(on_file)
        except (SortedChatError, OSError) as exc:
            self.notify(f"settings not saved: {exc}", severity="error")
            return None

    async def _theme_changed(self, theme) -> None:
        """Exit colours follow the theme (they must stay readable on its background); the choice is kept."""
        if self.chat is not None:
            for answer in self.chat.conversation.answers():
                answer.depth_view.recolour()
            self.chat.query_one("#legend").refresh()
            self.chat.sparkline.refresh()
            await self.chat.lens.recolour()
        if theme.name != self.settings.theme:
            self.settings.theme = theme.name
            self._save_settings({"theme": theme.name})

    def action_screenshot(self, filename: str | None = None, path: str | None = None) -> None:
        """Textual saves screenshots to ~/Downloads and fails without a word when it is missing: then they go
        where exports go, and the notification says where."""
        if path is None and not user_downloads_path().is_dir():
            path = str(self.export_dir)
        self.deliver_screenshot(filename, path)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        if screen is not self.chat:
            return
        for title, help_text, action in [
            ("New chat", "Start an empty conversation", self.action_new_chat),
            ("Saved chats", "Reopen, delete or export an earlier chat", self.action_chats),
            ("Export chat to Markdown", "Write this chat to a .md file", self.action_export),
            ("Rename chat", "Give this chat another title", self.action_rename),
            ("Regenerate", "Answer the last message again, in the current mode", self.action_regenerate),
            ("Copy the last answer", "To the clipboard", self.action_copy),
            ("Settings", "System prompt, temperature, top-p, max tokens, seed", self.action_settings),
            ("Keys and colours", "Show every key and how to read the colours", self.action_help),
            ("Shallower", "One exit less for the next tokens", self.action_shallower),
            ("Deeper", "One exit more for the next tokens", self.action_deeper),
            ("Toggle auto mode", "Exit each token at the first confident exit", self.action_auto),
            ("Toggle speculative mode", "Draft at the current depth, verify with the full model",
             self.action_speculative),
            ("Toggle Markdown view", "Depth colours or rendered Markdown", self.action_view),
            ("Layer lens", "Every exit's predictions at a selected token", self.action_lens),
        ]:
            yield SystemCommand(title, help_text, action)

    def check_action(self, action: str, parameters) -> bool | None:
        if action in self.CHAT_ACTIONS:
            if self.session is None or self.screen is not self.chat:
                return False
            if action == "stop":
                return self.generating or self.chat.lens.display
        return True

    async def action_quit(self) -> None:
        self._stop.set()  # let a running generation end at its next token
        self.exit()

    def on_unmount(self) -> None:
        self._stop.set()
