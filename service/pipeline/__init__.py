"""The incident pipeline (contract.md §5): match, revoke, confirm, notify, close, under leases."""

from service.backoff import backoff
from service.pipeline.steps import Notifier, Policy, Steps
from service.pipeline.sweeper import Sweeper
from service.pipeline.worker import Worker

__all__ = ["Notifier", "Policy", "Steps", "Sweeper", "Worker", "backoff"]
