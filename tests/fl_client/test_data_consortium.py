"""The one-language consortium corpus and the next-field metric scored on it."""

from __future__ import annotations

import pytest
import torch

from fedmoe.fl_client.data import pack_records
from fedmoe.fl_client.data.consortium import (
    CATEGORIES,
    TASK_FIELD,
    field_spans,
    generate_consortium_corpus,
    make_consortium,
)
from fedmoe.fl_client.errors import DataError
from fedmoe.fl_client.train import evaluate, evaluate_task
from fedmoe.model.deepseek import DeepseekForCausalLM, preset
from fedmoe.model.tokenizer import ByteTokenizer


def test_bank_i_is_the_same_in_every_consortium_and_banks_differ():
    small, large = make_consortium(3, seed=0), make_consortium(15, seed=0)
    assert small == large[:3]
    assert generate_consortium_corpus(small[1], 50, seed=0) == generate_consortium_corpus(large[1], 50, seed=0)
    mixes = {b.category_mix for b in large} | {b.segment_mix for b in large}
    assert len(mixes) == 30  # product mix and segments differ bank by bank
    own = [m.name for b in large for m in b.own_merchants]
    assert len(set(own)) == len(own) and all(name.startswith(f"BANK{i // 3} ") for i, name in enumerate(own))


def test_records_end_in_their_category_and_carry_the_banks_own_patterns():
    bank = make_consortium(2, seed=0)[1]
    records = generate_consortium_corpus(bank, 600, seed=0)
    assert all(r["text"].endswith(f"{TASK_FIELD}{r['category']}") and r["category"] in CATEGORIES for r in records)
    assert all(len(r["text"].encode()) < 96 for r in records)
    own = {m.name for m in bank.own_merchants}
    assert 0 < sum(any(name in r["text"] for name in own) for r in records) < 0.15 * len(records)  # rare
    assert any(f"ref {bank.reference_prefix}-" in r["text"] for r in records)
    assert len({r["text"].split(" | ")[0].split()[2] for r in records}) >= 3  # several customer segments


def test_field_spans_point_at_the_category_tokens():
    records = generate_consortium_corpus(make_consortium(1, seed=0)[0], 20, seed=0)
    tok = ByteTokenizer()
    for record, (start, end) in zip(records, field_spans(records, tok.encode), strict=True):
        assert tok.decode(tok.encode(record["text"])[start:end]) == record["category"]
    with pytest.raises(DataError, match="has no 'category=' field"):
        field_spans([{"text": "no field here"}], tok.encode)
    with pytest.raises(DataError, match="n_banks expected >= 1, got 0"):
        make_consortium(0, seed=0)


def test_field_accuracy_is_greedy_decoding_of_the_field():
    """Two samples whose 'field' is what the model itself decodes greedily, one where it is not."""
    torch.manual_seed(0)
    model = DeepseekForCausalLM(preset("tiny")).eval()
    tok = ByteTokenizer()
    records = [{"text": "09-23 card retail | KELSO FOODS | 12.00 | category=xyz"}] * 3
    packed = pack_records(records, encode=tok.encode, seq_len=64, eos_id=tok.eos_id, pad_id=tok.pad_id,
                          privacy_unit="record")  # fmt: skip
    start, end = field_spans(records[:1], tok.encode)[0]
    width = end - start  # 3
    tokens = packed.tokens.clone()
    with torch.no_grad():
        for pos in range(start, start + width):  # greedy decoding of `width` tokens from the prefix
            tokens[:, pos] = model(tokens[:, :pos])[:, -1].argmax(-1)
    tokens[2, start + 1] = (tokens[2, start + 1] + 1) % 256  # sample 2: the second token is not the model's
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[packed.targets == -100] = -100
    spans = [(start, start + width)] * 3
    score = evaluate_task(model, inputs, targets, spans)
    assert score.field_accuracy == pytest.approx(2 / 3)
    assert score.loss == pytest.approx(evaluate(model, inputs, targets), rel=1e-6)
    with pytest.raises(ValueError, match="expected 3 spans"):
        evaluate_task(model, inputs, targets, spans[:2])
