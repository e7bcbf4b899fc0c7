"""Setup shared by every test module.

Without CUDA the Triton kernels run under Triton's interpreter, which ``@triton.jit`` chooses when a
kernel is defined, at the first import of its module. The kernel test modules set TRITON_INTERPRET
before their own imports, but anything that loads Triton earlier in the same run (a hybridlm module,
or ``torch.nn.attention.bias``, which imports Triton) would fix the compiled mode first and break
them, only in the full suite. Setting the variable here, before any test module is collected, makes
the order irrelevant. Tests that need it absent delete it with ``monkeypatch.delenv``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
