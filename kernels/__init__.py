"""Tensor ops for MoE fine-tuning: each has a PyTorch reference (the spec) and a dispatcher."""

from kernels.errors import KernelError
from kernels.expert_gemm import expert_linear, expert_linear_reference
from kernels.routing import RoutingSpec, route, route_reference

__all__ = [
    "KernelError",
    "RoutingSpec",
    "expert_linear",
    "expert_linear_reference",
    "route",
    "route_reference",
]
