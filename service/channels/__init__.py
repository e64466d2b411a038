"""Telling the org's own systems: signed CloudEvents to its webhooks and messages to its Slack.

Each of an incident's channels gets one event per state it reaches (matched, revoked, confirmed,
unconfirmed). The store writes those events into an outbox in the same transaction as the
transition, and `ChannelDispatcher`, a loop of its own beside the pipeline's worker, sends them: an
endpoint that is slow, failing, redirecting, refused or gone costs the pipeline nothing, and other
channels nothing. This package never imports the pipeline, so the dependency runs one way.
"""

from service.channels.network import AddressPolicy
from service.channels.outbox import ChannelDispatcher
from service.channels.sender import ChannelSender

__all__ = ["AddressPolicy", "ChannelDispatcher", "ChannelSender"]
