"""The int8 frozen base: the forward and the adapter gradients equal the model on the dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
from test_gqa_dp import GQA_MOE  # noqa: E402  (tests/model is on sys.path under pytest's rootdir importer)

from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss, preset
from fedmoe.model.lora import LoraConfig, configure_trainable, lora_modules
from fedmoe.model.quant import dequantize_rows, int8_bytes, quantize_frozen_, quantize_rows

TARGETS = ("q_proj", "q_b_proj", "kv_b_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts", "mlp")


def test_rows_round_to_half_a_step_and_zero_rows_stay_zero():
    w = torch.randn(5, 3, 17, generator=torch.Generator().manual_seed(0))
    w[1, 2] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (5, 3)
    back = dequantize_rows(q, scale, torch.float32)
    assert ((back - w).abs() <= scale.unsqueeze(-1) / 2 + 1e-7).all()
    assert torch.equal(back[1, 2], torch.zeros(17)) and q.abs().max() == 127


@pytest.mark.parametrize(
    "config", [preset("tiny", tie_word_embeddings=True), GQA_MOE.replace(tie_word_embeddings=True)]
)
def test_int8_model_equals_the_model_on_dequantized_weights(config):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(config)
    configure_trainable(model, "lora", LoraConfig(rank=4, targets=TARGETS))
    with torch.no_grad():  # nonzero B, so the adapters are in the forward and the gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the reference holds exactly the weights the int8 model dequantizes
        for name, p in reference.named_parameters():
            if not p.requires_grad and ".lora_" not in name and "mlp.gate." not in name and p.dim() >= 2:
                q, scale = quantize_rows(p)
                p.copy_(dequantize_rows(q, scale, p.dtype))
    fp32_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if not p.requires_grad)
    names = quantize_frozen_(model)
    assert any(n.endswith("embed_tokens") for n in names) and any(n.endswith("experts.gate_up_proj") for n in names)
    assert model.lm_head.weight_q is model.model.embed_tokens.weight_q  # tied: one int8 table
    assert set(lora_modules(model)) == set(lora_modules(reference))
    assert int8_bytes(model) < 0.45 * fp32_bytes
    ids = torch.randint(0, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (model, reference):
        m.train()
        loss = lm_loss(m(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-6
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[name], atol=1e-6, rtol=1e-5), name
