"""Load and save HF-layout safetensors checkpoints of DeepSeek-V2/V3, Llama, Qwen2-MoE and Mixtral models.

Family key names are mapped to ours on the way in and back on the way out (`family_key`):
  Qwen2-MoE  mlp.shared_expert.*                 <-> mlp.shared_experts.*
  Mixtral    block_sparse_moe.gate               <-> mlp.gate
             block_sparse_moe.experts.{e}.w1/w3/w2 <-> mlp.experts.{e}.gate_proj/up_proj/down_proj
Llama and DeepSeek keys are ours already.

Two expert layouts exist on disk:
  per-expert (hub checkpoints, and what transformers 5 writes with save_pretrained):
      model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight   [F, D] / [D, F]
  fused (transformers 5 in memory, and some converted checkpoints):
      model.layers.{l}.mlp.experts.gate_up_proj  [E, 2F, D]   (gate rows first, then up)
      model.layers.{l}.mlp.experts.down_proj     [E, D, F]
Our model stores each bank as `...mlp.experts.gate_up_proj.weight` [E, 2F, D] and
`...mlp.experts.down_proj.weight` [E, D, F]; this module converts in both directions.
Sharded checkpoints have `model.safetensors.index.json` with a `weight_map`.

Loading checks everything it can from config.json and the safetensors headers before it reads a
single tensor (quantization, dtypes, layer count vs MTP layers, expert count, every key and
shape), then builds the model on the meta device and reads each tensor straight into the memory
it will live in: per-expert tensors land in their slice of the stacked bank, so peak memory is
about the model once in its own dtype plus one tensor (see bench/load_memory.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from fedmoe.model.deepseek import DeepseekForCausalLM, ModelConfig
from fedmoe.model.errors import CheckpointError, ModelError
from fedmoe.model.lora import base_state_dict, lora_modules, merged_state_dict
from fedmoe.protocol.files import atomic_write_json, atomic_write_with, fsync_dir, read_document

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PER_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_INTERNAL_BANK = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)\.weight$")
_MIXTRAL_NAMES = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))


def family_key(key: str, model_type: str, *, to_internal: bool) -> str:
    """A checkpoint key of a model family as our key (to_internal) or ours as the family's."""
    pairs: list[tuple[str, str]] = []
    if model_type == "qwen2_moe":
        pairs = [(".mlp.shared_expert.", ".mlp.shared_experts.")]
    elif model_type == "mixtral":
        pairs = [(f".{a}.weight", f".{b}.weight") for a, b in _MIXTRAL_NAMES if ".experts." in key]
        pairs.append((".block_sparse_moe.", ".mlp."))
    for theirs, ours in pairs:
        key = key.replace(theirs, ours) if to_internal else key.replace(ours, theirs)
    return key


# safetensors dtype names; the fp8 family is listed so it can be refused by name.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2")


# --------------------------------------------------------------------------------------------
# Reading: config, headers, plan, tensors
# --------------------------------------------------------------------------------------------


