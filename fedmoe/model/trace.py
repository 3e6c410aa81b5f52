"""Which experts did what: per layer and token, the experts chosen and their combine weights.

`ExpertTracer` hooks every Router (forward hooks, removed on exit; the model is not changed) and
streams one JSONL line per (sequence, position, layer):

    {"seq": 0, "pos": 5, "token": 104, "text": " payment", "layer": 1, "experts": [3, 6], "weights": [0.71, 0.29]}

`experts` are sorted by weight, largest first; `weights` are the combine weights the MoE layer
multiplies the expert outputs by (after normalization and routed_scaling_factor). `text` is the
token decoded alone (present when the tracer is given a `decode` function). It also keeps
per-layer counts and weight sums, written as a summary JSON and drawn as a PNG heatmap of the
load per layer (rows) and expert (columns), as a share of the layer's (token, slot) pairs.

Shape legend: B batch, T tokens fed in one forward, K experts per token, L MoE layers, E experts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import torch

from fedmoe.model.deepseek import DeepseekForCausalLM, Router
from fedmoe.protocol.files import atomic_write_json, atomic_write_with

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class ExpertTracer:
    """Context manager recording routing decisions of every MoE layer.

    Args:
        model: the LM whose routers to trace.
        jsonl_path: where to stream per-token lines (None: counts only, no per-token file).
        decode: token id -> text (e.g. `lambda i: tokenizer.decode([i])`), written beside the id.

    Call `set_context(ids_BT, start, seq_offset)` before each forward so lines carry the token
    ids and positions (fedmoe.model.generate's `on_forward` hook fits); without it positions count
    from 0 per forward and tokens are null. `set_context(..., valid_BT=mask)` leaves the masked-out
    positions (right padding of a batch) out of the counts and the lines.
    """

    def __init__(
        self,
        model: DeepseekForCausalLM,
        jsonl_path: str | Path | None = None,
        *,
        decode: Callable[[int], str] | None = None,
    ) -> None:
        self.model = model
        self._decode = decode
        self.layers: list[int] = []
        self._routers: list[Router] = []
        for name, module in model.named_modules():
            if isinstance(module, Router):
                m = _LAYER.match(name)
                assert m, f"router outside a decoder layer: {name}"
                self.layers.append(int(m.group(1)))
                self._routers.append(module)
        E = model.config.n_routed_experts
        self.counts_LE = torch.zeros(len(self.layers), E, dtype=torch.int64)
        self.weight_sums_LE = torch.zeros(len(self.layers), E, dtype=torch.float64)
        self.tokens = 0  # tokens seen by the first MoE layer
        self._jsonl_path = Path(jsonl_path) if jsonl_path is not None else None
        self._out: IO[str] | None = None
        self._hooks: list[Any] = []
        self._ids: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._start = 0
        self._seq_offset = 0

    def set_context(
        self, ids_BT: torch.Tensor, start: int, seq_offset: int = 0, valid_BT: torch.Tensor | None = None
    ) -> None:
        """The ids about to be fed, the position of their first column, the batch's first seq index,
        and optionally which positions count (bool, same shape: False = padding)."""
        self._ids, self._start, self._seq_offset = ids_BT.detach().cpu(), start, seq_offset
        self._valid = valid_BT.detach().cpu().bool() if valid_BT is not None else None

    def __enter__(self) -> ExpertTracer:
        if self._jsonl_path is not None:
            self._jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self._jsonl_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        for idx, router in enumerate(self._routers):
            self._hooks.append(router.register_forward_hook(self._make_hook(idx)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._out is not None:
            self._out.close()
            self._out = None

    def _make_hook(self, idx: int):
        layer = self.layers[idx]

        def hook(module: Router, inputs: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
            weights_BTK, ids_BTK = (t.detach().cpu() for t in output)
            valid_BT = self._valid_mask(ids_BTK.shape[:2])
            ids_NK, weights_NK = ids_BTK[valid_BT], weights_BTK[valid_BT]  # N = counted (token) positions
            E = self.counts_LE.shape[1]
            self.counts_LE[idx] += torch.bincount(ids_NK.reshape(-1), minlength=E)
            self.weight_sums_LE[idx].index_add_(0, ids_NK.reshape(-1), weights_NK.reshape(-1).double())
            if idx == 0:
                self.tokens += ids_NK.shape[0]
            if self._out is None:
                return
            self._write_lines(layer, weights_BTK, ids_BTK, valid_BT)

        return hook

    def _valid_mask(self, shape_BT: torch.Size) -> torch.Tensor:
        if self._valid is None:
            return torch.ones(shape_BT, dtype=torch.bool)
        if tuple(self._valid.shape) != tuple(shape_BT):
            raise ValueError(f"ExpertTracer: valid mask {tuple(self._valid.shape)}, routed batch {tuple(shape_BT)}")
        return self._valid

    def _write_lines(
        self, layer: int, weights_BTK: torch.Tensor, ids_BTK: torch.Tensor, valid_BT: torch.Tensor
    ) -> None:
        assert self._out is not None
        B, T, _ = ids_BTK.shape
        tokens = self._ids if self._ids is not None and tuple(self._ids.shape) == (B, T) else None
        order_BTK = weights_BTK.float().argsort(dim=-1, descending=True, stable=True)
        ids_BTK, weights_BTK = ids_BTK.gather(-1, order_BTK), weights_BTK.float().gather(-1, order_BTK)
        lines = []
        for b in range(B):
            for t in range(T):
                if not valid_BT[b, t]:
                    continue
                token = int(tokens[b, t]) if tokens is not None else None
                line = {"seq": self._seq_offset + b, "pos": self._start + t, "token": token}
                if self._decode is not None and token is not None:
                    line["text"] = self._decode(token)
                line.update(
                    layer=layer,
                    experts=ids_BTK[b, t].tolist(),
                    weights=[round(w, 6) for w in weights_BTK[b, t].tolist()],
                )
                lines.append(json.dumps(line, separators=(",", ":"), ensure_ascii=False))
        self._out.write("\n".join(lines) + "\n")

    # ---- summaries -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Per MoE layer: per-expert (token, slot) counts, load share, mean weight, max/mean load."""
        layers = []
        for idx, layer in enumerate(self.layers):
            counts = self.counts_LE[idx]
            total = int(counts.sum())
            mean = total / max(len(counts), 1)
            layers.append(
                {
                    "layer": layer,
                    "pairs": total,
                    "counts": counts.tolist(),
                    "share": [round(c / total, 6) if total else 0.0 for c in counts.tolist()],
                    "mean_weight": [
                        round(w / c, 6) if c else 0.0
                        for w, c in zip(self.weight_sums_LE[idx].tolist(), counts.tolist(), strict=True)
                    ],
                    "max_over_mean_load": round(float(counts.max()) / mean, 4) if mean else 0.0,
                    "unused_experts": int((counts == 0).sum()),
                }
            )
        return {
            "tokens": self.tokens,
            "experts_per_token": self.model.config.num_experts_per_tok,
            "n_routed_experts": self.model.config.n_routed_experts,
            "layers": layers,
        }

    def write_summary(self, path: str | Path) -> Path:
        return atomic_write_json(Path(path), self.summary())

    def write_heatmap(self, path: str | Path, *, title: str = "expert load") -> Path:
        """PNG: rows = MoE layers, columns = experts, colour = share of the layer's pairs."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        counts = self.counts_LE.double()
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        L, E = share.shape
        fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * E + 2), max(2.5, 0.3 * L + 1.5)))
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(L), [str(layer) for layer in self.layers])
        ax.set_title(f"{title} ({self.tokens} tokens, uniform = {1 / E:.3f})")
        fig.colorbar(im, ax=ax, label="share of (token, slot) pairs")
        fig.tight_layout()
        atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)
        return Path(path)


def write_heatmap_pair(before: ExpertTracer, after: ExpertTracer, path: str | Path, *, title: str = "") -> Path:
    """PNG: the expert load of the same records before and after fine-tuning, side by side, and
    their difference (rows = MoE layers, columns = experts, colour = share of the layer's pairs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if before.layers != after.layers or before.counts_LE.shape != after.counts_LE.shape:
        raise ValueError(f"write_heatmap_pair: layers differ: {before.layers} vs {after.layers}")
    shares = [t.counts_LE.double() / t.counts_LE.sum(dim=1, keepdim=True).clamp(min=1) for t in (before, after)]
    L, E = shares[0].shape
    fig, axes = plt.subplots(1, 3, figsize=(3 * max(3.0, 0.25 * E + 1.5), max(2.5, 0.3 * L + 1.5)))
    diff = shares[1] - shares[0]
    limit = float(diff.abs().max()) or 1.0
    panels = (
        (f"before ({before.tokens} tokens)", shares[0], "viridis", {"vmin": 0.0}),
        (f"after ({after.tokens} tokens)", shares[1], "viridis", {"vmin": 0.0}),
        ("after - before", diff, "coolwarm", {"vmin": -limit, "vmax": limit}),
    )
    for ax, (name, data, cmap, scale) in zip(axes, panels, strict=True):
        im = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, interpolation="nearest", **scale)
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_yticks(range(L), [str(layer) for layer in before.layers])
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
