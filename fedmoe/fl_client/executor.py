"""`fedmoe-superexec`: Flower's `flower-superexec` for a bank, running its ClientApp tasks in this
one long-lived ("warm") process instead of a fresh `flwr-clientapp` process per message.

Why: a secure-aggregation round is five messages, and a fresh process per message imported flwr
and our app (~1.3 s of CPU), unpacked the app bundle and, for the masked input, imported torch and
Opacus (~5 s), built the model and recalibrated sigma, in every bank at once (docs/performance.md).
Here all of that happens once per bank: torch, the loaded app and what its modules cache (sigma's
calibration, ...) stay in memory between messages.

What stays as in Flower (flwr 1.42 `flwr.supernode.runtime.run_clientapp`, whose helpers this
uses; pinned by tests/deploy/test_executor.py): a task is pulled from the bank's own SuperNode with
the task's token, heartbeats are sent while it runs, an exception becomes an error reply, the reply
and the task's status are pushed back. Tasks run one at a time: the executor claims the next task
only when the last one is done.

The gate: every task's bundle must hash to the fab-hash the run names, and that SHA-256 must be in
the bank's approved-apps file ($FEDMOE_APPROVED_APPS, default /etc/fedmoe/approved-apps; a missing
file approves nothing; `off` switches the gate off, which only the loopback launcher does), before
anything of it is installed or imported. Only ClientApp tasks are run (an AgentApp task would run
the bundle outside the gate), and only by this executor (`--executor` other than subprocess: exit).
A failure outside the ClientApp reaches the server as its kind only, never a path of the bank's.

What changes: an app bundle is loaded once (per SHA-256); another bundle replaces the modules of
the previous one (they are forgotten, so its code, not the venv's copy, is what runs). A crash of
the process itself (not an exception) stops the bank's executor: the server then sees the bank
as not answering, as it would a bank that went offline; restart the executor (compose restarts it).
A task that hangs (a stuck lock, a pull that never completes) holds the bank's executor until
Flower's own limits end it; a refused heartbeat ends nothing but that task's heartbeats.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedmoe.fl_client.app_gate import AppNotApproved, check_bundle
from fedmoe.protocol.flower import quick_object_pulls

logger = logging.getLogger(__name__)

TASK_INPUT_WAIT_SECONDS = 600.0  # Flower waits up to 2 h for a task's message objects
APPROVED_APPS_ENV = "FEDMOE_APPROVED_APPS"  # the bank's approved-apps file
DEFAULT_APPROVED_APPS = "/etc/fedmoe/approved-apps"  # the image's; a missing file approves nothing
NO_GATE = "off"  # FEDMOE_APPROVED_APPS=off: no gate (the loopback launcher: the operator's own working tree)


def approved_apps_file() -> str | None:
    """The gate's file; None only when the bank's operator switched the gate off explicitly."""
    value = os.environ.get(APPROVED_APPS_ENV, "").strip() or DEFAULT_APPROVED_APPS
    return None if value == NO_GATE else value


class AppRefused(Exception):
    """A bundle this executor will not run (not approved, or not the bundle its hash names)."""


class WarmClientApps:
    """Runs ClientApp tasks one at a time in a worker thread; keeps the current bundle's app loaded.

    `busy` while it imports torch and while a task runs: the SuperExec then claims no further task
    (it would only wait in a queue here, and a claimed task that does not start is handed out again)."""

    def __init__(self, approved_file: str | None) -> None:
        self.approved_file = approved_file
        self.fab_hash: str | None = None
        self.app_dir: Path | None = None
        self.app = None
        self.busy = threading.Event()
        self.busy.set()  # until the warm-up imports are done
        self.tasks: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._serve, name="fedmoe-clientapp", daemon=True)
        self.worker.start()

    def submit(self, spec) -> None:
        self.busy.set()
        self.tasks.put(spec)

    def _serve(self) -> None:
        warm_up()  # in this thread, before any task: never two threads importing torch at once
        self.busy.clear()
        while True:
            spec = self.tasks.get()
            try:
                run_task(spec, self.load)
            except BaseException:  # noqa: BLE001 - one task's failure must not stop the bank's executor
                logger.exception("task %s failed outside the ClientApp", spec.task_id)
            finally:
                if self.tasks.empty():
                    self.busy.clear()

    def load(self, run, fab):
        """The ClientApp of this bundle: gate-checked every time, installed and imported once.

        Everything is keyed by the SHA-256 of the bundle's bytes, never by the hash, id or version
        the server attached to it (a server could label an approved bundle with another's hash)."""
        digest = hashlib.sha256(fab.content).hexdigest()
        if fab.hash_str != digest:
            raise AppRefused(f"the app bundle's sha256 is {digest}, the run names {fab.hash_str}")
        if self.approved_file is not None:
            check_bundle(fab.content, self.approved_file)
        if digest == self.fab_hash:
            return self.app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn

        app_dir = install_from_fab(fab.content, skip_prompt=True)
        forget_app_modules(app_dir, self.app_dir)
        # With app_path the loader also checks that the bundle's own id and version are the run's.
        load = get_load_client_app_fn(default_app_ref="", app_path=str(app_dir), multi_app=True)
        self.app = load(run.fab_id, run.fab_version, digest)
        self.fab_hash, self.app_dir = digest, app_dir
        logger.info("loaded app bundle %s (kept loaded for the next messages)", digest[:16])
        return self.app


def forget_app_modules(app_dir: Path, previous_dir: Path | None) -> None:
    """Drop the bundle's top-level packages from sys.modules (this module's own package included:
    it was imported from the venv) so that the bundle's copy is imported; the previous bundle's
    directory leaves sys.path."""
    names = {p.name for p in app_dir.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in app_dir.glob("*.py")}
    for name in [m for m in sys.modules if m.partition(".")[0] in names]:
        del sys.modules[name]
    if previous_dir is not None and str(previous_dir) in sys.path:
        sys.path.remove(str(previous_dir))


def run_task(spec, load_app: Callable) -> None:
    """One ClientApp task, as `flwr-clientapp --token` runs it, in this process."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    started = time.perf_counter()
    client = _runtime_client(spec)
    heartbeat = HeartbeatSender(_task_heartbeat(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    heartbeat.start()
    try:
        message, context, run, fab = pull_task_input(client)
        app = load_app(run, fab)
        try:
            reply = app(message=message, context=context)
        except (Exception, SystemExit) as err:  # our ClientApp raises only redacted reasons (fedmoe.fl_client.app)
            raise _FromApp(f"{type(err)}:<'{err}'>") from err
        status, details = SubStatus.COMPLETED, ""
    except (Exception, SystemExit) as err:  # SystemExit: an app calling sys.exit ends its task only
        code, details = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, _server_reason(err)
        if isinstance(err, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        logger.error("ClientApp task %s failed: %s", spec.task_id, err.__cause__ or err)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:  # noqa: BLE001 - logged like Flower does; the task's status still goes back
            logger.exception("failed to push the reply of task %s", spec.task_id)
        try:
            push_task_output(client=client, context=context, sub_status=status, details=details)
        finally:
            if heartbeat.is_running:  # (a heartbeat refused with 401 has already ended its thread)
                heartbeat.stop()
            client.close()
        kind = message.metadata.message_type if message is not None else "?"
        logger.info("task %s (%s) %s in %.2f s", spec.task_id, kind, status, time.perf_counter() - started)


class _FromApp(Exception):
    """The ClientApp itself raised: its (already redacted) reason goes to the server as Flower sends it."""


def _server_reason(err: BaseException) -> str:
    """What the server may read about a failed task: the app's own redacted reason; for a failure
    outside it (gate, loading, exit), the kind and the bundle's hash, never a path of the bank's."""
    from flwr.clientapp.client_app import LoadClientAppError

    if isinstance(err, _FromApp):
        return str(err)
    if isinstance(err, AppNotApproved | AppRefused):
        return f"{type(err).__name__}: the app bundle was refused by the bank's app gate (details in its log)"
    if isinstance(err, LoadClientAppError):
        return "An exception was raised when attempting to load `ClientApp`"
    return f"{type(err).__name__} outside the ClientApp (details in the bank's log)"


def _task_heartbeat(client) -> Callable[[], bool]:
    """Flower's task heartbeat (flwr.supercore.heartbeat.make_task_heartbeat_fn_http) without its
    SIGINT on a refused heartbeat: that ended one flwr-clientapp process, here it would stop the
    bank's whole executor. A refused heartbeat (the task is over for the SuperNode) just stops."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(request).success)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise

    return beat


def _runtime_client(spec):
    """The Runtime API client `flwr-clientapp` builds: this task's token on every call."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    invoker = make_simple_http_retry_invoker()
    invoker.should_giveup = _task_over_on_401(invoker.should_giveup)
    return RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(spec.token),
        ],
        retry_invoker=invoker,
    )


def _task_over_on_401(should_giveup: Callable[[Exception], bool]) -> Callable[[Exception], bool]:
    """Flower answers a 401 by sending SIGINT to its own process: right for a `flwr-clientapp` that
    runs one task, fatal here, where it ended the bank's whole executor (a SuperNode revokes the token
    of a task it gave up on, e.g. one whose run ended mid-pull). Here a 401 ends that call, so that
    task fails and the executor goes on with the next one."""
    import httpx

    def giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return should_giveup(exc)

    return giveup


def warm_executor_class(approved_file: str | None):
    """Flower's SubprocessExecutor narrowed to ClientApp tasks, each handed to one WarmClientApps.

    Other task types (an AgentApp run, ...) would run the server's bundle without the gate: they are
    never claimed (no capacity offered) and refused if launched."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class WarmExecutor(SubprocessExecutor):
        def __init__(self) -> None:
            self.apps = WarmClientApps(approved_file)

        def get_eligible_capacity(self, supported_task_types, **kwargs):
            idle = TaskType.CLIENT_APP in supported_task_types and not self.apps.busy.is_set()
            return ({TaskType.CLIENT_APP} if idle else set()), set()

        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP:
                return LaunchResult.failed(f"a bank's executor runs ClientApp tasks only, not {spec.task_type}")
            self.apps.submit(spec)
            return LaunchResult.accepted()

    return WarmExecutor


