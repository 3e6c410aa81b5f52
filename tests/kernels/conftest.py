"""Kernel tests: without CUDA, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before a kernel module is decorated (i.e. imported); the
kernels package imports its *_triton.py modules lazily, so setting it here, at collection,
is early enough. With CUDA present nothing is changed and the kernels compile for the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