def read_config_dict(ckpt_dir: Path) -> dict[str, Any]:
    """config.json as a dict; refuses quantized checkpoints before any shard is opened."""
    path = ckpt_dir / "config.json"
    raw = read_document(path, CheckpointError, missing="config file not found")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        fmt = quant.get("fmt", "") if isinstance(quant, dict) else ""
        raise CheckpointError(
            f"{path}: quantization_config: expected none (bf16/fp16/fp32 weights), got quant_method={method!r}"
            f"{f' fmt={fmt!r}' if fmt else ''}; dequantize the checkpoint to bf16 first "
            "(e.g. DeepSeek-V3's inference/fp8_cast_bf16.py)"
        )
    return raw


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (single file or sharded with an index)."""
    index = ckpt_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                f"{index}: weight_map: expected an object of tensor key -> shard file name, "
                f"got {type(weight_map).__name__}"
            )
        files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
        unlisted = sorted({p.name for p in ckpt_dir.glob("*.safetensors")} - set(weight_map.values()))
        if unlisted:
            raise CheckpointError(
                f"{index}: weight_map: expected every shard in the folder, got no key for {unlisted[0]} "
                f"(shards listed: {sorted(set(weight_map.values()))})"
            )
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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and absolute byte range (from the header)."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses a safetensors header (8-byte little-endian length + JSON) without reading data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} exceeds file size {size}")
            header = json.loads(handle.read(n))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: {key}: corrupt header entry {entry!r}") from None
        if dtype_name in _QUANTIZED_DTYPES:
            raise CheckpointError(
                f"{path}: {key}: dtype {dtype_name} is a quantized format; expected BF16, F16 or F32 "
                "(dequantize the checkpoint first; its config.json should carry a quantization_config)"
            )
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{path}: {key}: unknown dtype {dtype_name!r}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype_name]
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if 0 <= begin <= end and end - begin == nbytes and base + end > size:
            raise CheckpointError(
                f"{path}: {key}: data ends at byte {base + end}, but the file has {size} bytes (truncated?)"
            )
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise CheckpointError(
                f"{path}: {key}: data_offsets [{begin}, {end}] hold {end - begin} bytes, expected {nbytes} "
                f"for {dtype_name} {list(shape)} within a {size}-byte file"
            )
        out[key] = TensorInfo(path, key, dtype, shape, base + begin, base + end)
    return out


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in files:
        for key, info in read_header(path).items():
            if key in infos:
                raise CheckpointError(f"{path}: key {key} also appears in {infos[key].file.name}")
            infos[key] = info
    return infos


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor and where it goes inside a model tensor: target[index] (None = whole)."""

    info: TensorInfo
    index: tuple[int, slice] | int | None = None


def _config_path(ckpt_dir: Path) -> Path:
    return ckpt_dir / "config.json"


