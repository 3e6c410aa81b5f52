"""`fedmoe-supernode` shortens Flower's idle poll by replacing the `time` its pull loop sleeps with:
that is only safe while the module uses `time` for nothing but sleep (flwr is pinned to 1.42.x)."""

from __future__ import annotations

import ast
import inspect
import time

import httpx
import pytest
from flwr.supernode import start_client_internal

from fedmoe.fl_client import supernode
from fedmoe.fl_server.deploy import FLOWER_ENV, loopback_topology, service_commands


def test_flowers_supernode_loop_uses_time_only_to_sleep():
    tree = ast.parse(inspect.getsource(start_client_internal))
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "time"
    }
    assert used == {"sleep"}, (
        f"flwr's supernode loop now uses time.{sorted(used - {'sleep'})}: revisit fedmoe-supernode"
    )


def test_sleeps_are_capped_at_the_poll_interval():
    started = time.perf_counter()
    supernode._short_sleep(3.0)  # Flower's idle wait between pulls
    assert time.perf_counter() - started < supernode.POLL_SECONDS + 0.15
    started = time.perf_counter()
    supernode._short_sleep(0.5)  # Flower's local wait for its executor's reply
    assert time.perf_counter() - started < supernode.LOCAL_WAIT_SECONDS + 0.1


def test_every_bank_runs_the_short_poll_supernode_and_fast_executors():
    commands = service_commands(loopback_topology(3, root="/tmp/unused", key_path="/tmp/unused/keys"))
    assert all(commands[f"bank-{i}"][0] == "fedmoe-supernode" for i in range(3))
    assert float(FLOWER_ENV["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) <= 0.1


def test_a_reply_the_superlink_failed_to_store_is_pushed_again(monkeypatch):
    """15 banks on one SuperLink: "500 database is locked" on push-messages, and Flower's SuperNode
    dropped the reply; the server then waited its whole round timeout for that bank."""
    from types import SimpleNamespace

    import pytest

    monkeypatch.setattr(supernode, "time", SimpleNamespace(sleep=lambda seconds: None))
    calls = []

    def flaky_send(message):
        calls.append(message)
        if len(calls) < 3:
            raise RuntimeError("Server error '500 Internal Server Error' (database is locked)")
        return "sent"

    assert supernode.retrying(flaky_send)("reply") == "sent" and calls == ["reply"] * 3

    class NotRunning(Exception):
        pass

    def finished_run(message):
        calls.append(message)
        raise NotRunning

    calls.clear()
    with pytest.raises(NotRunning):
        supernode.retrying(finished_run, (NotRunning,))("reply")
    assert calls == ["reply"]  # a finished run is not retried
    params = list(inspect.signature(start_client_internal._push_messages).parameters)
    assert params == ["state", "object_store", "send", "push_object"], "flwr's push loop changed: revisit"


def _failing_receive():
    request = httpx.Request("POST", "http://127.0.0.1/v1/fleet/pull-messages")
    response = httpx.Response(500, request=request, text="database is locked")
    raise httpx.HTTPStatusError("500 Internal Server Error", request=request, response=response)


def _pull(pull, receive):
    return pull(
        state=None, object_store=None, node_config={}, receive=receive, get_run=None, get_fab=None,
        pull_object=None, confirm_message_received=None, trusted_entities=None,
    )  # fmt: skip


def test_one_failed_pull_does_not_end_the_supernode_but_a_lasting_failure_does():
    """Flower's own pull lets an HTTP 500 escape, which ends the SuperNode's loop (the bank is gone for
    good); fedmoe-supernode's counts it as "no message" and gives up only after `patience` seconds."""
    flowers = start_client_internal._pull_and_store_message
    with pytest.raises(httpx.HTTPStatusError):
        _pull(flowers, _failing_receive)
    pull = supernode.reporting_pulls(flowers, patience=0.3)
    assert _pull(pull, _failing_receive) is None  # logged, then the loop sleeps and pulls again
    assert _pull(pull, lambda: None) is None  # the SuperLink answers again: the failure clock resets
    assert _pull(pull, _failing_receive) is None
    time.sleep(0.4)
    with pytest.raises(httpx.HTTPStatusError):  # failing for longer than patience: the process exits
        _pull(pull, _failing_receive)


def _message_of_a_run_that_ends(state):
    """A message of run 7 whose objects cannot be pulled: its run ended meanwhile (a restarted server)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.run import Run, RunNotRunningException, RunStatus
    from flwr.supercore.task_identity import TaskIdentity

    run = Run(
        run_id=7, fab_id="fedmoe/fedmoe", fab_version="0.1.0", fab_hash="h", override_config={}, pending_at="",
        starting_at="", running_at="", finished_at="", status=RunStatus("running", "", ""), flwr_aid="",
        federation_id="", primary_task_id=None, bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0,
    )  # fmt: skip
    state.store_run(run)
    state.set_node_id(5)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 3
    message = Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=5, message_type="train")

    def pull_object(run_id, object_id):
        raise RunNotRunningException

    return (lambda: (message, get_object_tree(message))), pull_object


@pytest.fixture
def task_identity():
    """This process plays a task for the message it builds; the identity is unset again afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    yield
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None


@pytest.mark.parametrize("wrapped", [False, True], ids=["flower", "fedmoe-supernode"])
def test_a_message_whose_run_ends_mid_pull_leaves_no_pending_task(wrapped, task_identity):
    """Flower's own pull leaves the task of such a message pending (the executor would claim it and
    wait for its objects for 2 h: the wedge); fedmoe-supernode's fails the task, so the bank's
    executor is free for the next run's messages."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    factory = NodeStateFactory(ObjectStoreFactory())
    state, store = factory.state(), factory.objectstore_factory.store()
    receive, pull_object = _message_of_a_run_that_ends(state)
    flowers = start_client_internal._pull_and_store_message
    pull = supernode.reporting_pulls(flowers) if wrapped else flowers
    assert pull(
        state=state, object_store=store, node_config={}, receive=receive, get_run=None, get_fab=None,
        pull_object=pull_object, confirm_message_received=lambda *a: None, trusted_entities=None,
    ) is None  # fmt: skip
    [task] = state.get_tasks()
    assert (task.status.status == "pending") is not wrapped, task
