"""`fedmoe-supernode`: Flower's `flower-supernode`, polling the SuperLink every 0.5 s instead of 3 s.

An idle SuperNode (flwr 1.42, `start_client_internal`) sleeps a fixed 3 s between pulls and 0.5 s
while it waits for its ClientApp's reply. A secure-aggregation round is five exchanges, so those
sleeps were most of a round's framework overhead (docs/architecture.md). Same arguments, same
behaviour otherwise; flwr is pinned to 1.42.x in pyproject.toml because this reaches into its module.
The poll costs the SuperLink one cheap pull per bank per POLL_SECONDS.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

# Every idle SuperNode pulls once per POLL_SECONDS, and each pull is a write to the SuperLink's
# SQLite database: 15 banks at 0.2 s made it answer "database is locked". FEDMOE_SUPERNODE_POLL overrides.
POLL_SECONDS = float(os.environ.get("FEDMOE_SUPERNODE_POLL", "0.5"))


def _short_sleep(seconds: float) -> None:
    time.sleep(min(seconds, POLL_SECONDS))


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    # The module's only use of `time` is sleep (checked by tests/deploy/test_supernode_poll.py).
    start_client_internal.time = SimpleNamespace(sleep=_short_sleep)
    flower_supernode()


if __name__ == "__main__":
    main()
