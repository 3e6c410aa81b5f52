"""`fedmoe-superexec`: a bank's ClientApp tasks run in one warm process (fedmoe/fl_client/executor.py), and
message objects are pulled again after 0.02 s instead of 1 s (fedmoe/protocol/flower.py). Both reach into
flwr 1.42 (pinned in pyproject.toml); these tests fail if the pieces they use move."""

from __future__ import annotations

import hashlib
import inspect
import sys
from types import SimpleNamespace

from fedmoe.fl_client import executor
from fedmoe.fl_client.executor import WarmClientApps, forget_app_modules, warm_executor_class
from fedmoe.fl_server.deploy import loopback_topology, service_commands
from fedmoe.protocol import flower
from tests.deploy.test_auth_and_gate import build_fab, evil_app  # noqa: F401 - fixture


def test_every_bank_executor_is_the_warm_one():
    commands = service_commands(loopback_topology(3, root="/tmp/unused", key_path="/tmp/unused/keys"))
    assert [commands[f"bank-{i}-apps"][0] for i in range(3)] == ["fedmoe-superexec"] * 3
    assert commands["serverapp"][0] == "flower-superexec"  # the server's executor stays Flower's own


def test_flower_pieces_the_executor_runs_a_task_with():
    from flwr.supercore.superexec import run_superexec
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supernode.runtime import run_clientapp

    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == [
        "client", "context", "sub_status", "details",
    ]  # fmt: skip
    assert "get_executor(" in inspect.getsource(run_superexec.run_superexec)  # looked up at call time
    warm = warm_executor_class(None)
    assert issubclass(warm, SubprocessExecutor)  # other task types: Flower's own subprocess launch


def test_object_pulls_retry_quickly_everywhere():
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    flower.quick_object_pulls()
    # One function object behind every caller: the SuperNode, the ServerApp's grid, the executor.
    assert start_client_internal.pull_objects is http_grid.pull_objects is inflatable_utils.pull_objects
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__
        assert defaults["initial_backoff"] == flower.FIRST_RETRY_SECONDS
        assert defaults["backoff_cap"] == flower.LONGEST_RETRY_SECONDS
        # Flower's total limit still ends a hopeless pull, before the count of tries does
        assert defaults["max_time"] / flower.LONGEST_RETRY_SECONDS < defaults["max_tries_per_object"]
    assert "initial_backoff=initial_backoff" in inspect.getsource(inflatable_utils.pull_and_inflate_object_from_tree)


def test_a_banks_executor_gives_up_on_a_tasks_objects_after_ten_minutes_not_two_hours():
    """The wedge of issue 27: a task whose message objects never come (its run ended while the
    SuperNode pulled them) held the bank's executor for Flower's 2 h; the executor waits 600 s."""
    from flwr.supercore.inflatable import inflatable_utils

    pulls = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in pulls]
    try:
        assert all(f.__kwdefaults__["max_time"] >= 3600 for f in pulls)  # Flower's own limit
        flower.quick_object_pulls(max_seconds=executor.TASK_INPUT_WAIT_SECONDS)
        assert all(f.__kwdefaults__["max_time"] == 600 for f in pulls)
        assert "quick_object_pulls(max_seconds=TASK_INPUT_WAIT_SECONDS)" in inspect.getsource(executor.main)
    finally:
        for function, defaults in zip(pulls, saved, strict=True):
            function.__kwdefaults__.update(defaults)


