"""Where sortedchat keeps converted models, chats and settings (platformdirs, overridable for tests)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "sortedchat"


def cache_dir() -> Path:
    return Path(os.environ.get("SORTEDCHAT_CACHE_DIR") or platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    return Path(os.environ.get("SORTEDCHAT_DATA_DIR") or platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    return Path(os.environ.get("SORTEDCHAT_CONFIG_DIR") or platformdirs.user_config_dir(APP))
