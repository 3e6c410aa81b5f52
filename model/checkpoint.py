"""Load and save HF-layout safetensors checkpoints of DeepSeek-V2/V3 models.

Two expert layouts exist on disk:
  per-expert (hub checkpoints, and what transformers 5 writes with save_pretrained):
      model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight   [F, D] / [D, F]
  fused (transformers 5 in memory, and some converted checkpoints):
      model.layers.{l}.mlp.experts.gate_up_proj  [E, 2F, D]   (gate rows first, then up)
      model.layers.{l}.mlp.experts.down_proj     [E, D, F]
Our model stores each bank as `...mlp.experts.gate_up_proj.weight` [E, 2F, D] and
`...mlp.experts.down_proj.weight` [E, D, F]; this module converts in both directions.
Sharded checkpoints have `model.safetensors.index.json` with a `weight_map`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.deepseek import DeepseekForCausalLM, ModelConfig
from model.errors import CheckpointError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (single file or sharded with an index)."""
    index = ckpt_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({err})") from None
        files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
    elif (ckpt_dir / SINGLE_FILE).exists():
        files = [ckpt_dir / SINGLE_FILE]
    else:
        files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt_dir}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors found")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{ckpt_dir / INDEX_FILE}: lists shard {f.name}, which does not exist")
    return files


def read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if key in tensors:
                        raise CheckpointError(f"{path}: key {key} appears in more than one shard")
                    tensors[key] = handle.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from None
    return tensors


def hf_to_internal(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Maps HF keys (either expert layout) to our state-dict keys; drops MTP layers."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in hf.items():
        if key.endswith("weight_scale_inv"):
            raise CheckpointError(f"{key}: fp8 block-quantized checkpoints are not supported; dequantize to bf16 first")
        layer = _LAYER.match(key)
        if layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue  # multi-token-prediction layers (num_nextn_predict_layers) are not used for fine-tuning
        if m := _PER_EXPERT.match(key):
            per_expert.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
        elif m := _FUSED.match(key):
            out[f"{m.group(1)}.{m.group(2)}.weight"] = tensor
        else:
            out[key] = tensor
    for prefix, experts in per_expert.items():
        expected = set(range(config.n_routed_experts))
        if set(experts) != expected:
            missing = sorted(expected - set(experts))[:5]
            extra = sorted(set(experts) - expected)[:5]
            raise CheckpointError(f"{prefix}: expert indices mismatch (missing {missing}, unexpected {extra})")
        for e, parts in experts.items():
            for part in ("gate_proj", "up_proj", "down_proj"):
                if part not in parts:
                    raise CheckpointError(f"missing key {prefix}.{e}.{part}.weight")
        out[f"{prefix}.gate_up_proj.weight"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in sorted(experts)]
        )
        out[f"{prefix}.down_proj.weight"] = torch.stack([experts[e]["down_proj"] for e in sorted(experts)])
    return out


def internal_to_hf(state: dict[str, torch.Tensor], layout: Literal["per_expert", "fused"]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)\.weight$", key)
        if not m:
            out[key] = tensor
        elif layout == "fused":
            out[f"{m.group(1)}.{m.group(2)}"] = tensor
        elif m.group(2) == "gate_up_proj":
            hidden = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = tensor[e, :hidden]
                out[f"{m.group(1)}.{e}.up_proj.weight"] = tensor[e, hidden:]
        else:
            for e in range(tensor.shape[0]):
                out[f"{m.group(1)}.{e}.down_proj.weight"] = tensor[e]
    return out


def base_state_dict(model: DeepseekForCausalLM) -> dict[str, torch.Tensor]:
    """The model's checkpoint tensors: parameters and persistent buffers, without LoRA factors."""
    state = model.state_dict()
    state = {k: v for k, v in state.items() if ".lora_" not in k}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_state_into(model: DeepseekForCausalLM, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Copies checkpoint tensors into the model; every key and shape must match."""
    expected = base_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    # A V3 checkpoint saved before any balancing may omit the correction bias; zeros is exact.
    missing = [k for k in missing if not k.endswith("e_score_correction_bias")]
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]} (and {len(missing) - 1} more)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]} (and {len(unexpected) - 1} more)")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        targets = dict(model.named_parameters()) | dict(model.named_buffers())
        for key, tensor in tensors.items():
            targets[key].copy_(tensor.to(targets[key].dtype))


def load_pretrained(
    ckpt_dir: str | Path, *, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None
) -> DeepseekForCausalLM:
    """Builds our model from an HF-format DeepSeek-V2/V3 checkpoint folder on local disk.

    Args:
        ckpt_dir: folder with config.json and model.safetensors (or shards + index).
        dtype: parameter dtype of the returned model (router weight and bias stay fp32).
        config: overrides the folder's config.json (e.g. a different bias_update_speed).

    Raises:
        CheckpointError / ModelError: missing files, missing or unexpected keys, shape mismatches.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint folder not found")
    config = config or ModelConfig.from_json_file(ckpt_dir / "config.json")
    files = checkpoint_files(ckpt_dir)
    tensors = hf_to_internal(read_safetensors(files), config)
    model = DeepseekForCausalLM(config).to(dtype)
    keep_router_fp32(model)  # before loading, so fp32 router values are not rounded through dtype
    load_state_into(model, tensors, source=str(ckpt_dir))
    logger.info("loaded %s (%d tensors from %d file(s))", ckpt_dir, len(tensors), len(files))
    return model


def keep_router_fp32(model: DeepseekForCausalLM) -> None:
    for router in model.routers():
        router.float()


def save_pretrained(
    model: DeepseekForCausalLM,
    out_dir: str | Path,
    *,
    layout: Literal["per_expert", "fused"] = "per_expert",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Writes config.json + safetensors (sharded with an index when over max_shard_bytes).

    Files go to a temporary folder beside out_dir and are renamed into place at the end, so a
    crash never leaves a half-written checkpoint.
    """
    out_dir = Path(out_dir)
    if layout not in ("per_expert", "fused"):
        raise CheckpointError(f"save_pretrained: layout must be 'per_expert' or 'fused', got {layout!r}")
    state = internal_to_hf(base_state_dict(model), layout)
    tensors = {}
    for key, tensor in state.items():
        t = tensor.detach()
        if dtype is not None and t.is_floating_point() and not _is_router_tensor(key):
            t = t.to(dtype)
        tensors[key] = t.contiguous().cpu()

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({key: name for key in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            _rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        _rmtree(tmp)
        raise
    logger.info("saved %s (%d tensors, %d shard(s), %s layout)", out_dir, len(tensors), len(shards), layout)
    return out_dir


def _is_router_tensor(key: str) -> bool:
    return key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias")


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
