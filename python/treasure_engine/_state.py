"""The one state-directory policy: where dead letters, the spill, the WAL and input offsets live."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def _data_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) if xdg else Path.home() / ".local" / "share"


def default_app_name() -> str:
    """The running program's name (`sys.argv[0]`'s stem, made safe for a path), else "python"."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "python"


def default_state_dir(app_name: str | None = None) -> Path:
    """`$XDG_DATA_HOME/treasure-engine/<app>` (`~/.local/share/...` without it): where dead letters, spill and
    the WAL live when no `state_dir` is configured, so that no configuration loses them."""
    return _data_home() / "treasure-engine" / (app_name or default_app_name())


def state_dir_of(state_dir: str | None, app_name: str | None) -> Path:
    """The configured `state_dir`, else the default one for `app_name` (a config's two fields)."""
    return Path(state_dir) if state_dir else default_state_dir(app_name)
