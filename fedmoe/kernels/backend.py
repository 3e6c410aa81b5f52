"""Which implementation of a kernel op runs: the one small place that decides.

Every dispatcher takes `backend: "auto" | "reference" | "grouped_mm" | "triton"`.
    explicit keyword (anything but "auto")  >  FEDMOE_KERNELS env var (read at call time)  >  auto
Auto picks the first that qualifies of triton (CUDA tensors, triton importable, fp32/bf16/fp16,
contiguous), grouped_mm (torch's grouped GEMM: CPU fp32/bf16/fp16 or CUDA bf16, 16-byte aligned
widths) and reference (plain PyTorch, always qualifies). An explicit request that does not
qualify raises `KernelError` with the reason instead of silently running something else. Ops that
have no grouped_mm path (routing, permute) run their reference for a grouped_mm request: both are
plain PyTorch. The first use of each (op, backend) is logged.

Triton on CPU tensors is only possible under the Triton interpreter (`TRITON_INTERPRET=1`, set
before the kernel modules are imported); auto never picks it, an explicit request may (tests do).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Literal

import torch

from fedmoe.kernels.errors import KernelError

Backend = Literal["auto", "reference", "grouped_mm", "triton"]
BACKENDS: tuple[str, ...] = ("reference", "grouped_mm", "triton")
ENV_VAR = "FEDMOE_KERNELS"
_AUTO_ORDER = ("triton", "grouped_mm", "reference")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

logger = logging.getLogger(__name__)


def env_backend() -> str | None:
    """The backend named by FEDMOE_KERNELS right now, or None when unset/empty/"auto"."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise KernelError(f"{ENV_VAR}: expected one of {('auto',) + BACKENDS}, got {value!r}")
    return value


def triton_interpreting() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_reason(*tensors: torch.Tensor) -> str | None:
    """Why the Triton path cannot take these tensors, or None if it can."""
    if not triton_importable():
        return "triton is not installed"
    device = tensors[0].device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
    elif device.type == "cpu":
        if not triton_interpreting():
            return "tensors are on CPU and TRITON_INTERPRET=1 is not set (Triton needs CUDA)"
    else:
        return f"device {device} is neither cuda nor cpu"
    for t in tensors:
        if t.device != device:
            return f"tensors on mixed devices ({device} and {t.device})"
        if t.is_floating_point() and t.dtype not in _TRITON_DTYPES:
            return f"dtype {t.dtype} (expected float32, bfloat16 or float16)"
        if not t.is_contiguous():
            return f"a tensor of shape {tuple(t.shape)} is not contiguous"
    return None


def grouped_mm_reason(*tensors: torch.Tensor, widths: tuple[int, ...] = ()) -> str | None:
    """Why torch's grouped_mm cannot take these float tensors / matrix widths, or None if it can."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    device = tensors[0].device
    dtype = tensors[0].dtype
    for t in tensors:
        if t.device != device or t.dtype != dtype:
            return f"mixed devices/dtypes ({device}/{dtype} and {t.device}/{t.dtype})"
    if device.type == "cpu":
        if dtype not in _TRITON_DTYPES:
            return f"dtype {dtype} (grouped_mm on CPU takes float32, bfloat16 or float16)"
    elif device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (8, 0):
            return f"grouped_mm on CUDA needs bfloat16 on sm80+, got {dtype}"
    else:
        return f"device {device} is neither cuda nor cpu"
    for w in widths:
        if (w * dtype.itemsize) % 16:
            return f"width {w} x {dtype.itemsize} bytes is not a multiple of 16 bytes"
    return None


@functools.cache
def _log_choice(op: str, backend: str, source: str) -> None:
    logger.info("fedmoe.kernels.%s: running the %s backend (%s)", op, backend, source)


def choose_backend(op: str, backend: str, reasons: dict[str, str | None]) -> str:
    """Resolve `backend` for `op` given why each fast path cannot run (None = it can).

    Args:
        op: op name for messages and the log line.
        backend: the dispatcher's `backend=` argument.
        reasons: backend name -> None if it qualifies, else a reason string; "reference" is
            implied and always qualifies; a missing "grouped_mm" means the op has none.

    Returns:
        The backend name that will run.

    Raises:
        KernelError: unknown name, or an explicitly requested backend that does not qualify.
    """
    if backend not in ("auto",) + BACKENDS:
        raise KernelError(f"{op}: backend expected one of {('auto',) + BACKENDS}, got {backend!r}")
    reasons = {"reference": None, **reasons}
    if backend != "auto":
        requested, source = backend, "backend= argument"
    else:
        requested = env_backend()
        source = f"{ENV_VAR}={requested}" if requested else "auto"
    if requested is None:
        # The interpreter is for tests that ask for Triton explicitly: auto never picks it (a test
        # session that sets TRITON_INTERPRET must not slow every model in it down 100x).
        chosen = next(
            name
            for name in _AUTO_ORDER
            if name in reasons and reasons[name] is None and not (name == "triton" and triton_interpreting())
        )
    elif requested == "grouped_mm" and "grouped_mm" not in reasons:
        chosen = "reference"
        source += "; this op has no grouped_mm path"
    elif reasons[requested] is not None:
        raise KernelError(f"{op}: backend {requested!r} requested ({source}) but cannot run: {reasons[requested]}")
    else:
        chosen = requested
    _log_choice(op, chosen, source)
    return chosen
