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
and the task's status are pushed back. Tasks run one at a time, in arrival order. The bank's app
gate (fl_client/app_gate.py) checks every task's bundle against $FEDMOE_APPROVED_APPS, when set,
before anything of it is installed or imported. Other task types go to Flower's own subprocess
executor.

What changes: an app bundle is loaded once (per fab-hash); another bundle replaces the modules of
the previous one (they are forgotten, so its code, not the venv's copy, is what runs). A crash of
the process itself (not an exception) stops the bank's executor: the server then sees the bank
as not answering, as it would a bank that went offline; restart the executor (compose restarts it).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fl_client.app_gate import check_bundle
from protocol.flower import quick_object_pulls

logger = logging.getLogger(__name__)

APPROVED_APPS_ENV = "FEDMOE_APPROVED_APPS"  # the bank's approved-apps file; unset: no gate (loopback)


class WarmClientApps:
    """Runs ClientApp tasks one at a time in a worker thread; keeps the current bundle's app loaded."""

    def __init__(self, approved_file: str | None) -> None:
        self.approved_file = approved_file
        self.fab_hash: str | None = None
        self.app_dir: Path | None = None
        self.app = None
        self.tasks: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._serve, name="fedmoe-clientapp", daemon=True)
        self.worker.start()

    def submit(self, spec) -> None:
        self.tasks.put(spec)

    def _serve(self) -> None:
        while True:
            spec = self.tasks.get()
            try:
                run_task(spec, self.load)
            except BaseException:  # noqa: BLE001 - one task's failure must not stop the bank's executor
                logger.exception("task %s failed outside the ClientApp", spec.task_id)

    def load(self, run, fab):
        """The ClientApp of this bundle: gate-checked every time, installed and imported once."""
        if self.approved_file is not None:
            check_bundle(fab.content, self.approved_file)
        if fab.hash_str == self.fab_hash:
            return self.app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        install_from_fab(fab.content, skip_prompt=True)
        app_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        forget_app_modules(app_dir, self.app_dir)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self.app = load(run.fab_id, run.fab_version, fab.hash_str)
        self.fab_hash, self.app_dir = fab.hash_str, app_dir
        logger.info("loaded app bundle %s (kept loaded for the next messages)", fab.hash_str[:16])
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
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    started = time.perf_counter()
    client = _runtime_client(spec)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    heartbeat.start()
    try:
        message, context, run, fab = pull_task_input(client)
        reply = load_app(run, fab)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except (Exception, SystemExit) as err:  # SystemExit: an app calling sys.exit ends its task only
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        # Our ClientApp raises only redacted reasons (fl_client.app.redacting); Flower's format.
        details = f"{type(err)}:<'{err}'>"
        if isinstance(err, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            details = "An exception was raised when attempting to load `ClientApp`"
        logger.error("ClientApp task %s failed: %s", spec.task_id, details)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:  # noqa: BLE001 - logged like Flower does; the task's status still goes back
            logger.exception("failed to push the reply of task %s", spec.task_id)
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
        kind = message.metadata.message_type if message is not None else "?"
        logger.info("task %s (%s) %s in %.2f s", spec.task_id, kind, status, time.perf_counter() - started)


def _runtime_client(spec):
    """The Runtime API client `flwr-clientapp` builds: this task's token on every call."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    return RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(spec.token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def warm_executor_class(approved_file: str | None):
    """Flower's SubprocessExecutor, with ClientApp tasks handed to one WarmClientApps."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class WarmExecutor(SubprocessExecutor):
        def __init__(self) -> None:
            self.apps = WarmClientApps(approved_file)

        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
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
    ours = logging.getLogger("fl_client")
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


def main() -> None:
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import ExecutorType
    from flwr.supercore.superexec import run_superexec as superexec

    timestamped_logs()
    warm = warm_executor_class(os.environ.get(APPROVED_APPS_ENV) or None)
    get_executor = superexec.get_executor

    def executor_for(executor_type, **kwargs):
        return warm() if executor_type == ExecutorType.SUBPROCESS else get_executor(executor_type, **kwargs)

    superexec.get_executor = executor_for
    threading.Thread(target=warm_up, name="fedmoe-warm-up", daemon=True).start()
    quick_object_pulls()  # a task's message objects: retried after 0.02 s, not 1 s (protocol/flower.py)
    flower_superexec()


if __name__ == "__main__":
    main()
