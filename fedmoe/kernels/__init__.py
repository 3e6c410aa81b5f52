"""Tensor ops for MoE fine-tuning: each has a PyTorch reference (the spec) and a dispatcher.

Dispatchers take `backend="auto" | "reference" | "grouped_mm" | "triton"`; with "auto" the
FEDMOE_KERNELS environment variable (read at call time) may force one, e.g.
FEDMOE_KERNELS=reference. See fedmoe/kernels/backend.py.
"""

from fedmoe.kernels.backend import BACKENDS, Backend, choose_backend, env_backend
from fedmoe.kernels.errors import KernelError
from fedmoe.kernels.expert_gemm import expert_linear, expert_linear_reference
from fedmoe.kernels.per_sample import (
    expert_grad_norm2,
    expert_grad_norm2_bucketed,
    expert_grad_norm2_reference,
    expert_grad_sample,
    expert_grad_sample_reference,
    expert_weight_grad_clipped,
    expert_weight_grad_clipped_reference,
)
from fedmoe.kernels.permute import ExpertAlignment, align_by_expert, align_reference
from fedmoe.kernels.routing import RoutingSpec, combine_weights, route, route_reference, router_scores

__all__ = [
    "BACKENDS",
    "Backend",
    "ExpertAlignment",
    "KernelError",
    "RoutingSpec",
    "align_by_expert",
    "align_reference",
    "choose_backend",
    "combine_weights",
    "env_backend",
    "expert_grad_norm2",
    "expert_grad_norm2_bucketed",
    "expert_grad_norm2_reference",
    "expert_grad_sample",
    "expert_grad_sample_reference",
    "expert_linear",
    "expert_linear_reference",
    "expert_weight_grad_clipped",
    "expert_weight_grad_clipped_reference",
    "route",
    "route_reference",
    "router_scores",
]
