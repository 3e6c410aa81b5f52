"""An in-process Grid for fast server-logic tests: delivers messages to fedmoe's real ClientApp.

Flower's own transport (SuperLink, SuperNodes, executors) is exercised by the loopback e2e tests;
this grid only replaces the wire so budget/selection logic can be tested in seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.fl_client.app import app as client_app

# The strict defaults + keep-plaintext-deltas: a bank policy setting, never a job's (issue 27).
KEEP_DELTAS_POLICY = str(Path(__file__).with_name("keep-deltas-policy.toml"))
KEEP_DELTAS_LINE = "\nkeep-plaintext-deltas = true\n"


def keeping_deltas(base: str | Path, folder: Path) -> str:
    """The bank policy `base` plus keep-plaintext-deltas = true, written into `folder`."""
    path = folder / f"keep-deltas-{Path(base).stem}.toml"
    path.write_text(Path(base).read_text(encoding="utf-8") + KEEP_DELTAS_LINE, encoding="utf-8")
    return str(path)


class LocalGrid(Grid):
    def __init__(self, node_configs: dict[int, dict], run_config: dict) -> None:
        # Flower stamps messages with the identity of the running ServerApp task; so do we.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.node_configs = node_configs
        self.run_config = run_config
        self.delivered: list[tuple[int, str, int]] = []  # (node, message type, round group)
        self.pending_replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what a push assigns
            msg.metadata.__dict__["_run_id"] = 1
            context = Context(
                run_id=1,
                node_id=node,
                node_config=self.node_configs[node],
                state=RecordDict(),
                run_config=self.run_config,
            )
            self.delivered.append((node, msg.metadata.message_type, msg.metadata.group_id))
            try:
                replies.append(client_app(message=msg, context=context))
            except Exception as err:  # what a SuperNode turns a ClientApp exception into
                replies.append(Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=msg))
        return replies

    # The federation pushes, then pulls: delivered through send_and_receive (which tests override to
    # drop or tamper with messages); a message it drops never gets a reply.
    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:  # a push gives every message its id, delivered or not
            msg.metadata.__dict__["_message_id"] = msg.object_id
        self.pending_replies.extend(self.send_and_receive(messages))
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        pulled = [r for r in self.pending_replies if r.metadata.reply_to_message_id in wanted]
        self.pending_replies = [r for r in self.pending_replies if r.metadata.reply_to_message_id not in wanted]
        return pulled

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover
        raise NotImplementedError
