"""fedmoe ClientApp: a thin Flower shell over fl_client.bank (one bank per SuperNode)."""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fl_client.bank import handle_evaluate, handle_train
from fl_client.config import BankConfig
from protocol.config import JobConfig
from protocol.messages import RoundRequest

app = ClientApp()
logging.getLogger("fl_client").setLevel(logging.INFO)


def _configs(context: Context) -> tuple[JobConfig, BankConfig]:
    job = JobConfig.from_run_config(context.run_config)
    bank = BankConfig.from_node_config(context.node_config, job)
    if bank.torch_threads > 0:
        # Banks sharing one host (loopback, simulation) must not oversubscribe the cores:
        # OpenMP threads spin-wait, and 3 banks x N threads on 2 cores ran 30x slower.
        torch.set_num_threads(bank.torch_threads)
    return job, bank


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply pending aggregates, train privately, reply with the encrypted weighted delta."""
    job, bank = _configs(context)
    reply = handle_train(job, bank, RoundRequest.from_content(msg.content))
    return Message(content=reply.to_content(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Apply pending aggregates and report the eval loss on the bank's held-out data."""
    job, bank = _configs(context)
    reply = handle_evaluate(job, bank, RoundRequest.from_content(msg.content))
    return Message(content=reply.to_content(), reply_to=msg)
