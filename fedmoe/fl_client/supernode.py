"""`fedmoe-supernode`: Flower's `flower-supernode`, polling the SuperLink every 0.5 s instead of 3 s
and pushing a reply again when the SuperLink fails to store it.

An idle SuperNode (flwr 1.42, `start_client_internal`) sleeps a fixed 3 s between pulls and 0.5 s
while it waits for its ClientApp's reply. A secure-aggregation round is several exchanges, so those
sleeps were most of a round's framework overhead (docs/architecture.md). Same arguments, same
behaviour otherwise; flwr is pinned to 1.42.x in pyproject.toml because this reaches into its module.
The poll costs the SuperLink one cheap pull per bank per POLL_SECONDS.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from types import SimpleNamespace

from fedmoe.protocol.flower import quick_object_pulls

logger = logging.getLogger(__name__)

# Every idle SuperNode pulls once per POLL_SECONDS, and each pull is a write to the SuperLink's
# SQLite database: 15 banks at 0.2 s made it answer "database is locked". FEDMOE_SUPERNODE_POLL overrides.
POLL_SECONDS = float(os.environ.get("FEDMOE_SUPERNODE_POLL", "0.5"))


PUSH_ATTEMPTS = 5  # a reply the SuperLink could not store ("database is locked") is sent again


# Flower's waits below a second are local: for its executor's reply or the reply's objects in the
# SuperNode's own store (0.5 s each in flwr 1.42). They cost the SuperLink nothing, so they are short.
LOCAL_WAIT_SECONDS = 0.05


def _short_sleep(seconds: float) -> None:
    """Flower's 3 s idle wait between pulls -> POLL_SECONDS; its local 0.5 s waits -> LOCAL_WAIT_SECONDS."""
    time.sleep(min(seconds, POLL_SECONDS if seconds >= 1 else LOCAL_WAIT_SECONDS))


def retrying(call: Callable, give_up: tuple[type[BaseException], ...] = ()) -> Callable:
    """`call`, tried PUSH_ATTEMPTS times with a growing pause: Flower's SuperNode logs a failed push
    of a reply and drops it, and the server then waits the whole round timeout for that bank."""

    def attempt(*args, **kwargs):
        for k in range(1, PUSH_ATTEMPTS + 1):
            try:
                return call(*args, **kwargs)
            except give_up:
                raise
            except Exception as err:  # noqa: BLE001 - transient SuperLink errors (HTTP 500, unavailable)
                if k == PUSH_ATTEMPTS:
                    raise
                logger.warning("pushing a reply failed (%s); attempt %d of %d in %d s", err, k + 1, PUSH_ATTEMPTS, k)
                time.sleep(k)

    return attempt


def main() -> None:
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    # The module's only use of `time` is sleep (checked by tests/deploy/test_supernode_poll.py).
    start_client_internal.time = SimpleNamespace(sleep=_short_sleep)
    push_messages = start_client_internal._push_messages
    not_running = start_client_internal.RunNotRunningException

    def push_with_retries(state, object_store, send, push_object) -> None:
        push_messages(state, object_store, retrying(send, (not_running,)), retrying(push_object, (not_running,)))

    start_client_internal._push_messages = push_with_retries
    quick_object_pulls()  # a message's objects: retried after 0.02 s, not 1 s (fedmoe/protocol/flower.py)
    update_console_handler(timestamps=True)  # a bank's operator reads when each message came and went
    flower_supernode()


if __name__ == "__main__":
    main()
