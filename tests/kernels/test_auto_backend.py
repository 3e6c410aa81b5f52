"""Auto dispatch never picks the Triton interpreter: it is for explicit requests only."""

import torch

from fedmoe.kernels import expert_linear
from fedmoe.kernels.backend import choose_backend, triton_interpreting


def test_auto_skips_interpreted_triton(monkeypatch):
    monkeypatch.delenv("FEDMOE_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_interpreting()
    # triton "qualifies" (None) but auto must still take the next path
    assert choose_backend("probe", "auto", {"triton": None, "grouped_mm": None}) == "grouped_mm"
    assert choose_backend("probe", "auto", {"triton": None}) == "reference"
    assert choose_backend("probe", "triton", {"triton": None}) == "triton"  # explicit still allowed
    x, w = torch.randn(5, 8), torch.randn(3, 4, 8)
    ids = torch.tensor([0, 2, 2, 1, 0])
    torch.testing.assert_close(expert_linear(x, ids, w), torch.stack([x[i] @ w[ids[i]].T for i in range(5)]))
