"""Wiring Opacus around a fedmoe model: checks, the per-layer clipping plan, private steps.

Modes (DPConfig.grad_sample_mode):
    hooks   GradSampleModule + DPOptimizer: every per-sample gradient instantiated [B, ...], clipped
            and summed by the optimizer. Simplest; memory B x trainable size.
    ghost   GradSampleModuleFastGradientClipping + DPOptimizerFastGradientClipping +
            DPLossFastGradientClipping (Opacus' fast gradient clipping): backward 1 computes
            per-sample gradient *norms* only (ghost form for expert banks and linears), backward 2
            computes sum_b c_b grad(loss_b) with c_b = min(1, C / ||g_b||).
    mixed   book-keeping (fedmoe/fl_client/dp/bookkeeping.py) + DPOptimizerFastGradientClipping: ONE
            backward pass for the layers' output gradients; each expert bank / linear takes the
            ghost norm or instantiates its per-sample gradient, whichever is cheaper for its shape
            (`ghost_is_cheaper`); p.grad = sum_b c_b G_b built per layer without a second pass.
Router and RMSNorm always instantiate (E*D or D numbers per sample); nn.Embedding uses Opacus'
ghost norm. All three share the registered samplers and give the same clipped sum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedmoe.fl_client.dp import samplers  # noqa: F401  (registers our samplers with Opacus)
from fedmoe.fl_client.dp.bookkeeping import BookKeepingClipper
from fedmoe.fl_client.dp.config import DPConfig
from fedmoe.fl_client.dp.errors import DPError
from fedmoe.fl_client.dp.rng import secure_gaussian_like_all
from fedmoe.fl_client.dp.samplers.common import NORM_METHOD_ATTR, NormMethod, ghost_is_cheaper
from fedmoe.fl_client.dp.samplers.router import ROUTER_IDS_ATTR, stash_router_ids
from fedmoe.model.deepseek import ExpertLinear, Router, lm_loss
from fedmoe.model.errors import ModelError
from fedmoe.model.trainable import TrainableView

logger = logging.getLogger(__name__)

# Modules whose buffers may sit beside trainable weights: the router's correction bias is frozen
# during private training and its load counter is restored after it (see trainer).
_BUFFERS_ALLOWED = (Router,)
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks")
_OUR_MODULE_ATTRS = (NORM_METHOD_ATTR, ROUTER_IDS_ATTR)


# ---------------------------------------------------------------------------------------------
# Checks and plan
# ---------------------------------------------------------------------------------------------


def _direct_trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def check_model(model: nn.Module, cfg: DPConfig) -> None:
    """Refuses models whose per-sample gradients Opacus cannot compute exactly with our samplers.

    Raises:
        DPError: no trainable parameter; a trainable layer without a registered sampler (Opacus
            would fall back to functorch, which cannot trace data-dependent routing); a trainable
            layer inside another trainable layer; buffers beside trainable weights (other than
            the router's); a parameter shared by two layers under ghost/mixed clipping.
    """
    bank = cfg.bank_id
    try:
        TrainableView(model)
    except ModelError as err:
        raise DPError(f"bank {bank!r}: {err}") from None
    supported = sorted({t.__name__ for t in GradSampleHooks.GRAD_SAMPLERS})
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        direct = _direct_trainable(module)
        if not direct:
            continue
        where = f"bank {bank!r}: layer {name or '<root>'} ({type(module).__name__})"
        if type(module) not in GradSampleHooks.GRAD_SAMPLERS:
            raise DPError(
                f"{where} has trainable parameters but no per-sample gradient sampler; supported: {supported}"
            )
        nested = [n for n, child in module.named_modules() if child is not module and _direct_trainable(child)]
        if nested:
            raise DPError(f"{where} is trainable and so are its sublayers {nested}; expected one trainable level")
        if list(module.buffers(recurse=False)) and not isinstance(module, _BUFFERS_ALLOWED):
            raise DPError(f"{where} has buffers beside trainable weights; expected none (they would escape DP)")
        for p in direct:
            if id(p) in owners and cfg.grad_sample_mode != "hooks":
                raise DPError(
                    f"{where} shares a parameter with {owners[id(p)]}; ghost/mixed clipping expects untied "
                    "weights, got tied ones (use grad_sample_mode='hooks')"
                )
            owners[id(p)] = name


def plan_norm_methods(model: nn.Module, *, mode: str, seq_len: int) -> dict[str, NormMethod]:
    """Per trainable expert bank / linear: "ghost" or "instantiate" for its per-sample norm.

    Args:
        model: the fedmoe model (its config gives top-k: an expert bank sees seq_len * k rows).
        mode: "ghost" (every such layer ghost) or "mixed" (ghost_is_cheaper per layer).
        seq_len: tokens per sample.

    Returns:
        {module name: method}; empty for "hooks".
    """
    if mode == "hooks":
        return {}
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", 1)
    plan: dict[str, NormMethod] = {}
    for name, module in model.named_modules():
        if not _direct_trainable(module):
            continue
        if isinstance(module, ExpertLinear):
            shape = dict(n_experts=module.n_experts, in_features=module.in_features, out_features=module.out_features)
            rows = seq_len * top_k
        elif isinstance(module, nn.Linear):
            shape = dict(n_experts=1, in_features=module.in_features, out_features=module.out_features)
            rows = seq_len
        else:
            continue
        cheaper = mode == "ghost" or ghost_is_cheaper(rows_per_sample=rows, **shape)
        plan[name] = "ghost" if cheaper else "instantiate"
    return plan


# ---------------------------------------------------------------------------------------------
# Optimizers with CSPRNG noise (secure_mode)
# ---------------------------------------------------------------------------------------------


class _SecureNoiseMixin:
    """add_noise with `secure_gaussian_like_all` instead of Opacus' torch.normal: a fresh AES-256-CTR
    key from os.urandom per step, each coordinate Holohan & Braghin's sum of n = 2 ziggurat draws
    (rng.py). Never touches torch's generators (Opacus' secure mode without torchcsprng would use
    the global one)."""

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        noises = secure_gaussian_like_all([p.summed_grad for p in self.params], std)
        for p, noise in zip(self.params, noises, strict=True):
            p.grad = noise.add_(p.summed_grad).view_as(p)
            _mark_as_processed(p.summed_grad)


class SecureDPOptimizer(_SecureNoiseMixin, DPOptimizer):
    pass


class SecureDPOptimizerFastGradientClipping(_SecureNoiseMixin, DPOptimizerFastGradientClipping):
    pass


# ---------------------------------------------------------------------------------------------
# The private model
# ---------------------------------------------------------------------------------------------


class PerSampleLMLoss:
    """Criterion for DPLossFastGradientClipping: the mean next-token loss of each sample.

    Opacus sets `reduction = "none"` while it asks for per-sample losses; our per-sample loss is
    already a mean over the sample's own target tokens (lm_loss reduction="per_sample"), so
    every unit weighs the same whatever its length. "mean" averages those over the batch.
    """

    def __init__(self) -> None:
        self.reduction = "mean"

    def __call__(self, logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        per_sample_B = lm_loss(logits_BTV, targets_BT, reduction="per_sample")
        return per_sample_B if self.reduction == "none" else per_sample_B.mean()


@dataclass
class PrivateModel:
    """A model under Opacus for one round: grad-sample wrapper, DP optimizer, loss wrapper."""

    module: nn.Module | BookKeepingClipper
    optimizer: DPOptimizer
    mode: str
    criterion: DPLossFastGradientClipping | None
    plan: dict[str, NormMethod] = field(default_factory=dict)
    _model: nn.Module | None = None
    _handles: list[RemovableHandle] = field(default_factory=list)

    def backward(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Forward + backward of one physical batch; returns the per-sample losses [B] (detached)."""
        logits = self.module(inputs_BT)
        if isinstance(self.module, BookKeepingClipper):
            per_sample_B = lm_loss(logits, targets_BT, reduction="per_sample")
            self.module.clip_backward(per_sample_B)  # p.grad = sum_b c_b grad(loss_b)
            return per_sample_B.detach()
        if self.criterion is None:
            per_sample_B = lm_loss(logits, targets_BT, reduction="per_sample")
            per_sample_B.mean().backward()  # Opacus rescales backprops by B: per-sample grads of loss_b
            return per_sample_B.detach()
        loss = self.criterion(logits, targets_BT)
        loss.backward()  # two passes: norms, then sum_b c_b grad(loss_b)
        return loss.loss_per_sample.detach()

    def prepare_empty_batch(self) -> None:
        """An empty Poisson batch: zero contributions, so the step adds noise only."""
        for p in self.optimizer.params:
            if self.mode == "hooks":
                p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                p.grad = torch.zeros_like(p)

    def close(self) -> None:
        """Removes every hook and attribute Opacus or the plan added; leaves grads None."""
        self.module.cleanup()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        model = self._model
        assert model is not None
        for module in model.modules():
            for attr in (*_OPACUS_MODULE_ATTRS, *_OUR_MODULE_ATTRS):
                if attr in module.__dict__:
                    delattr(module, attr)
        for p in model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
            p.grad = None


