"""Message encodings: every field survives the RecordDict round trip, whichever way a blob travels
(inline up to INLINE_BYTES, chunked Arrays above), and a light exchange is 3 Flower objects."""

from __future__ import annotations

import os

import pytest
from flwr.app import Message

from fedmoe.protocol.messages import INLINE_BYTES, EvalReply, RoundRequest, SecAggStage, TrainReply, TrainStatus


def flower_objects(content) -> list[str]:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # what a Message needs outside a run
    message = Message(content=content, dst_node_id=1, message_type="train.secagg_consent")
    return sorted(type(o).__name__ for o in get_all_nested_objects(message).values())


@pytest.mark.parametrize("size", [0, 1000, INLINE_BYTES, INLINE_BYTES + 1])
def test_round_request_round_trip(size):
    blob = os.urandom(size)
    request = RoundRequest(
        job_id="j", round=3, key_id="k", key_epoch=1, aggregates={1: os.urandom(50), 2: blob},
        stage=SecAggStage.MASKED_INPUT, secagg=blob, secagg_next=os.urandom(300),
    )  # fmt: skip
    assert RoundRequest.from_content(request.to_content()) == request


@pytest.mark.parametrize("size", [0, 500, INLINE_BYTES + 1])
def test_train_reply_round_trip(size):
    reply = TrainReply(
        bank_id="bank-1", round=2, status=TrainStatus.OK, applied_round=1, start_hash="ab", reason="",
        ledger_commitment="cd", bundle=os.urandom(size), metrics={"train-loss": 5.5, "seconds-train": 2.0},
        next_bundle=os.urandom(size // 2),
    )  # fmt: skip
    assert TrainReply.from_content(reply.to_content()) == reply


def test_eval_reply_round_trip():
    for loss in (None, 4.25):
        reply = EvalReply(bank_id="bank-0", round=3, applied_round=3, eval_loss=loss)
        assert EvalReply.from_content(reply.to_content()) == reply


def test_a_light_exchange_is_three_flower_objects():
    """Each object is one HTTP request per hop; a secure-aggregation stage message was 7 of them."""
    request = RoundRequest(job_id="j", round=3, key_id="k", key_epoch=1, stage=SecAggStage.CONSENT, secagg=b"x" * 9000)
    reply = TrainReply("bank-1", 3, TrainStatus.OK, 2, "ab", bundle=b"y" * 9000, metrics={"a": 1.0})
    for content in (request.to_content(), reply.to_content()):
        assert flower_objects(content) == ["ConfigRecord", "Message", "RecordDict"]
    big = RoundRequest(job_id="j", round=3, key_id="k", key_epoch=1, aggregates={2: b"z" * (INLINE_BYTES + 1)})
    assert "ArrayChunk" in flower_objects(big.to_content())  # large blobs still go as chunked arrays
