"""Telling key owners (contract.md §5 step 6): an outbox in the store, SMTP delivery, and the emails.

The pipeline hands confirmed and unconfirmed incidents to `EmailNotifier.notify` and records what
it answers; this package never imports the pipeline, so the dependency runs one way.
"""

from service.notify.compose import Letter
from service.notify.outbox import EmailNotifier
from service.notify.result import NotifyResult
from service.notify.smtp import SmtpSender

__all__ = ["EmailNotifier", "Letter", "NotifyResult", "SmtpSender"]
