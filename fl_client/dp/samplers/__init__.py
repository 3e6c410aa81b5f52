"""Opacus grad/norm samplers for fedmoe's layers; importing this package registers them all.

- expert.py    ExpertLinear / LoRAExpertLinear: stacked expert banks (segment matmuls, ghost norms)
- router.py    Router: the MoE gate weight (fp32 logits, top-k)
- rms_norm.py  RMSNorm: our class (Opacus' covers torch's nn.RMSNorm only)
- linear.py    nn.Linear / LoRALinear: per-layer ghost vs instantiated norms (mixed clipping)
nn.Embedding and nn.Linear grad samplers are Opacus' own.
"""

from fl_client.dp.samplers import expert, linear, rms_norm, router
from fl_client.dp.samplers.common import NORM_METHOD_ATTR, NORM_METHODS, NormMethod, ghost_is_cheaper

__all__ = ["NORM_METHODS", "NORM_METHOD_ATTR", "NormMethod", "expert", "ghost_is_cheaper", "linear", "rms_norm", "router"]
