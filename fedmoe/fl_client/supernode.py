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
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
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


# Health that tells the truth: the SuperNode touches ALIVE_FILE after every pull that reached the
# SuperLink, and `fedmoe-supernode --alive-within SECONDS` (the container's healthcheck) fails when the
# last one is older. A SuperNode that never connected, lost its SuperLink or gave up is not healthy.
ALIVE_FILE = os.environ.get("FEDMOE_SUPERNODE_ALIVE", "")
EXIT_REFUSED = 3  # the SuperLink refused this SuperNode (401): the process exits with this, never 0
UNAUTHORIZED_HELP = (
    "the SuperLink answered 401 Unauthorized: it refused this SuperNode's signed requests. Either this "
    "host's clock differs from the SuperLink's (compare `date -u` on both; Flower accepts only a small "
    "window) or this SuperNode's public key (secrets/node.pub) is not registered with the SuperLink "
    "(the operator registers it: `docker-compose run --rm register` in the server kit, or "
    "`fedmoe provision register`)."
)


def touch_alive(path: str = "") -> None:
    path = path or ALIVE_FILE
    if path:
        Path(path).touch()


def alive_within(seconds: float, path: str = "") -> bool:
    """Whether the SuperNode reached its SuperLink in the last `seconds` (the healthcheck)."""
    path = path or ALIVE_FILE
    try:
        return time.time() - Path(path).stat().st_mtime <= seconds
    except (OSError, ValueError):
        return False


class RunEnded(RuntimeError):
    """The run of a message ended while its objects were being pulled (an ordinary Exception)."""


def ending_runs_fail_the_task(pull_object: Callable) -> Callable:
    """Flower's object pull, with the end of the message's run raised as an ordinary exception.

    flwr 1.42 raises RunNotRunningException, a BaseException, when a message's run ends while the
    SuperNode pulls its objects (a restarted server's old run). Its handler then skips the cleanup
    that every other failure gets: the message's task stays pending with objects that never arrive,
    the bank's executor claims it and waits for them (up to 2 h), and the bank runs nothing else: the
    "restart that wedges" of issue 27, seen in CI. As an Exception, Flower deletes the message and
    finishes its task as failed."""
    from flwr.supercore.run import RunNotRunningException

    def pull(*args, **kwargs):
        try:
            return pull_object(*args, **kwargs)
        except RunNotRunningException:
            raise RunEnded("the message's run is no longer running") from None

    return pull


# Flower's pull retries connection errors forever, but any other failure of one pull (an HTTP 500
# "database is locked", a SuperLink restarting on its database) ends the SuperNode's loop: the bank
# would be gone for good after one bad answer. A failing pull counts as "no message" for up to
# PULL_PATIENCE seconds of consecutive failures; after that the process exits (restart policy).
PULL_PATIENCE = float(os.environ.get("FEDMOE_SUPERNODE_PULL_PATIENCE", "120"))