def _base_optimizer(params: list[nn.Parameter], cfg: DPConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_private(
    model: nn.Module,
    cfg: DPConfig,
    *,
    noise_multiplier: float,
    seq_len: int,
    generator: torch.Generator | None,
) -> PrivateModel:
    """Wraps `model` for DP-SGD in cfg.grad_sample_mode; call `.close()` when the round ends.

    Args:
        model: the fedmoe model with its trainable view configured (checked by `check_model`).
        cfg: clip norm, expected batch size, mode, optimizer, secure_mode.
        noise_multiplier: sigma for this round.
        seq_len: tokens per sample (for the mixed plan).
        generator: the noise generator (None in secure_mode).

    Returns:
        The PrivateModel; its optimizer adds N(0, (sigma C)^2) to the sum of clipped per-sample
        gradients of every trainable coordinate and divides by expected_batch_size.
    """
    check_model(model, cfg)
    params = list(TrainableView(model).params.values())
    plan = plan_norm_methods(model, mode=cfg.grad_sample_mode, seq_len=seq_len)
    modules = dict(model.named_modules())
    for name, method in plan.items():
        setattr(modules[name], NORM_METHOD_ATTR, method)
    common = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.clip_norm,
        expected_batch_size=cfg.expected_batch_size,
        loss_reduction="mean",
        generator=generator,
        secure_mode=cfg.secure_mode,
    )
    # strict=False: Opacus' strict check refuses any trainable layer with buffers; check_model
    # has already allowed exactly the router's (frozen bias, restored load counter).
    fast_cls = SecureDPOptimizerFastGradientClipping if cfg.secure_mode else DPOptimizerFastGradientClipping
    criterion = None
    if cfg.grad_sample_mode == "hooks":
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        opt_cls = SecureDPOptimizer if cfg.secure_mode else DPOptimizer
        optimizer = opt_cls(_base_optimizer(params, cfg), **common)
    elif cfg.grad_sample_mode == "mixed":
        gsm = BookKeepingClipper(model, clip_norm=cfg.clip_norm)
        optimizer = fast_cls(_base_optimizer(params, cfg), **common)
    else:
        gsm = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="mean",
            strict=False,
            max_grad_norm=cfg.clip_norm,
            use_ghost_clipping=True,
        )
        optimizer = fast_cls(_base_optimizer(params, cfg), **common)
        criterion = DPLossFastGradientClipping(gsm, optimizer, PerSampleLMLoss(), loss_reduction="mean")
    if plan:
        logger.info("bank %s: per-sample norm plan %s", cfg.bank_id, plan)
    return PrivateModel(gsm, optimizer, cfg.grad_sample_mode, criterion, plan, model, stash_router_ids(model))
