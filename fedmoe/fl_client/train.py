"""Local (non-private) fine-tuning loop and evaluation for one bank's replica.

Deterministic under a seed: batch order comes from a seeded generator, and the model's own
randomness (none at train time: no dropout) cannot differ between runs on the same machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedmoe.fl_client.memory import reused_memory
from fedmoe.model.deepseek import DeepseekForCausalLM, lm_loss
from fedmoe.model.trainable import TrainableView

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0  # global-norm clip for non-private training (DP clips per sample instead)
    eval_batch_size: int = 32
    seed: int = 0
    balance_routing: bool = True  # aux-loss-free bias update after each step (off under DP)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr: expected > 0, got {self.lr}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: DeepseekForCausalLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(TrainableView(model).params.values())
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: DeepseekForCausalLM, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over all non-padding target tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        n = int((y != -100).sum())
        if n:
            total += lm_loss(model(x), y).item() * n
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the eval set has no target tokens")
    return total / count


@dataclass(frozen=True)
class TaskScore:
    """Held-out loss (nats/token) and next-field accuracy (share of records completed exactly)."""

    loss: float
    field_accuracy: float


@torch.no_grad()
def evaluate_task(
    model: DeepseekForCausalLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    spans: list[tuple[int, int]],
    *,
    batch_size: int = 32,
) -> TaskScore:
    """Loss, and the share of samples whose task field the model completes exactly (greedy).

    `spans[i]` = token positions [start, end) of sample i's field value (one record per sample,
    fedmoe.fl_client.data.consortium.field_spans). Teacher-forced argmax at every position of the
    value equals greedy decoding of the value from its prefix, so one forward pass scores both.

    Raises:
        ValueError: spans and samples disagree in number, or a span lies outside the sample.
    """
    n, length = inputs.shape
    if len(spans) != n or any(not 1 <= a < b <= length + 1 for a, b in spans):
        raise ValueError(f"evaluate_task: expected {n} spans within [1, {length + 1}], got {len(spans)}")
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for start in range(0, n, batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        logits_BTV = model(x)
        total += lm_loss(logits_BTV, y).item() * int((y != -100).sum())
        count += int((y != -100).sum())
        guess_BT = logits_BTV.argmax(-1)
        for row, (a, b) in enumerate(spans[start : start + batch_size]):
            correct += bool(torch.equal(guess_BT[row, a - 1 : b - 1], y[row, a - 1 : b - 1]))
    model.train(was_training)
    return TaskScore(total / max(count, 1), correct / n)


def train_local(
    model: DeepseekForCausalLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    *,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Plain AdamW fine-tuning of the model's trainable view on packed samples.

    Args:
        inputs, targets: LongTensor [n, L] (targets -100 where ignored).
        cfg: steps, batch size, schedule, seed.
        on_step: called as on_step(step, loss) after every step (progress bars, logs).
    """
    if inputs.shape != targets.shape or inputs.dim() != 2:
        raise ValueError(f"train_local: inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be [n, L]")
    n = inputs.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    cursor = 0
    with reused_memory():  # no fresh pages per step (fl_client/memory.py)
        for step in range(cfg.steps):
            if cursor + cfg.batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = lm_loss(model(inputs[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            if cfg.balance_routing:
                model.update_routing_bias()
            result.losses.append(loss.item())
            result.tokens += int((targets[idx] != -100).sum())
            if on_step is not None:
                on_step(step, result.losses[-1])
    result.seconds = time.perf_counter() - start
    logger.info("trained %d steps in %.1fs (%.0f tok/s)", cfg.steps, result.seconds, result.tokens / result.seconds)
    return result
