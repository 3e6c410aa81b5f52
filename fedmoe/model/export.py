"""Getting a fine-tuned model out: merged HF folders, PEFT adapters, and loading them back.

Three forms of one fine-tuned model (a LoRA-wrapped DeepseekForCausalLM, see fedmoe.model.lora):
  merged/   an HF DeepSeek folder with every adapter folded in (W + alpha/r * B @ A); any
            transformers from 4.57 on reads it with the adapted logits (config carries both
            `rope_parameters` and the hub's `rope_scaling` + `rope_theta`).
  adapter/  PEFT's format for what PEFT can express (LoRA on nn.Linear: attention projections,
            shared experts, dense MLPs):
              adapter_config.json            peft_type LORA, r, lora_alpha, target_modules
              adapter_model.safetensors      base_model.model.<module>.lora_{A,B}.weight
            plus the stacked expert adapters, which PEFT cannot address inside a fused bank:
              expert_adapters.safetensors    <layer>.mlp.experts.{gate_up_proj,down_proj}.lora_A.weight
                                             [E, r, in] and .lora_B.weight [E, out, r]; expert e's
                                             update is alpha/r * B[e] @ A[e]; gate_up rows [0, F)
                                             are gate_proj, [F, 2F) up_proj (the merged folder
                                             splits them so)
              fedmoe_lora.json               rank, alpha, targets, seed, file names
  base/     the base weights alone (export_base), when the base is not a folder already (presets).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from fedmoe.model.checkpoint import (
    atomic_folder,
    base_state_dict,
    load_pretrained,
    read_safetensors,
    save_pretrained,
    write_checkpoint,
    write_safetensors,
)
from fedmoe.model.deepseek import DeepseekForCausalLM
from fedmoe.model.errors import CheckpointError
from fedmoe.model.lora import ALL_TARGETS, LoraConfig, LoRAExpertLinear, LoRALinear, apply_lora, lora_modules
from fedmoe.protocol.files import atomic_write_json

logger = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
EXPERT_WEIGHTS = "expert_adapters.safetensors"
FEDMOE_LORA = "fedmoe_lora.json"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tokenizer_files(folder: str | Path | None) -> dict[str, Path]:
    """The tokenizer files present in a folder (copied next to an exported model)."""
    if folder is None:
        return {}
    return {name: Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).exists()}


def export_merged(
    model: DeepseekForCausalLM,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    layout: Literal["per_expert", "fused"] = "per_expert",
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Writes the model with its adapters merged as an HF folder (the model is not changed).

    Args:
        model: a DeepseekForCausalLM, LoRA-wrapped or not.
        out_dir: the folder to write (replaced atomically).
        dtype: e.g. torch.bfloat16 for a half-size folder (merge is computed in fp32 first).
        layout: "per_expert" (hub keys; what transformers 4.x needs) or "fused".
        tokenizer_dir: copy tokenizer.json & co from here (the base checkpoint's folder).
    """
    return save_pretrained(
        model, out_dir, layout=layout, dtype=dtype, merge_lora=True, extra_files=tokenizer_files(tokenizer_dir)
    )


