"""One torchrun attempt's keys in the job's store.

A job that torchrun's elastic agent restarts (``--max-restarts``) can meet the keys of the attempt
before it in the agent's store: gloo then reads a dead peer's address (measured: the restarted
ranks tried ``127.0.0.1:PORT`` of the killed rank and failed to connect), and a failure published
for step N would end the new attempt at step N. Every store the ranks use is scoped to the attempt
(``TORCHELASTIC_RESTART_COUNT``); outside torchrun nothing changes (the launcher's store is new
for each run, and it reads what ranks publish without a prefix).
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist


def attempt_prefix() -> str:
    """``mimo_builder/attempt_N/`` under torchrun's elastic agent, else ``""``."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return "" if count is None else f"mimo_builder/attempt_{count}/"


def scoped(store: dist.Store) -> dist.Store:
    """``store`` seen through this attempt's prefix (itself outside torchrun)."""
    prefix = attempt_prefix()
    return dist.PrefixStore(prefix, store) if prefix else store


def rendezvous_store(timeout: datetime.timedelta) -> dist.Store:
    """A client of the job's store at MASTER_ADDR:MASTER_PORT, scoped to this attempt."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return scoped(store)