def timestamped_logs() -> None:
    """The bank's own log (this process's stderr), with times: Flower's lines and ours (its step
    progress, each task's duration), not every HTTP request the Runtime API client makes."""
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s: %(name)s: %(message)s"))
    ours = logging.getLogger("fedmoe.fl_client")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


# What the bank's first training message would otherwise import (~5 s of CPU on this machine's
# cores, in the middle of a round): imported while the executor waits for its first task.
WARM_IMPORTS = ("numpy", "torch", "opacus", "tenseal", "safetensors.torch")


def warm_up() -> None:
    import importlib

    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except ImportError:  # the app's own import will say what is missing
            logger.warning("could not pre-import %s", name)


# The bank's node-config (what its SuperNode is started with), for the checks at start: a policy typo,
# a wrong data path or a missing key stops the bank now, with the reason, instead of refusing the
# first job after the other banks have trained and spent their budget.
NODE_CONFIG_ENV = "FEDMOE_NODE_CONFIG"
EXIT_BAD_SITE = 2


def startup_check(node_config_text: str) -> list[str]:
    """What the bank would refuse a job for, found before any job: [] when everything is usable."""
    from flwr.common.config import parse_config_args

    from fedmoe.fl_client.config import BankConfig
    from fedmoe.protocol.config import JobConfig

    try:
        config = BankConfig.from_node_config(parse_config_args([node_config_text]), JobConfig())
    except Exception as err:  # noqa: BLE001 - any unreadable node-config or policy stops the bank
        return [str(err)]
    problems = []
    if config.data_path is not None:
        problems += _check_data(config.data_path)
    problems += _check_keys(config)
    return problems