def export_base(
    model: DeepseekForCausalLM,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Writes the base weights only, explicitly (adapters go through export_adapter)."""
    return write_checkpoint(
        model.config, base_state_dict(model), out_dir, dtype=dtype, extra_files=tokenizer_files(tokenizer_dir)
    )


def _lora_shape(model: DeepseekForCausalLM) -> tuple[int, float]:
    """(rank, alpha) shared by every adapter of the model."""
    modules = lora_modules(model)
    if not modules:
        raise CheckpointError("export_adapter: the model has no LoRA adapters (train mode is not 'lora')")
    shapes = set()
    for m in modules.values():
        rank = m.lora_A.weight.shape[-2]
        shapes.add((rank, m.scaling * rank))
    if len(shapes) != 1:
        raise CheckpointError(f"export_adapter: adapters differ in (rank, alpha): {sorted(shapes)}")
    return shapes.pop()


def _short_target(name: str) -> str:
    """Module name -> the LoraConfig target that wraps it."""
    parts = name.split(".")
    if parts[-2] == "experts":
        return "experts"
    if parts[-2] == "shared_experts":
        return "shared_experts"
    if parts[-2] == "mlp":
        return "mlp"
    return parts[-1]


def peft_would_drop(model: DeepseekForCausalLM, module_name: str) -> bool:
    """Whether PEFT (0.21, transformers 5) would silently skip a LoRA on this nn.Linear.

    For MoE model types transformers 5 fuses the routed experts, and PEFT remaps every target whose
    name ends in gate_proj/up_proj/down_proj onto the fused expert parameters: an adapter on a
    shared expert or a dense MLP projection is then never applied (measured: the PEFT model's
    logits equal the base's). Dense models (Llama) are not converted.
    """
    return model.config.has_moe and module_name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")


def export_adapter(
    model: DeepseekForCausalLM,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | Path | None = None,
    seed: int | None = None,
) -> Path:
    """Writes the adapters alone: PEFT format for linear layers, a companion file for expert banks.

    Args:
        model: a LoRA-wrapped DeepseekForCausalLM (fedmoe.model.lora.configure_trainable(..., "lora")).
        out_dir: the folder to write (replaced atomically).
        base_model_name_or_path: recorded in adapter_config.json (where the base folder is).
        seed: the job seed that drew the frozen A factors, recorded for reference.

    Raises:
        CheckpointError: the model has no adapters, or adapters of different rank/alpha.
    """
    rank, alpha = _lora_shape(model)
    modules = lora_modules(model)
    linear = {n: m for n, m in modules.items() if isinstance(m, LoRALinear)}
    experts = {n: m for n, m in modules.items() if isinstance(m, LoRAExpertLinear)}
    peft_linear = {n: m for n, m in linear.items() if not peft_would_drop(model, n)}
    peft_tensors = {
        f"{PEFT_PREFIX}{n}.lora_{f}.weight": getattr(m, f"lora_{f}").weight.detach().float().contiguous()
        for n, m in peft_linear.items()
        for f in "AB"
    }
    companion = {n: m for n, m in modules.items() if n not in peft_linear}
    expert_tensors = {
        f"{n}.lora_{f}.weight": getattr(m, f"lora_{f}").weight.detach().float().contiguous()
        for n, m in companion.items()
        for f in "AB"
    }
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path) if base_model_name_or_path else None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        # Exact module names: unambiguous for PEFT's matcher whatever other layers share a suffix.
        "target_modules": sorted(peft_linear),
    }
    fedmoe = {
        "format": "fedmoe-lora/1",
        "rank": rank,
        "alpha": alpha,
        "targets": sorted({_short_target(n) for n in modules}),
        "seed": seed,
        "peft_weights": PEFT_WEIGHTS if peft_linear else None,
        "expert_weights": EXPERT_WEIGHTS if companion else None,
        "expert_modules": sorted(experts),
        "linear_modules": sorted(linear),
        # FFN projections of an MoE model: PEFT 0.21 under transformers 5 takes every target named
        # *.gate_proj/up_proj/down_proj for a routed-expert weight and drops it, so they live here.
        "linear_modules_outside_peft": sorted(set(linear) - set(peft_linear)),
        "expert_update": "W[e] += (alpha / rank) * lora_B[e] @ lora_A[e]; gate_up_proj rows [0, F) are "
        "gate_proj, rows [F, 2F) are up_proj",
    }
    with atomic_folder(Path(out_dir)) as tmp:
        if peft_linear:
            atomic_write_json(tmp / PEFT_CONFIG, peft_config)
            write_safetensors(tmp / PEFT_WEIGHTS, peft_tensors)
        if companion:
            meta = {"rank": str(rank), "alpha": str(alpha), "layout": "stacked [E, out, in]"}
            write_safetensors(tmp / EXPERT_WEIGHTS, expert_tensors, metadata=meta)
        atomic_write_json(tmp / FEDMOE_LORA, fedmoe)
    logger.info("adapter: %d linear (PEFT) + %d expert-bank modules -> %s", len(linear), len(experts), out_dir)
    return Path(out_dir)


def load_adapter(model: DeepseekForCausalLM, adapter_dir: str | Path) -> DeepseekForCausalLM:
    """Wraps the model's layers with the adapters in `adapter_dir` (export_adapter's or PEFT's).

    Raises:
        CheckpointError: no adapter files; adapter modules that are not in this model; missing,
            unexpected or mis-shaped adapter tensors.
    """
    adapter_dir = Path(adapter_dir)
    fedmoe_path, peft_path = adapter_dir / FEDMOE_LORA, adapter_dir / PEFT_CONFIG
    if fedmoe_path.exists():
        meta = json.loads(fedmoe_path.read_text(encoding="utf-8"))
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
        wanted = set(meta["linear_modules"]) | set(meta["expert_modules"])
    elif peft_path.exists():
        meta = json.loads(peft_path.read_text(encoding="utf-8"))
        if meta.get("peft_type") != "LORA":
            raise CheckpointError(f"{peft_path}: peft_type: expected 'LORA', got {meta.get('peft_type')!r}")
        rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
        targets = meta["target_modules"]
        names = {n for n, _ in model.named_modules()}
        wanted = {t for t in targets if t in names} if isinstance(targets, list) else set()
        if not wanted:
            raise CheckpointError(f"{peft_path}: target_modules {targets!r}: expected exact module names of this model")
    else:
        raise CheckpointError(f"{adapter_dir}: no {FEDMOE_LORA} or {PEFT_CONFIG} found")

    targets = tuple(sorted({_short_target(n) for n in wanted}))
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise CheckpointError(f"{adapter_dir}: adapter modules of unknown kind {unknown}")
    apply_lora(model, LoraConfig(rank=rank, alpha=alpha, targets=targets))
    wrapped = set(lora_modules(model))
    if wrapped != wanted:  # e.g. a target kind present in the adapter for only some layers
        diff = sorted(wrapped ^ wanted)[:3]
        raise CheckpointError(f"{adapter_dir}: adapter modules do not match this model's layers (differ: {diff})")

    tensors: dict[str, torch.Tensor] = {}
    for name in (PEFT_WEIGHTS, EXPERT_WEIGHTS):
        if (adapter_dir / name).exists():
            for key, t in read_safetensors([adapter_dir / name]).items():
                tensors[key.removeprefix(PEFT_PREFIX)] = t
    params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"{adapter_dir}: adapter tensors do not match: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for key, t in tensors.items():
            if t.shape != params[key].shape:
                raise CheckpointError(
                    f"{adapter_dir}: shape mismatch for {key}: adapter {tuple(t.shape)}, "
                    f"model expects {tuple(params[key].shape)}"
                )
            params[key].copy_(t)
    model.requires_grad_(False)
    return model


def load_trainable(model: torch.nn.Module, path: str | Path) -> None:
    """Loads a named-tensor file of trainable parameters (a bank's replica.safetensors) into model.

    Every tensor in the file must name a parameter of the model, with its shape.
    """
    path = Path(path)
    tensors = read_safetensors([path])
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise CheckpointError(f"{path}: unexpected key {unknown[0]} (and {len(unknown) - 1} more) for this model")
    with torch.no_grad():
        for key, t in tensors.items():
            if t.shape != params[key].shape:
                raise CheckpointError(
                    f"{path}: shape mismatch for {key}: file {tuple(t.shape)}, model expects {tuple(params[key].shape)}"
                )
            params[key].copy_(t)


def load_model(
    model_dir: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    dtype: torch.dtype | Literal["auto"] = torch.float32,
) -> DeepseekForCausalLM:
    """A folder (base or merged), optionally with an adapter folder on top, in eval mode."""
    model = load_pretrained(model_dir, dtype=dtype)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model.eval()


def export_job(
    model: DeepseekForCausalLM,
    out_dir: str | Path,
    *,
    base_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> dict[str, Path]:
    """Writes a fine-tuned model in every form: out_dir/merged, out_dir/adapter (LoRA only), and
    out_dir/base when the base is not a folder already (a preset built from a seed).

    Returns the folders written, by form.
    """
    out_dir = Path(out_dir)
    written = {"merged": export_merged(model, out_dir / "merged", dtype=dtype, tokenizer_dir=base_dir)}
    if lora_modules(model):
        base = base_dir
        if base is None:
            base = written["base"] = export_base(model, out_dir / "base", dtype=dtype)
        written["adapter"] = export_adapter(model, out_dir / "adapter", base_model_name_or_path=base, seed=seed)
    return written


def greedy_continuations(
    model: DeepseekForCausalLM, prompts_ids: list[list[int]], max_new_tokens: int, eos_id: int | None
) -> list[list[int]]:
    """Our greedy decoding (KV cache) of each prompt, the new tokens cut before the first eos."""
    from fedmoe.model.generate import SamplingConfig, generate

    cfg = SamplingConfig(max_new_tokens=max_new_tokens, eos_id=eos_id)
    out = []
    with torch.no_grad():
        for ids in prompts_ids:
            new = generate(model.eval(), torch.tensor([ids]), cfg).tokens_BN[0].tolist()
            out.append(new[: new.index(eos_id)] if eos_id in new else new)
    return out


def transformers_greedy(
    folder: str | Path, prompts_ids: list[list[int]], max_new_tokens: int, eos_id: int | None
) -> tuple[str, list[list[int]]]:
    """An exported folder read back by transformers (`AutoModelForCausalLM`, float32) and decoded greedily.

    Returns:
        (the class transformers chose, e.g. "Qwen2MoeForCausalLM"; per prompt its new tokens, cut
        before the first eos) to hold against `greedy_continuations` of our model.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would fill the demo's console
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts_ids:
            prompt = torch.tensor([ids])
            full = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_id,
                pad_token_id=eos_id,
            )
            new = full[0, prompt.shape[1] :].tolist()
            out.append(new[: new.index(eos_id)] if eos_id in new else new)
    name = type(hf).__name__
    del hf
    return name, out
