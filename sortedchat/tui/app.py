"""The `sortedchat` app: chat with a sorted model and watch, per token, how deep it went.

The app only routes: it loads the model behind a loading screen, then shows a `ChatScreen` on a `Dialogue`
(the conversation: messages, mode, the running answer, what is saved), and owns what every screen shares:
the settings, the theme and the help. Screens and widgets keep their own state and post messages up; blocking
work runs on threads (loading the model here, generating in the chat screen, the layer lens's forward pass
in its widget).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from textual.app import App
from textual.binding import Binding

from sortedchat import SortedChatError
from sortedchat.paths import exports_dir
from sortedchat.tui.dialogue import Dialogue
from sortedchat.tui.screens.chat import ChatScreen
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.screens.help import HelpScreen
from sortedchat.tui.screens.loading import LoadingScreen
from sortedchat.tui.settings import ACTIONS, Settings, save_changes
from sortedchat.tui.storage import ChatStore
from sortedchat.tui.warmup import warm_up

if TYPE_CHECKING:  # the engine imports torch: the app imports it only once the loading screen shows
    from sortedchat.engine import Mode
    from sortedchat.sorted_model import SortedModel

Loader = Callable[[Callable[[str, float | None], None]], "SortedModel"]


def model_label(sm: SortedModel) -> str:
    """A short name for the status line: a local directory by its name, anything else as given."""
    source = sm.source or "model"
    path = Path(source)
    return path.name if path.exists() else source


class SortedChatApp(App):
    """Give it a loaded `model`, or a `loader(progress)` that loads one while a loading screen shows.

    `mode` is the starting mode (the session checks its depths against the model once it is known);
    `show_speed=False` leaves tokens/s out of the status line (for repeatable screenshots).
    After `run()`, `error` holds the error the app could not start for, if any (its cause kept for `--debug`).
    """

    CSS_PATH = "app.tcss"
    TITLE = "sortedchat"
    INHERIT_BINDINGS = False
    BINDINGS = [
        Binding(ACTIONS["help"].keys, "help", ACTIONS["help"].label, id="help"),
        Binding(ACTIONS["quit"].keys, "quit", ACTIONS["quit"].label, id="quit", priority=True),
        Binding("ctrl+c", "help_quit", show=False, system=True),
    ]

    def __init__(
        self,
        model: SortedModel | None = None,
        loader: Loader | None = None,
        mode: Mode | None = None,
        settings: Settings | None = None,
        store: ChatStore | None = None,
        show_speed: bool = True,
        export_dir: Path | None = None,
        loading_label: str = "the model",
    ):
        super().__init__()
        if model is None and loader is None:
            raise ValueError("SortedChatApp needs a model or a loader")
        self.sm, self.loader, self.start_mode = model, loader, mode
        self.settings = settings or Settings()
        self.store = store
        self.show_speed = show_speed
        self.export_dir = export_dir or exports_dir()  # chats exported and screenshots, as the notices say
        self.loading_label = loading_label
        self.error: SortedChatError | None = None
        self._stop_loading = threading.Event()

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
            report(self._fail, exc)
            return
        report(screen.set_progress, "warming up", None)
        try:
            mode = self.start_mode.validate(sm.num_layers) if self.start_mode else None
        except SortedChatError:
            mode = None  # `_model_ready` reports it
        warm_up(sm, mode, should_stop=self._stop_loading.is_set)
        report(self._model_ready, sm)
        from sortedchat.engine.compiled import compile_problem

        if problem := compile_problem(sm):  # `--compile` was asked and decoding stays eager
            report(lambda: self.notify(problem, severity="warning", timeout=15))

    def _fail(self, error: SortedChatError) -> None:
        self.error = error
        self.exit(return_code=1)

    def _model_ready(self, sm: SortedModel) -> None:
        from sortedchat.engine import ChatSession

        try:
            session = ChatSession(sm, self.start_mode)
            self.store = self.store or ChatStore()
        except SortedChatError as exc:
            self._fail(exc)
            return
        self.sm = sm
        self.install_screen(ChatScreen(Dialogue(session, self.store, model_label(sm)), self.show_speed,
                                       self.export_dir), "chat")
        if isinstance(self.screen, LoadingScreen):
            self.switch_screen("chat")
        else:
            self.push_screen("chat")
        if self.store.notice:
            self.notify(self.store.notice, severity="warning", timeout=15)

    def on_unmount(self) -> None:
        self._stop_loading.set()

    async def on_chat_list_screen_deleted(self, message: ChatListScreen.Deleted) -> None:
        """The saved-chats dialog (a screen of its own) deleted a chat: the chat screen may have it open."""
        await self.get_screen("chat").forget(message.chat_id)

    # -- what every screen shares -------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.settings.keymap()))

    def apply_settings(self, settings: Settings | None) -> None:
        """Use the settings the settings screen dismissed with (None: cancelled), and save what changed."""
        if settings is None:
            return
        changed = {f: getattr(settings, f) for f in vars(settings) if getattr(settings, f) != getattr(self.settings, f)}
        self.settings = settings
        path = self._save(changed)
        if path is not None:
            self.notify(f"settings saved to {path}")

    def _theme_changed(self, theme) -> None:
        """The theme the user picks is kept for the next run."""
        if theme.name != self.settings.theme:
            self.settings.theme = theme.name
            self._save({"theme": theme.name})

    def _save(self, changed: dict) -> Path | None:
        """Write the changed settings over the file (values from the command line stay out of it); the file's
        path, or None when nothing was written."""
        try:
            return save_changes(changed)
        except (SortedChatError, OSError) as exc:
            self.notify(f"settings not saved: {exc}", severity="error")
            return None

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> None:
        """Save the screen as SVG here and now, where exports go (`paths.exports_dir`), and say where.

        Textual's own delivery writes the file on a non-daemon thread that then waits, with no timeout, for
        the app's event loop to take its "saved" message. Quit right after a screenshot and that loop has
        stopped: the thread waits forever and Python never exits (a test run hung this way after its last
        test). The SVG is small, so it is written synchronously. The action key and the command palette's
        "Screenshot" both come here."""
        try:
            if path is None:
                self.export_dir.mkdir(parents=True, exist_ok=True)
                path = str(self.export_dir)
            saved = self.save_screenshot(filename, path, time_format)
        except OSError as exc:
            self.notify(f"screenshot not saved: {exc}", title="Screenshot", severity="error")
            return
        self.notify(f"Saved screenshot to {saved}", title="Screenshot")

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        if isinstance(screen, ChatScreen):
            yield from screen.system_commands()
