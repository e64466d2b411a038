"""What the commands share: the sandbox's ports and the one way a command reads its settings."""

from __future__ import annotations

import sys

from service.settings import Settings, SettingsError, environment

DEV_PORTS = {"service": 8000, "supermemory": 8101, "github": 8102, "receiver": 8103, "smtp": 8104}


def settings_or_exit() -> Settings:
    """The settings, or exit 2 with the one line that names the bad one."""
    env = environment()
    try:
        settings = Settings.load(env, env_file=None)
    except SettingsError as exc:
        print(f"leak-responder: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for notice in settings.notices(env):
        print(f"leak-responder: warning: {notice}", file=sys.stderr)
    return settings
