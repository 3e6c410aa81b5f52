"""The job's trainable layout (names + shapes -> hash, element count), computed without weights.

The model is built on PyTorch's `meta` device: parameters have shapes and no storage, so the
server needs neither the base checkpoint's weights nor the memory to hold them (a base
checkpoint's `config.json` is enough). torch and `model` are imported here, inside the function,
so importing the server's round loop stays torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmoe.protocol.config import JobConfig
from fedmoe.protocol.errors import ConfigError


def trainable_layout(job: JobConfig) -> tuple[str, int]:
    """(layout hash, element count) of the job's trainable view: what every bundle must carry."""
    import torch

    from fedmoe.model.deepseek import DeepseekForCausalLM, ModelConfig, preset
    from fedmoe.model.lora import LoraConfig, configure_trainable
    from fedmoe.model.trainable import TrainableView

    if job.base_checkpoint:
        config_file = Path(job.base_checkpoint) / "config.json"
        if not config_file.exists():
            raise ConfigError(
                f"run config: 'base-checkpoint' {job.base_checkpoint!r}: the server needs its config.json "
                "(names and shapes only, never the weights) to check the banks' layout; not found"
            )
        config = ModelConfig.from_hf_dict(json.loads(config_file.read_text(encoding="utf-8")))
    else:
        config = preset(job.model_preset)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
        configure_trainable(model, job.train_mode, LoraConfig(rank=job.lora_rank, alpha=job.lora_alpha, seed=job.seed))
    view = TrainableView(model)
    return view.layout_hash, view.numel
