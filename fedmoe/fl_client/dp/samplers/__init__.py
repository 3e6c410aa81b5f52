"""Per-sample gradient samplers for fedmoe's layers; importing this package registers them all.

Opacus registries (keyed by layer class): grad samplers (per-sample gradients [B, ...]) and norm
samplers (per-sample norms [B]); ours (common.CLIPPED_SUM_SAMPLERS): clipped-sum samplers
(sum_b c_b G_b without per-sample tensors, for book-keeping).
- expert.py    ExpertLinear / LoRAExpertLinear: stacked expert banks (segment matmuls, ghost norms)
- router.py    Router: the MoE gate weight (fp32 logits, top-k)
- rms_norm.py  RMSNorm: our class (Opacus' covers torch's nn.RMSNorm only)
- linear.py    nn.Linear / LoRALinear: per-layer ghost vs instantiated norms; nn.Linear and
               nn.Embedding clipped sums
nn.Embedding and nn.Linear grad samplers (and the embedding norm sampler) are Opacus' own.
"""

from fedmoe.fl_client.dp.samplers import expert, linear, rms_norm, router
from fedmoe.fl_client.dp.samplers.common import (
    CLIPPED_SUM_SAMPLERS,
    NORM_METHOD_ATTR,
    NORM_METHODS,
    NormMethod,
    ghost_is_cheaper,
    register_clipped_sum_sampler,
)

__all__ = [
    "CLIPPED_SUM_SAMPLERS",
    "NORM_METHODS",
    "NORM_METHOD_ATTR",
    "NormMethod",
    "expert",
    "ghost_is_cheaper",
    "linear",
    "register_clipped_sum_sampler",
    "rms_norm",
    "router",
]
