"""Where sortedchat keeps converted models, chats, settings and exports (platformdirs, overridable for tests).

A folder that is a file (`SORTEDCHAT_CACHE_DIR=~/notes.txt`) is refused with the variable and the path named:
left alone, the cache would fail with a traceback deep in a conversion, and the settings would be silently
ignored (a missing `config.toml` means "defaults").
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from sortedchat import SortedChatError

APP = "sortedchat"


def _folder(variable: str, default: str) -> Path:
    """The folder `variable` names (else `default`), checked not to be a file."""
    given = os.environ.get(variable)
    path = Path(given or default).expanduser()
    if path.exists() and not path.is_dir():
        where = f"{variable}={given}" if given else f"{path} (the default for {variable})"
        raise SortedChatError(f"{where}: is a file, not a folder")
    return path


def cache_dir() -> Path:
    return _folder("SORTEDCHAT_CACHE_DIR", platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    return _folder("SORTEDCHAT_DATA_DIR", platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    return _folder("SORTEDCHAT_CONFIG_DIR", platformdirs.user_config_dir(APP))


def exports_dir() -> Path:
    """Where the app's exports (Ctrl+S) and screenshots go: `SORTEDCHAT_EXPORT_DIR`, else a `sortedchat` folder in
    the user's Documents, else (no Documents folder) `exports` in the data folder. Never the current directory,
    which may be a git checkout."""
    documents = platformdirs.user_documents_path()
    default = documents / APP if documents.is_dir() else data_dir() / "exports"
    return _folder("SORTEDCHAT_EXPORT_DIR", str(default))
