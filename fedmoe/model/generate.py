"""Text generation: greedy or top-p sampling, with MLA's compressed KV cache or without.

Without a cache every step re-runs the whole sequence (the reference, O(T^2) per token); with
one, the prompt is run once (prefill) and each step feeds one token, attending over the cached
latents (fedmoe.model.deepseek.KVCache), in the latent space ("absorb", default) or by decompressing
them ("naive"). Both paths share the sampler, so with the same seed they
produce the same tokens; tests/model/test_generate.py holds them to that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from fedmoe.model.deepseek import DeepseekForCausalLM
from fedmoe.model.errors import ModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    strategy: "greedy" (argmax) or "top_p" (nucleus sampling: the smallest set of tokens whose
    probability reaches top_p, after dividing logits by temperature).
    """

    max_new_tokens: int = 64
    strategy: Literal["greedy", "top_p"] = "greedy"
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    eos_id: int | None = None
    use_cache: bool = True
    # With the cache: "absorb" attends in MLA's latent space (DeepSeek's inference form);
    # "naive" decompresses every cached latent through kv_b_proj at each step.
    mla: Literal["absorb", "naive"] = "absorb"

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "top_p"):
            raise ModelError(f"SamplingConfig.strategy: expected 'greedy' or 'top_p', got {self.strategy!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ModelError(f"SamplingConfig.top_p: expected in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ModelError(f"SamplingConfig.temperature: expected > 0, got {self.temperature}")
        if self.mla not in ("absorb", "naive"):
            raise ModelError(f"SamplingConfig.mla: expected 'absorb' or 'naive', got {self.mla!r}")
        if self.max_new_tokens < 0:
            raise ModelError(f"SamplingConfig.max_new_tokens: expected >= 0, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    tokens_BN: torch.Tensor  # the new tokens only; rows that stopped at EOS are padded with EOS
    prompt_len: int
    seconds: float
    prefill_seconds: float
    cache_bytes: int  # 0 without a cache

    @property
    def new_tokens(self) -> int:
        return self.tokens_BN.numel()

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the whole call, prefill included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first of each row (which the prefill produces) over the time after it."""
        decode_tokens = self.new_tokens - self.tokens_BN.shape[0]
        decode_seconds = self.seconds - self.prefill_seconds
        return decode_tokens / decode_seconds if decode_tokens > 0 and decode_seconds > 0 else float("nan")


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Next token per row (B,) from the last position's logits."""
    if cfg.strategy == "greedy":
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / cfg.temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # Keep a token if the mass before it is still below top_p (so the first one always stays).
    keep = (sorted_p.cumsum(dim=-1) - sorted_p) < cfg.top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(dim=-1, keepdim=True), 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(
    model: DeepseekForCausalLM,
    prompt_BT: torch.Tensor,
    cfg: SamplingConfig,
    *,
    on_forward: Callable[[torch.Tensor, int], None] | None = None,
) -> GenerationResult:
    """Continues each prompt row by up to cfg.max_new_tokens tokens.

    Args:
        model: the LM (put in eval mode by the caller).
        prompt_BT: token ids, rows of equal length (no padding).
        cfg: sampling settings; cfg.use_cache picks the compressed KV cache or full re-runs.
        on_forward: called before each forward with the ids fed and their first position (the
            expert tracer uses it to label what the routers see).

    Returns:
        the new tokens, timing and the cache size.
    """
    if prompt_BT.dim() != 2 or prompt_BT.shape[1] < 1:
        raise ModelError(f"generate: prompt must be (B, T>=1) token ids, got shape {tuple(prompt_BT.shape)}")
    B, T = prompt_BT.shape
    total = T + cfg.max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ModelError(
            f"generate: prompt {T} + max_new_tokens {cfg.max_new_tokens} = {total} > "
            f"max_position_embeddings {model.config.max_position_embeddings}"
        )
    gen = torch.Generator(device=prompt_BT.device).manual_seed(cfg.seed)
    cache = model.new_cache(B, total, absorb=cfg.mla == "absorb") if cfg.use_cache else None
    logger.info("generate: %s", f"KV cache, {cfg.mla} MLA" if cache is not None else "no cache (full re-runs)")
    seq = prompt_BT
    done = torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    new: list[torch.Tensor] = []
    started = time.perf_counter()
    prefill_seconds = 0.0
    for step in range(cfg.max_new_tokens):
        if cache is None or step == 0:
            feed, start = seq, 0
        else:
            feed, start = seq[:, -1:], seq.shape[1] - 1
        if on_forward is not None:
            on_forward(feed, start)
        logits = model(feed, cache) if cache is not None else model(feed)
        if step == 0:
            prefill_seconds = time.perf_counter() - started
        token_B = sample_next(logits[:, -1], cfg, gen)
        if cfg.eos_id is not None:
            token_B = torch.where(done, torch.full_like(token_B, cfg.eos_id), token_B)
            done |= token_B == cfg.eos_id
        new.append(token_B)
        seq = torch.cat([seq, token_B[:, None]], dim=1)
        if cfg.eos_id is not None and bool(done.all()):
            break
    tokens = torch.stack(new, dim=1) if new else prompt_BT.new_zeros(B, 0)
    return GenerationResult(
        tokens_BN=tokens,
        prompt_len=T,
        seconds=time.perf_counter() - started,
        prefill_seconds=prefill_seconds,
        cache_bytes=cache.nbytes() if cache is not None else 0,
    )