def plan_load(
    infos: dict[str, TensorInfo],
    expected: dict[str, torch.Size],
    config: ModelConfig,
    raw: dict[str, Any],
    ckpt_dir: Path,
) -> dict[str, list[Part]]:
    """Maps every model tensor to the checkpoint tensors that fill it, checking all of it first.

    Raises CheckpointError naming the file, the key or config field, expected vs got for: layers
    beyond num_hidden_layers that are not MTP layers, an expert count that disagrees with
    n_routed_experts, missing experts, per-expert shapes, missing/unexpected keys (the correction
    bias under noaux_tc included), shapes and quantization scale tensors.
    """
    cfg_path = _config_path(ckpt_dir)
    n_layers = config.num_hidden_layers
    n_mtp = int(raw.get("num_nextn_predict_layers") or raw.get("num_mtp_layers") or 0)

    # ---- layers: the model's, the MTP ones (skipped), nothing else ----------------------------
    layers: dict[int, list[TensorInfo]] = {}
    for key, info in infos.items():
        if key.endswith("_scale_inv") or key.endswith("weight_scale") or key.endswith(".scales"):
            raise CheckpointError(
                f"{info.file}: {key}: quantization scale tensor; expected an unquantized (bf16/fp16/fp32) checkpoint"
            )
        if m := _LAYER.match(key):
            layers.setdefault(int(m.group(1)), []).append(info)
    beyond = sorted(i for i in layers if i >= n_layers + n_mtp)
    if beyond:
        example = layers[beyond[0]][0]
        last = max(layers)
        raise CheckpointError(
            f"{cfg_path}: num_hidden_layers={n_layers} (+ num_nextn_predict_layers={n_mtp} MTP) covers layers "
            f"0..{n_layers + n_mtp - 1}, but {example.file.name} has layer {beyond[0]} ({example.key}); "
            f"the checkpoint holds layers 0..{last}: expected num_hidden_layers={last + 1 - n_mtp}"
        )
    for i in range(n_layers, n_layers + n_mtp):
        if i in layers and not any(".eh_proj." in info.key for info in layers[i]):
            raise CheckpointError(
                f"{cfg_path}: layer {i} should be an MTP layer (num_hidden_layers={n_layers}, "
                f"num_nextn_predict_layers={n_mtp}) but has no eh_proj ({layers[i][0].key} in "
                f"{layers[i][0].file.name}): expected num_hidden_layers={i + 1}"
            )
    missing_layers = [i for i in range(n_layers) if i not in layers]
    if missing_layers:
        present = sorted(i for i in layers if i < n_layers)
        raise CheckpointError(
            f"{cfg_path}: num_hidden_layers={n_layers}, but the checkpoint has no tensors for layer "
            f"{missing_layers[0]} (layers present: {_ranges(present)}): expected num_hidden_layers={len(present)}"
        )

    plan: dict[str, list[Part]] = {}
    experts: dict[str, dict[int, dict[str, TensorInfo]]] = {}
    for key, info in infos.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) >= n_layers:
            continue  # MTP layers (num_nextn_predict_layers) are not used for fine-tuning
        if pe := _PER_EXPERT.match(key):
            experts.setdefault(pe.group(1), {}).setdefault(int(pe.group(3)), {})[pe.group(4)] = info
        elif fu := _FUSED.match(key):
            plan[f"{fu.group(1)}.{fu.group(2)}.weight"] = [Part(info)]
        else:
            plan[key] = [Part(info)]

    # ---- per-expert tensors -> slices of the stacked banks ------------------------------------
    E, F, D = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    for prefix, by_index in sorted(experts.items()):
        found = sorted(by_index)
        example = next(iter(by_index[found[0]].values()))
        layer = int(prefix.split(".")[2])
        if found == list(range(len(found))) and len(found) != E:
            raise CheckpointError(
                f"{cfg_path}: n_routed_experts={E}, but {example.file.name} has {len(found)} routed experts "
                f"(0..{len(found) - 1}) under {prefix}: expected n_routed_experts={len(found)}"
            )
        if not config.is_moe_layer(layer):
            raise CheckpointError(
                f"{cfg_path}: layer {layer} is dense by the config (first_k_dense_replace="
                f"{config.first_k_dense_replace}, moe_layer_freq={config.moe_layer_freq}), but "
                f"{example.file.name} has routed experts under {prefix}"
            )
        for e in range(E):
            for part in ("gate_proj", "up_proj", "down_proj"):
                if part not in by_index.get(e, {}):
                    raise CheckpointError(
                        f"{ckpt_dir}: missing key {prefix}.{e}.{part}.weight "
                        f"(experts present under {prefix}: {_ranges(found)}; n_routed_experts={E})"
                    )
        extra = [e for e in found if e >= E]
        if extra:
            info = next(iter(by_index[extra[0]].values()))
            raise CheckpointError(
                f"{info.file}: unexpected key {info.key}: expert {extra[0]} >= n_routed_experts={E} in {cfg_path}"
            )
        gate_up: list[Part] = []
        down: list[Part] = []
        for e in range(E):
            for part, want, index in (
                ("gate_proj", (F, D), (e, slice(0, F))),
                ("up_proj", (F, D), (e, slice(F, 2 * F))),
                ("down_proj", (D, F), e),
            ):
                info = by_index[e][part]
                if info.shape != want:
                    hint = " (transposed?)" if info.shape == want[::-1] else ""
                    raise CheckpointError(
                        f"{info.file}: shape mismatch for {info.key}: checkpoint {info.shape}, model expects "
                        f"{want}{hint} (config.json moe_intermediate_size={F}, hidden_size={D})"
                    )
                (down if part == "down_proj" else gate_up).append(Part(info, index))
        plan[f"{prefix}.gate_up_proj.weight"] = gate_up
        plan[f"{prefix}.down_proj.weight"] = down

    # ---- keys and shapes ----------------------------------------------------------------------
    missing = sorted(set(expected) - set(plan))
    for key in missing:
        if key.endswith("e_score_correction_bias"):
            raise CheckpointError(
                f"{ckpt_dir}: missing key {key}: {cfg_path.name} has topk_method='noaux_tc', which selects "
                f"experts with this correction bias (expected a float tensor of shape ({E},)); loading without "
                "it would route differently from the model that was saved"
            )
    if missing:
        raise CheckpointError(f"{ckpt_dir}: missing key {missing[0]} (and {len(missing) - 1} more)")
    unexpected = sorted(set(plan) - set(expected))
    if unexpected:
        info = plan[unexpected[0]][0].info
        raise CheckpointError(
            f"{info.file}: unexpected key {info.key} (and {len(unexpected) - 1} more) for the model "
            f"{cfg_path} describes"
        )
    for key, parts in plan.items():
        if len(parts) == 1 and parts[0].index is None:
            info = parts[0].info
            if info.shape != tuple(expected[key]):
                raise CheckpointError(
                    f"{info.file}: shape mismatch for {info.key}: checkpoint {info.shape}, "
                    f"model expects {tuple(expected[key])}"
                )
        for part in parts:
            if not part.info.dtype.is_floating_point:
                raise CheckpointError(
                    f"{part.info.file}: {part.info.key}: dtype {part.info.dtype}, expected a floating-point tensor"
                )
    return plan


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    out, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}..{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def _read_into(handle: Any, info: TensorInfo, out: torch.Tensor) -> None:
    """Reads one tensor's bytes into `out` (same dtype: no copy; else through one temp tensor)."""
    target = out if out.dtype == info.dtype else torch.empty(info.shape, dtype=info.dtype)
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    handle.seek(info.begin)
    done = 0
    while done < len(view):
        n = handle.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{info.file}: {info.key}: file ends before the tensor's last byte")
        done += n
    if target is not out:
        out.copy_(target.view(out.shape))


def _materialize(plan: dict[str, list[Part]], expected: dict[str, torch.Size], dtypes: dict[str, torch.dtype]):
    """Allocates each model tensor once in its final dtype and fills it from the checkpoint."""
    handles: dict[Path, Any] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        # File order, then offset order: sequential reads.
        order = sorted(plan, key=lambda k: (str(plan[k][0].info.file), plan[k][0].info.begin))
        for key in order:
            out = torch.empty(expected[key], dtype=dtypes[key])
            for part in plan[key]:
                info = part.info
                if info.file not in handles:
                    handles[info.file] = open(info.file, "rb", buffering=0)  # noqa: SIM115 (closed below)
                dest = out if part.index is None else out[part.index]
                _read_into(handles[info.file], info, dest.view(info.shape))
            state[key] = out
    finally:
        for handle in handles.values():
            handle.close()
    return state


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the given files, as stored (small files: adapters, tests)."""
    infos = read_headers(files)
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            for key, info in infos.items():
                if info.file == path:
                    out[key] = torch.empty(info.shape, dtype=info.dtype)
                    _read_into(handle, info, out[key])
    return out


def load_pretrained(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype | Literal["auto"] = torch.float32,
    config: ModelConfig | None = None,
) -> DeepseekForCausalLM:
    """Builds our model from an HF-format DeepSeek-V2/V3 checkpoint folder on local disk.

    Config and headers are validated first; the model is built on the meta device and each tensor
    is read straight into its final place (peak memory ~ the model in `dtype` + one tensor).

    Args:
        ckpt_dir: folder with config.json and model.safetensors (or shards + index).
        dtype: parameter dtype of the returned model (router weight and bias stay fp32);
            "auto" = the dtype most of the checkpoint's bytes are stored in.
        config: overrides the folder's config.json (e.g. a different bias_update_speed).

    Raises:
        CheckpointError: missing files; quantized checkpoints (refused from config.json, before any
            shard is read); a config field missing or disagreeing with the tensors (layers, MTP
            layers, experts); missing or unexpected keys, the correction bias under noaux_tc
            included; shape or dtype mismatches. Each names the file, key or field, expected vs got.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint folder not found")
    raw = read_config_dict(ckpt_dir)
    if config is None:
        try:
            config = ModelConfig.from_hf_dict(raw, source=str(_config_path(ckpt_dir)))
        except CheckpointError:
            raise
        except ModelError as err:
            raise CheckpointError(str(err)) from None
    files = checkpoint_files(ckpt_dir)
    infos = {family_key(k, config.model_type, to_internal=True): v for k, v in read_headers(files).items()}

    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    expected = {k: v.shape for k, v in base_state_dict(model).items()}
    plan = plan_load(infos, expected, config, raw, ckpt_dir)

    if dtype == "auto":
        dtype = _majority_dtype(infos)
    dtypes = {k: torch.float32 if _is_router_tensor(k) else dtype for k in expected}
    state = _materialize(plan, expected, dtypes)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_non_persistent_buffers_()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not still_meta, f"tensors left on the meta device: {still_meta[:3]}"
    logger.info("loaded %s (%d tensors from %d file(s))", ckpt_dir, len(infos), len(files))
    return model


def _majority_dtype(infos: dict[str, TensorInfo]) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for info in infos.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.end - info.begin
    return max(by_dtype, key=by_dtype.__getitem__)


def _majority_dtype_of(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for t in tensors.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.float32


def keep_router_fp32(model: DeepseekForCausalLM) -> None:
    for router in model.routers():
        router.float()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def internal_to_hf(state: dict[str, torch.Tensor], layout: Literal["per_expert", "fused"]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _INTERNAL_BANK.match(key)
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


@contextlib.contextmanager
def atomic_folder(out_dir: Path) -> Iterator[Path]:
    """Yields a temp folder beside out_dir; on success it replaces out_dir in one rename.

    Files inside are written with fedmoe.protocol.files (fsynced); the parent folder is fsynced after
    the swap, so a crash leaves the old folder or the whole new one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, written atomically (fedmoe.protocol.files)."""
    meta = {"format": "pt", **(metadata or {})}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def save_pretrained(
    model: DeepseekForCausalLM,
    out_dir: str | Path,
    *,
    layout: Literal["per_expert", "fused"] = "per_expert",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    merge_lora: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Writes config.json + safetensors (sharded with an index when over max_shard_bytes).

    The folder is built beside out_dir and renamed into place at the end, so a crash never
    leaves a half-written checkpoint.

    Args:
        model: the model; with LoRA adapters, `merge_lora=True` is required.
        layout: expert keys per expert (hub) or fused banks (transformers 5 in memory).
        dtype: cast floating tensors (router weight and bias stay as they are).
        merge_lora: fold every adapter into its base weight (W + scaling * B @ A) in the
            written tensors; the model itself is not changed.
        extra_files: name -> source file copied into the folder (e.g. tokenizer.json).

    Raises:
        CheckpointError: the model has LoRA adapters and merge_lora is False (writing the base
            weights alone would silently drop the fine-tuning), or a bad layout.
    """
    adapters = lora_modules(model)
    if adapters and not merge_lora:
        raise CheckpointError(
            f"save_pretrained({out_dir}): the model has LoRA adapters on {len(adapters)} modules "
            f"(e.g. {next(iter(adapters))}); saving would write the base weights without them. Pass "
            "merge_lora=True to fold them in, or write the adapter alone with fedmoe.model.export.export_adapter"
        )
    state = merged_state_dict(model) if adapters else base_state_dict(model)
    return write_checkpoint(
        model.config,
        state,
        out_dir,
        layout=layout,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        extra_files=extra_files,
    )


def write_checkpoint(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    layout: Literal["per_expert", "fused"] = "per_expert",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Writes exactly `state` (our keys) as an HF folder; save_pretrained decides what state is."""
    out_dir = Path(out_dir)
    if layout not in ("per_expert", "fused"):
        raise CheckpointError(f"save_pretrained: layout must be 'per_expert' or 'fused', got {layout!r}")
    if layout == "fused" and not config.model_type.startswith("deepseek"):
        raise CheckpointError(f"save_pretrained: layout 'fused' is for DeepSeek folders, got {config.model_type!r}")
    try:
        hf_config = config.to_hf_dict()
    except ModelError as err:
        raise CheckpointError(f"{out_dir}: {err}") from None
    tensors = {}
    for key, tensor in internal_to_hf(state, layout).items():
        t = tensor.detach()
        if dtype is not None and t.is_floating_point() and not _is_router_tensor(key):
            t = t.to(dtype)
        tensors[family_key(key, config.model_type, to_internal=False)] = t.contiguous().cpu()
    hf_config["dtype"] = str(_majority_dtype_of(tensors)).removeprefix("torch.")  # a bf16 folder loads as bf16

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes

    with atomic_folder(out_dir) as tmp:
        atomic_write_json(tmp / "config.json", hf_config)
        if len(shards) == 1:
            write_safetensors(tmp / SINGLE_FILE, shards[0])
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / name, shard)
                weight_map.update({key: name for key in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        for name, source in (extra_files or {}).items():
            atomic_write_with(tmp / name, lambda dest, source=source: shutil.copyfile(source, dest))
    logger.info("saved %s (%d tensors, %d shard(s), %s layout)", out_dir, len(tensors), len(shards), layout)
    return out_dir


def _is_router_tensor(key: str) -> bool:
    return key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias")
