"""fedmoe ClientApp: a thin Flower shell over fedmoe.fl_client.bank (one bank per SuperNode).

Flower sends `str(exception)` of a failing ClientApp to the server, which stores it. A bank's
exception text can hold a private record (a CSV line in a data error) or a local path, so every
exception is turned into a reason that names only the error class and where it happened (file
name and line); the full message stays in the bank's own log.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmoe.fl_client.config import BankConfig
from fedmoe.fl_client.secagg_bank import handle_secagg_evaluate, handle_stage
from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError
from fedmoe.protocol.messages import RoundRequest, SecAggStage

app = ClientApp()
logger = logging.getLogger(__name__)
logging.getLogger("fedmoe.fl_client").setLevel(logging.INFO)


class BankFailure(RuntimeError):
    """What the server may know about a failure at the bank: the kind, never the content."""


def redacted_reason(err: BaseException) -> str:
    """'DataError in files.py:212' -- the error class and the innermost project frame, no message."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "site-packages" not in f.filename]
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(err).__name__}{where} (details in the bank's own log)"


def redacting(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as err:
            logger.exception("bank handler failed (this message stays at the bank)")
            raise BankFailure(redacted_reason(err)) from None

    return wrapper


def _configs(context: Context, *, trains: bool = True) -> tuple[JobConfig, BankConfig]:
    """The job and the bank's config; `trains`: the handler runs torch (else torch is never imported:
    the secure-aggregation stages that do not train start in ~3 s instead of ~20 s on a loaded host)."""
    job = JobConfig.from_run_config(context.run_config)
    bank = BankConfig.from_node_config(context.node_config, job)
    if trains and bank.torch_threads > 0:
        import torch

        # Banks sharing one host (loopback, simulation) must not oversubscribe the cores:
        # OpenMP threads spin-wait, and 3 banks x N threads on 2 cores ran 30x slower.
        torch.set_num_threads(bank.torch_threads)
    return job, bank


@app.train()
@redacting
def train(msg: Message, context: Context) -> Message:
    """CKKS path: apply pending aggregates, train privately, reply with the encrypted update."""
    from fedmoe.fl_client.bank import handle_train

    job, bank = _configs(context)
    if job.aggregation != "ckks":
        raise ConfigError(f"bank {bank.bank_id}: a plain train message in a job with aggregation {job.aggregation!r}")
    reply = handle_train(job, bank, RoundRequest.from_content(msg.content))
    return Message(content=reply.to_content(), reply_to=msg)


def secagg_handler(stage: SecAggStage) -> Callable[[Message, Context], Message]:
    """The handler of one secure-aggregation exchange ("train.secagg_<stage>"; fedmoe.fl_client.secagg_bank)."""

    @redacting
    def handle(msg: Message, context: Context) -> Message:
        job, bank = _configs(context, trains=stage is SecAggStage.MASKED_INPUT)
        request = RoundRequest.from_content(msg.content)
        if job.aggregation != "secagg" or request.stage is not stage:
            raise ConfigError(
                f"bank {bank.bank_id}: secagg stage {stage} for stage {request.stage} / {job.aggregation}"
            )
        reply = handle_stage(job, bank, request, context.node_id)
        return Message(content=reply.to_content(), reply_to=msg)

    handle.__name__ = handle.__qualname__ = f"secagg_{stage.value}"
    return handle


for _stage in SecAggStage:
    app.train(f"secagg_{_stage.value}")(secagg_handler(_stage))


@app.evaluate()
@redacting
def evaluate(msg: Message, context: Context) -> Message:
    """Apply pending aggregates; report the eval loss where the bank's policy releases it."""
    from fedmoe.fl_client.bank import handle_evaluate

    job, bank = _configs(context)
    request = RoundRequest.from_content(msg.content)
    opened = handle_secagg_evaluate if job.aggregation == "secagg" else handle_evaluate
    reply = opened(job, bank, request)
    return Message(content=reply.to_content(), reply_to=msg)
