"""One federated round of DP-SGD at one bank: budget check, private local steps, a report.

The bank decides, never the server: before touching the model it computes what the round would
bring its epsilon to and raises `BudgetExceeded` if that passes its budget. Model, accountant
state and router buffers are then exactly as they were.

What the round leaves behind: the trained trainable view (the caller computes delta = local -
global), and a `RoundPrivacyReport` with the new `AccountantState` to persist (and ledger)
*before* the update is released. The aux-loss-free balancing bias is frozen: its update reads
expert load counts, which are private data; the load counter the router keeps in training mode
is restored to its value before the round.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader

from fedmoe.fl_client.dp.accountant import (
    AccountantState,
    HistoryEntry,
    check_budget,
    noise_multiplier_for,
    sample_rate_for,
)
from fedmoe.fl_client.dp.config import DPConfig
from fedmoe.fl_client.dp.engine import make_private
from fedmoe.fl_client.dp.errors import DPError
from fedmoe.fl_client.dp.rng import PoissonBatchSampler
from fedmoe.fl_client.memory import reused_memory
from fedmoe.model.deepseek import Router

logger = logging.getLogger(__name__)


class PrivateData(Protocol):
    """What the trainer reads from `fedmoe.fl_client.data.PackedData`: one privacy unit per sample."""

    @property
    def inputs(self) -> torch.Tensor: ...  # LongTensor [n, L]

    targets: torch.Tensor  # LongTensor [n, L], -100 ignored
    unit_ids: list[str]


@dataclass(frozen=True)
class RoundPrivacyReport:
    """What one private round spent and did; JSON-friendly via `to_dict` (for replies and ledgers).

    Attributes:
        bank_id: the bank.
        epsilon_spent_this_round: epsilon_total - epsilon_before (epsilons compose sub-additively,
            so this is the increment of the bank's total, not a stand-alone guarantee).
        epsilon_total, epsilon_before: the bank's epsilon after / before this round at `delta`.
        delta, accountant: the accounting parameters.
        sigma, q, steps: this round's history entry (noise multiplier, sampling rate, steps).
        history: every entry so far (this round last), [(sigma, q, steps)].
        accountant_state: the new state to persist.
        target_epsilon: the bank's budget.
        n_samples: privacy units in the training set; clip_norm: C.
        mean_loss: mean per-sample training loss over the round (a plaintext metric of private
            data, not covered by DP: report it only if the bank accepts that).
        empty_batches: Poisson batches that came out empty (noise-only steps).
        grad_sample_mode, norm_plan: how per-sample norms were computed, per layer.
        seconds: wall time of the local steps.
    """

    bank_id: str
    epsilon_spent_this_round: float
    epsilon_total: float
    epsilon_before: float
    delta: float
    accountant: str
    sigma: float
    q: float
    steps: int
    history: tuple[HistoryEntry, ...]
    accountant_state: AccountantState
    target_epsilon: float
    n_samples: int
    clip_norm: float
    mean_loss: float
    empty_batches: int
    grad_sample_mode: str
    norm_plan: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "bank_id": self.bank_id,
            "epsilon_spent_this_round": self.epsilon_spent_this_round,
            "epsilon_total": self.epsilon_total,
            "epsilon_before": self.epsilon_before,
            "delta": self.delta,
            "accountant": self.accountant,
            "sigma": self.sigma,
            "q": self.q,
            "steps": self.steps,
            "history": [list(e) for e in self.history],
            "target_epsilon": self.target_epsilon,
            "n_samples": self.n_samples,
            "clip_norm": self.clip_norm,
            "mean_loss": self.mean_loss,
            "empty_batches": self.empty_batches,
            "grad_sample_mode": self.grad_sample_mode,
            "seconds": self.seconds,
        }


def check_data(data: PrivateData, cfg: DPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The [n, L] inputs/targets, after checking that each sample is exactly one privacy unit.

    Raises:
        DPError: shapes disagree; a unit id appears in two samples (its influence would not be
            bounded by one clip); a sample holds several records under privacy_unit="record".
    """
    bank = cfg.bank_id
    inputs, targets = data.inputs, data.targets
    if inputs.dim() != 2 or inputs.shape != targets.shape:
        raise DPError(
            f"bank {bank!r}: data inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)}: "
            "expected equal [n, L]"
        )
    unit_ids = list(data.unit_ids)
    if len(unit_ids) != inputs.shape[0]:
        raise DPError(f"bank {bank!r}: data has {inputs.shape[0]} samples but {len(unit_ids)} unit_ids")
    if len(set(unit_ids)) != len(unit_ids):
        seen: set[str] = set()
        dup = next(u for u in unit_ids if u in seen or seen.add(u))
        raise DPError(
            f"bank {bank!r}: privacy unit {dup!r} spans several samples; expected one sample per "
            f"{cfg.privacy_unit} (pack with privacy_unit={cfg.privacy_unit!r})"
        )
    record_indices = getattr(data, "record_indices", None)
    if cfg.privacy_unit == "record" and record_indices is not None:
        bad = next((i for i, members in enumerate(record_indices) if len(members) != 1), None)
        if bad is not None:
            raise DPError(
                f"bank {bank!r}: privacy_unit='record' expects one record per sample, sample {bad} holds "
                f"{len(record_indices[bad])} (pack with mode='per_record', not 'concat')"
            )
    return inputs, targets


def _router_buffers(model: torch.nn.Module) -> list[tuple[Router, torch.Tensor | None, torch.Tensor]]:
    out = []
    for router in (m for m in model.modules() if isinstance(m, Router)):
        bias = router.e_score_correction_bias.clone() if router.uses_bias else None
        out.append((router, bias, router.expert_load.clone()))
    return out


def _collate_indices(batch: list[int]) -> torch.Tensor:
    return torch.tensor(batch, dtype=torch.long)


def train_private_round(
    model: torch.nn.Module,
    data: PrivateData,
    cfg: DPConfig,
    state: AccountantState,
    *,
    seed: int | None,
) -> RoundPrivacyReport:
    """One federated round of local DP-SGD on the model's trainable view.

    Args:
        model: the bank's replica, already at the global model of the previous round, trainable
            view configured (`fedmoe.model.lora.configure_trainable`).
        data: one privacy unit per sample (`fedmoe.fl_client.data.pack_records(..., privacy_unit=...)`).
        cfg: the bank's DP config.
        state: the bank's accountant state (`AccountantState.fresh(cfg)` before its first round).
        seed: seeds batch sampling and noise (derive it from job seed, bank and round); must be
            None in secure_mode, where both come from the OS CSPRNG.

    Returns:
        RoundPrivacyReport, with `accountant_state` to persist before releasing the update.

    Raises:
        BudgetExceeded: this round would take the bank past cfg.target_epsilon (nothing changed).
        DPError: bad data, config/state mismatch, unsupported model, or a seed in secure_mode.
    """
    inputs, targets = check_data(data, cfg)
    n = inputs.shape[0]
    q = sample_rate_for(cfg, n)
    if cfg.secure_mode and seed is not None:
        raise DPError(f"bank {cfg.bank_id!r}: secure_mode draws from the OS CSPRNG; expected seed=None, got {seed!r}")
    if not cfg.secure_mode and seed is None:
        raise DPError(f"bank {cfg.bank_id!r}: expected an integer seed without secure_mode, got None")
    sigma = noise_multiplier_for(cfg, n)
    budget = check_budget(cfg, state, HistoryEntry(sigma, q, cfg.local_steps))

    steps = run_dp_steps(model, inputs, targets, cfg, noise_multiplier=sigma, sample_rate=q, seed=seed)

    new_state = state.appended(budget.entry)
    report = RoundPrivacyReport(
        bank_id=cfg.bank_id,
        epsilon_spent_this_round=budget.epsilon_after - budget.epsilon_before,
        epsilon_total=budget.epsilon_after,
        epsilon_before=budget.epsilon_before,
        delta=cfg.delta,
        accountant=cfg.accountant,
        sigma=sigma,
        q=q,
        steps=cfg.local_steps,
        history=new_state.history,
        accountant_state=new_state,
        target_epsilon=cfg.target_epsilon,
        n_samples=n,
        clip_norm=cfg.clip_norm,
        mean_loss=steps.loss_sum / max(steps.loss_count, 1),
        empty_batches=steps.empty_batches,
        grad_sample_mode=cfg.grad_sample_mode,
        norm_plan=steps.norm_plan,
        seconds=steps.seconds,
    )
    logger.info(
        "bank %s: private round done: %d steps, expected batch %d, sigma=%.3f (noise %.4f per coordinate), "
        "q=%.4f, epsilon %.3f -> %.3f of %.3f (%s, %.1fs)",
        cfg.bank_id,
        cfg.local_steps,
        cfg.expected_batch_size,
        sigma,
        sigma * cfg.clip_norm / cfg.expected_batch_size,
        q,
        budget.epsilon_before,
        budget.epsilon_after,
        cfg.target_epsilon,
        cfg.grad_sample_mode,
        steps.seconds,
    )
    return report


@dataclass(frozen=True)
class StepStats:
    loss_sum: float
    loss_count: int
    empty_batches: int
    norm_plan: dict[str, str]
    seconds: float


class StepProgress:
    """The bank's own log while it trains: steps done, mean loss so far, seconds left (estimated).

    A line every tenth of the round or every PROGRESS_SECONDS, whichever comes first. The loss stays
    in the bank's log (it leaves only where the bank's policy releases it).
    """

    PROGRESS_SECONDS = 10.0

    def __init__(self, total: int, bank_id: str) -> None:
        self.total, self.bank_id = total, bank_id or "bank"
        self.started = self.last = time.perf_counter()
        self.every = max(1, total // 10)

    def step(self, done: int, mean_loss: float) -> None:
        now = time.perf_counter()
        if done % self.every and done != self.total and now - self.last < self.PROGRESS_SECONDS:
            return
        self.last = now
        left = (now - self.started) / done * (self.total - done)
        logger.info("%s: step %d/%d, loss so far %.3f, ~%.0f s left", self.bank_id, done, self.total, mean_loss, left)


def run_dp_steps(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    cfg: DPConfig,
    *,
    noise_multiplier: float,
    sample_rate: float,
    seed: int | None,
) -> StepStats:
    """`cfg.local_steps` DP-SGD steps at a given noise multiplier: Poisson batches, clip, noise, step.

    No accounting and no budget: `train_private_round` calibrates sigma and charges the
    accountant around this; the canary audit calls it directly with an explicit sigma (a fault
    injection that must never train a bank). seed=None draws sampling and noise from the OS CSPRNG.
    """
    n = inputs.shape[0]
    device = next(p for p in model.parameters() if p.requires_grad).device
    secure = seed is None
    sample_gen = None if secure else torch.Generator().manual_seed(seed)
    noise_gen = None if secure else torch.Generator(device=device).manual_seed(seed + 1_000_003)
    frozen = _router_buffers(model)
    was_training = model.training
    model.train()
    private = make_private(model, cfg, noise_multiplier=noise_multiplier, seq_len=inputs.shape[1], generator=noise_gen)
    steps_done = 0
    progress = StepProgress(cfg.local_steps, cfg.bank_id)

    def count_step(optimizer: Any) -> None:
        nonlocal steps_done
        assert optimizer.noise_multiplier == noise_multiplier
        steps_done += 1
        progress.step(steps_done, loss_sum / max(loss_count, 1))

    private.optimizer.attach_step_hook(count_step)
    sampler = PoissonBatchSampler(n, sample_rate, cfg.local_steps, generator=sample_gen, secure=secure)
    loader = DataLoader(range(n), batch_sampler=sampler, collate_fn=_collate_indices)
    loss_sum, loss_count, empty = 0.0, 0, 0
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(), reused_memory():  # no fresh pages per step (fl_client/memory.py)
            # Frozen embeddings: the first hooked layer's inputs need no grad; expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=cfg.physical_batch_size, optimizer=private.optimizer
            ) as batches:
                for idx in batches:
                    if idx.numel() == 0:
                        private.prepare_empty_batch()
                        empty += 1
                    else:
                        losses = private.backward(inputs[idx].to(device), targets[idx].to(device))
                        loss_sum += float(losses.sum())
                        loss_count += losses.numel()
                    private.optimizer.step()
                    private.optimizer.zero_grad(set_to_none=True)
    finally:
        private.close()
        model.train(was_training)
        for router, bias, load in frozen:
            assert bias is None or torch.equal(router.e_score_correction_bias, bias), "routing bias moved"
            router.expert_load.copy_(load)
    assert steps_done == cfg.local_steps, (steps_done, cfg.local_steps)
    return StepStats(loss_sum, loss_count, empty, dict(private.plan), time.perf_counter() - started)
