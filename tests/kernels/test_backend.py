"""Backend choice: keyword > FEDMOE_KERNELS > auto; explicit requests that cannot run raise."""

from __future__ import annotations

import logging

import pytest
import torch

from fedmoe.kernels import KernelError, choose_backend
from fedmoe.kernels.backend import ENV_VAR, grouped_mm_reason, triton_reason

BOTH_OK = {"triton": None, "grouped_mm": None}


def test_auto_prefers_triton_then_grouped_mm_then_reference(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a GPU box: Triton qualifies for auto
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose_backend("op", "auto", BOTH_OK) == "triton"
    assert choose_backend("op", "auto", {"triton": "no", "grouped_mm": None}) == "grouped_mm"
    assert choose_backend("op", "auto", {"triton": "no", "grouped_mm": "no"}) == "reference"


def test_env_forces_reference_at_call_time(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a GPU box: Triton qualifies for auto
    monkeypatch.setenv(ENV_VAR, "reference")
    assert choose_backend("op", "auto", BOTH_OK) == "reference"
    monkeypatch.setenv(ENV_VAR, "auto")
    assert choose_backend("op", "auto", BOTH_OK) == "triton"


def test_keyword_beats_env(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "reference")
    assert choose_backend("op", "grouped_mm", BOTH_OK) == "grouped_mm"


def test_explicit_request_that_cannot_run_raises(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(KernelError, match="'triton' requested .* cannot run: no GPU"):
        choose_backend("op", "triton", {"triton": "no GPU"})
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(KernelError, match=f"{ENV_VAR}=triton"):
        choose_backend("op", "auto", {"triton": "no GPU"})


def test_grouped_mm_request_on_op_without_one_runs_reference(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "grouped_mm")
    assert choose_backend("op", "auto", {"triton": None}) == "reference"


def test_unknown_names_raise(monkeypatch) -> None:
    with pytest.raises(KernelError, match="backend expected one of"):
        choose_backend("op", "cuda", BOTH_OK)
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(KernelError, match=f"{ENV_VAR}: expected one of"):
        choose_backend("op", "auto", BOTH_OK)


def test_choice_is_logged_once(monkeypatch, caplog) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a GPU box: Triton qualifies for auto
    monkeypatch.delenv(ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="fedmoe.kernels.backend"):
        for _ in range(3):
            choose_backend("log_once_probe", "auto", BOTH_OK)
    assert [r.getMessage() for r in caplog.records].count(
        "fedmoe.kernels.log_once_probe: running the triton backend (auto)"
    ) == 1


def test_qualification_reasons(monkeypatch) -> None:
    x32 = torch.zeros(4, 8)
    assert "float64" in grouped_mm_reason(x32.double(), widths=(8,))
    assert "16 bytes" in grouped_mm_reason(x32, widths=(7,))
    assert grouped_mm_reason(x32, widths=(8, 12)) is None
    assert "contiguous" in (triton_reason(x32.t()) or "contiguous")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET" in (triton_reason(x32) or "")
