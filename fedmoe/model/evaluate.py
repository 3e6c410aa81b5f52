"""Perplexity of a model on a text or JSONL file (FlowerTune-style post-training evaluation).

The texts are tokenized, joined with EOS into one stream and cut into windows of seq_len + 1
tokens that overlap by one, so every token after the first is predicted exactly once, with up
to seq_len tokens of context. Perplexity = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedmoe.model.deepseek import DeepseekForCausalLM
from fedmoe.model.errors import ModelError
from fedmoe.model.tokenizer import Tokenizer


def load_texts(path: str | Path, *, field: str = "text") -> list[str]:
    """A .jsonl file's `field` per line, or a plain text file as one text.

    Raises:
        ModelError: missing file, invalid JSON, or a line without a string `field` (file:line).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: evaluation file not found")
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ModelError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            got = type(record.get(field)).__name__ if isinstance(record, dict) else type(record).__name__
            raise ModelError(f"{path}:{lineno}: expected an object with a string {field!r} field, got {got}")
        texts.append(record[field])
    if not texts:
        raise ModelError(f"{path}: no records")
    return texts


def token_windows(texts: list[str], tokenizer: Tokenizer, seq_len: int) -> list[torch.Tensor]:
    """The joined token stream cut into windows of <= seq_len + 1 tokens overlapping by one."""
    if seq_len < 1:
        raise ModelError(f"seq_len: expected >= 1, got {seq_len}")
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_id)
    windows = []
    for start in range(0, max(len(stream) - 1, 0), seq_len):
        windows.append(torch.tensor(stream[start : start + seq_len + 1]))
    return windows


@dataclass
class EvalResult:
    nll: float  # total negative log-likelihood (nats)
    tokens: int  # predicted tokens
    seconds: float

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def perplexity(
    model: DeepseekForCausalLM,
    windows: list[torch.Tensor],
    *,
    batch_size: int = 8,
    on_forward: Callable[[torch.Tensor, int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Summed next-token NLL over the windows (model in eval mode, batches of equal length).

    Args:
        on_forward: called before each forward with (input ids, index of the batch's first
            window): the expert tracer labels its lines with it.
        on_progress: called after each batch with the number of windows done (progress bars).
    """
    if model.training:
        raise ModelError("perplexity: put the model in eval mode first (model.eval())")
    device = model.model.embed_tokens.weight.device
    nll, count = 0.0, 0
    started = time.perf_counter()
    # Windows of one length batch together (all but possibly the last have the same length).
    i = 0
    while i < len(windows):
        j = i
        while j < len(windows) and j - i < batch_size and len(windows[j]) == len(windows[i]):
            j += 1
        batch = torch.stack(windows[i:j]).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if on_forward is not None:
            on_forward(inputs, i)
        logits = model(inputs)
        nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        i = j
        if on_progress is not None:
            on_progress(i)
    return EvalResult(nll=nll, tokens=count, seconds=time.perf_counter() - started)