def test_the_bundles_code_runs_not_an_older_copy(tmp_path, evil_app, monkeypatch):  # noqa: F811
    """The executor's own package was imported from the venv; the bundle's copy must be what runs."""
    from flwr.supercore.fab import Fab

    stale = tmp_path / "stale"
    (stale / "evil").mkdir(parents=True)
    (stale / "evil" / "__init__.py").write_text("")
    (stale / "evil" / "client.py").write_text("raise RuntimeError('the stale copy ran')\n")
    monkeypatch.syspath_prepend(str(stale))
    import evil  # noqa: F401 - the stale package, as the venv's fl_client is in the executor

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    content = build_fab(evil_app)
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    apps = WarmClientApps(None)  # no approved-apps file set: no gate (the loopback deployment)
    try:
        apps.load(SimpleNamespace(fab_id="mallory/evil", fab_version="1.0.0"), fab)
        assert (tmp_path / "code-ran").read_text() == "ran"
        assert str(tmp_path / "flwr-home") in sys.modules["evil.client"].__file__
        forget_app_modules(apps.app_dir, apps.app_dir)
        assert "evil" not in sys.modules and str(apps.app_dir) not in sys.path
    finally:
        for name in [m for m in sys.modules if m.partition(".")[0] == "evil"]:
            del sys.modules[name]


def test_the_gate_is_on_unless_switched_off(monkeypatch):
    from fedmoe.fl_client import executor

    monkeypatch.delenv(executor.APPROVED_APPS_ENV, raising=False)
    assert executor.approved_apps_file() == executor.DEFAULT_APPROVED_APPS  # fail closed: nothing approved
    monkeypatch.setenv(executor.APPROVED_APPS_ENV, "")
    assert executor.approved_apps_file() == executor.DEFAULT_APPROVED_APPS
    monkeypatch.setenv(executor.APPROVED_APPS_ENV, "off")
    assert executor.approved_apps_file() is None


def test_only_client_app_tasks_are_claimed_or_run():
    """An AgentApp task would run the server's bundle outside the gate."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

    executor = warm_executor_class(None)()
    executor.apps.busy.wait(0)  # (warm-up may still run: busy, nothing is claimed)
    all_types = set(TaskType)
    offered, _ = executor.get_eligible_capacity(all_types)
    assert offered <= {TaskType.CLIENT_APP}
    executor.apps.busy.clear()
    assert executor.get_eligible_capacity(all_types)[0] == {TaskType.CLIENT_APP}
    spec = ExecutionSpec(TaskType.AGENT_APP, "127.0.0.1:1", "token", True, None, False, None, True, 7)
    assert executor.launch(spec).status is LaunchResultStatus.FAILED
    executor.apps.busy.set()  # a task running: the next one waits at the SuperNode, not in a queue here
    assert executor.get_eligible_capacity(all_types)[0] == set()


def test_a_bundle_must_be_the_one_its_hash_names(tmp_path, evil_app, monkeypatch):  # noqa: F811
    """A server could label an approved bundle with another one's hash: refused before install."""
    import pytest
    from flwr.supercore.fab import Fab

    from fedmoe.fl_client.executor import AppRefused

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    content = build_fab(evil_app)
    apps = WarmClientApps(None)
    with pytest.raises(AppRefused, match="sha256"):
        apps.load(SimpleNamespace(fab_id="mallory/evil", fab_version="1.0.0"), Fab("0" * 64, content, {}))
    assert not (tmp_path / "flwr-home").exists() and not (tmp_path / "code-ran").exists()


def test_a_revoked_task_token_fails_that_task_and_never_ends_the_executor():
    """chaos13: the SuperNode revoked the token of a task whose run had ended; Flower's retry rule
    answered the 401 with SIGINT to its own process and the bank's executor was gone. The task's
    client gives up on that call instead (the task fails); other errors keep Flower's rule."""
    import httpx

    spec = SimpleNamespace(runtime_api_address="127.0.0.1:9", insecure=True, root_certificates_path=None, token="t")
    client = executor._runtime_client(spec)
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/runtime/pull-object")

    def error(status: int) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError(str(status), request=request, response=httpx.Response(status, request=request))

    giveup = client._retry_invoker.should_giveup
    assert giveup(error(401)) is True  # no SIGINT: this test process would have been interrupted
    assert giveup(error(503)) is False and giveup(error(500)) is True  # Flower's own rule otherwise
    client.close()