def _check_data(path: Path) -> list[str]:
    from fedmoe.fl_client.data.files import load_text_file

    if not path.is_file():
        return [f"data-path {path}: no such file (node-config 'data-path')"]
    try:
        load_text_file(path)
    except Exception as err:  # noqa: BLE001 - the loader's error names the file and line
        return [f"data-path {path}: {err}"]
    return []


def _check_keys(config) -> list[str]:
    """A secret context to open aggregates with; the identity (when provisioned) and its pin agree."""
    from fedmoe.crypto.identity import load_identity, load_pins
    from fedmoe.protocol.config import PINS_FILE

    key_dir = config.key_path.parent
    secrets = list(dict.fromkeys([key_dir / "context.secret.bfv", key_dir / "context.secret.ckks", config.key_path]))
    if not any(path.is_file() for path in secrets):
        return [f"key folder {key_dir}: no secret context ({', '.join(p.name for p in secrets)})"]
    if not config.identity_path.exists() and config.identity_path == config.state_root / "identity.secret":
        return []  # a bank without a provisioned identity makes one on first use (fedmoe.fl_client.privacy)
    try:
        identity = load_identity(config.identity_path)
        pins_file = key_dir / PINS_FILE
        if pins_file.exists() and load_pins(pins_file).keys.get(config.bank_id) != identity.public_key:
            return [f"{pins_file}: the key pinned for {config.bank_id!r} is not this bank's identity"]
    except Exception as err:  # noqa: BLE001 - CryptoError names the file
        return [str(err)]
    return []


def main() -> None:
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as superexec

    timestamped_logs()
    node_config = os.environ.get(NODE_CONFIG_ENV, "")
    problems = startup_check(node_config) if node_config else []
    if problems:
        for problem in problems:
            logger.error("this bank cannot take part in a job: %s", problem)
        sys.exit(EXIT_BAD_SITE)
    warm = warm_executor_class(approved_apps_file())

    def executor_for(executor_type, **kwargs):
        if executor_type != ExecutorType.SUBPROCESS:  # its tasks would bypass the app gate
            raise ValueError(
                f"fedmoe-superexec runs a bank's ClientApps itself; --executor {executor_type} is not supported"
            )
        return warm()

    superexec.get_executor = executor_for
    # a task's message objects: retried after 0.02 s, not 1 s, and given up after TASK_INPUT_WAIT_SECONDS
    # (they come from the bank's own SuperNode; a task whose objects never come must not hold the bank)
    quick_object_pulls(max_seconds=TASK_INPUT_WAIT_SECONDS)
    flower_superexec()


if __name__ == "__main__":
    main()