def reporting_pulls(pull: Callable, *, patience: float = PULL_PATIENCE) -> Callable:
    """Flower's pull, marking the SuperNode alive whenever a pull returned (the SuperLink answered),
    and riding out failed pulls for `patience` seconds (each is logged)."""
    failing_since: float | None = None

    def pull_and_mark(*args, **kwargs):
        nonlocal failing_since
        if "pull_object" in kwargs:
            kwargs["pull_object"] = ending_runs_fail_the_task(kwargs["pull_object"])
        try:
            result = pull(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a stop signal is not an Exception and still ends it
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > patience:
                logger.error("pulling from the SuperLink failed for %.0f s; giving up: %r", now - failing_since, err)
                raise
            logger.warning("pulling from the SuperLink failed (%r); retrying for up to %.0f s", err, patience)
            return None
        failing_since = None
        touch_alive()
        return result

    return pull_and_mark


# A SuperNode killed without deactivating (SIGKILL, a host crash) stays "online" at the SuperLink until
# HEARTBEAT_PATIENCE (2) heartbeat intervals pass, and until then its key cannot be activated again
# (flwr 1.42 answers code 2004 and the SuperNode exits). A restarted bank therefore uses Flower's
# shortest heartbeat interval (so its old session expires within 20 s) and retries activation for
# REJOIN_SECONDS instead of exiting, so it is back in the next round.
HEARTBEAT_SECONDS = 10.0  # flwr's HEARTBEAT_MIN_INTERVAL; its default is 30
REJOIN_SECONDS = float(os.environ.get("FEDMOE_SUPERNODE_REJOIN", "45"))
ACTIVATION_FAILED = 2004  # flwr.supercore.error.ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED


def rejoining(activate: Callable, *, patience: float = REJOIN_SECONDS, pause: float = 2.0) -> Callable:
    """`ActivateNode`, retried while the SuperLink still holds this key's previous session online."""
    import httpx
    from flwr.supercore.error import FlowerError

    def activate_node(client, request):
        deadline = time.monotonic() + patience
        while True:
            try:
                return activate(client, request)
            except httpx.HTTPStatusError as err:
                error = FlowerError.from_json(err.response.text)
                if error is None or error.code != ACTIVATION_FAILED or time.monotonic() + pause > deadline:
                    raise
                logger.warning(
                    "the SuperLink refused to activate this SuperNode (code %d): its previous session is still "
                    "marked online (it stopped without signing off) or its key is not registered; retrying "
                    "for up to %.0f s",
                    ACTIVATION_FAILED,
                    deadline - time.monotonic(),
                )
                time.sleep(pause)

    return activate_node


class _RefusalWatch:
    """Flower answers a 401 by sending itself SIGINT (`http_retry`): exit 0, "terminated gracefully".
    This records that it happened so the process says why and exits EXIT_REFUSED instead."""

    def __init__(self) -> None:
        self.refused = False

    def kill(self, pid: int, sig: int) -> None:
        if pid == os.getpid() and sig == signal.SIGINT:
            self.refused = True
            logger.error("SuperNode refused: %s", UNAUTHORIZED_HELP)
        os.kill(pid, sig)


def main() -> None:
    if sys.argv[1:2] == ["--alive-within"]:  # the healthcheck: `fedmoe-supernode --alive-within 30`
        sys.exit(0 if alive_within(float(sys.argv[2])) else 1)
    from flwr.supercore import heartbeat
    from flwr.supercore.logger import update_console_handler
    from flwr.supercore.retry import http_retry
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.fleet_http_client import FleetHttpClient

    # The module's only use of `time` is sleep (checked by tests/deploy/test_supernode_poll.py).
    start_client_internal.time = SimpleNamespace(sleep=_short_sleep)
    push_messages = start_client_internal._push_messages
    not_running = start_client_internal.RunNotRunningException

    def push_with_retries(state, object_store, send, push_object) -> None:
        push_messages(state, object_store, retrying(send, (not_running,)), retrying(push_object, (not_running,)))

    start_client_internal._push_messages = push_with_retries
    quick_object_pulls()  # a message's objects: retried after 0.02 s, not 1 s (fedmoe/protocol/flower.py)
    update_console_handler(timestamps=True)  # a bank's operator reads when each message came and went
    start_client_internal._pull_and_store_message = reporting_pulls(start_client_internal._pull_and_store_message)
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # what the SuperLink is told
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # how often the sender beats: the same interval
    FleetHttpClient.ActivateNode = rejoining(FleetHttpClient.ActivateNode)
    watch = _RefusalWatch()
    http_retry.os = SimpleNamespace(kill=watch.kill, getpid=os.getpid)
    try:
        flower_supernode()
    except SystemExit:  # Flower's own exit: a stop signal (0) or an error code
        if watch.refused:
            _exit_now(EXIT_REFUSED, UNAUTHORIZED_HELP)
        raise
    # Flower returned: it lost the SuperLink and gave up reconnecting, yet its health server would keep
    # the process up (and "healthy") forever. Exit non-zero so the bank's restart policy takes over.
    _exit_now(1, "the SuperNode lost its SuperLink and gave up reconnecting")


def _exit_now(code: int, why: str) -> None:
    logger.error("fedmoe-supernode exits %d: %s", code, why)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(code)  # Flower's health server threads would otherwise keep the interpreter alive


if __name__ == "__main__":
    main()
