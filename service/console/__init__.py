"""The operator console: server-rendered pages under /console/ (see docs/console.md)."""

from service.console.views import mount

__all__ = ["mount"]
