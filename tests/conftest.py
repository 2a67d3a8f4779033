"""Test-session set-up shared by every test.

Without a GPU, Triton kernels run under Triton's interpreter. It reads ``TRITON_INTERPRET`` when
Triton is first imported, so the variable is set here, before any test module imports Triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
