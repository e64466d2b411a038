"""Local stand-ins for Supermemory and GitHub, served as real HTTP servers on loopback.

They back `make run` and the demos, our integration tests and benchmarks, and users' own integration
tests: the service talks to them exactly as it talks to the real providers (same routes, same bodies,
same signatures), while knobs provoke the failures the real ones cannot be made to show on demand
(latency, error storms, 429 with Retry-After, auth-cache propagation delay, broken key endpoints,
rotated keys) and counters show what the service actually did. A third stand-in, the receiver, plays
the orgs' own webhook and Slack endpoints and shows what they are sent.

Both sandboxes are for loopback only: their `/_sandbox/` control endpoints are unauthenticated, and the
Supermemory one lists its live tokens so that a demo can print a ready-to-paste command.
"""

from service.sandbox.github import KEYS_FAILURES, KEYS_PATH, GitHubSandbox, build_alert
from service.sandbox.receiver import Behaviour, ChannelReceiver, Received
from service.sandbox.server import ServerThread, dev_stand_ins, serve_sandbox
from service.sandbox.supermemory import (
    DEFAULT_ADMIN_TOKEN,
    Knobs,
    SandboxKey,
    SupermemorySandbox,
    channel_secret,
    org_channels,
    seeded_keys,
)

__all__ = [
    "DEFAULT_ADMIN_TOKEN",
    "KEYS_FAILURES",
    "KEYS_PATH",
    "Behaviour",
    "ChannelReceiver",
    "GitHubSandbox",
    "Knobs",
    "Received",
    "SandboxKey",
    "ServerThread",
    "SupermemorySandbox",
    "build_alert",
    "channel_secret",
    "dev_stand_ins",
    "org_channels",
    "seeded_keys",
    "serve_sandbox",
]
