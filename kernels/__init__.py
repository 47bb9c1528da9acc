"""Triton kernels for cxrfm: flash attention, fused RMSNorm, fused linear + cross-entropy.

Each kernel comes with an autograd.Function, a PyTorch reference, and tests (tests/kernels). On a machine
without CUDA the kernels run only under the Triton interpreter (TRITON_INTERPRET=1, set before importing
triton), which is how the CPU test suite exercises them.
"""

from ._autotune import INTERPRET
from .cross_entropy import (
    IGNORE_INDEX,
    FusedLinearCrossEntropyFunc,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from .flash_attention import (
    SUPPORTED_HEAD_DIMS,
    FlashAttnFunc,
    attention_reference,
    flash_attn_func,
    flash_attn_varlen_func,
)
from .rmsnorm import FusedRMSNorm, RMSNormFunc, rms_norm, rms_norm_reference

__all__ = [
    "INTERPRET",
    "IGNORE_INDEX",
    "SUPPORTED_HEAD_DIMS",
    "FlashAttnFunc",
    "FusedLinearCrossEntropyFunc",
    "FusedRMSNorm",
    "RMSNormFunc",
    "attention_reference",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
]
