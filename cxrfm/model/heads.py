"""LM head that can return the loss itself, and the fused-kernel swaps applied by config.

`LMHead(hidden, labels)` returns the summed cross-entropy of the selected answer tokens; with
`fused=True` it calls our chunked Triton linear + cross-entropy, which never builds the
(tokens x vocab) logits. Keeping the loss inside the head's forward matters for ZeRO-3: DeepSpeed
gathers a module's partitioned weight only around that module's own forward call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LMHead(nn.Linear):
    def __init__(self, hidden_size: int, vocab_size: int, fused: bool = False):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.fused = fused

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(hidden)  # logits, as transformers' generate expects
        # hidden: (n, H) answer positions only; labels: (n,) -> fp32 scalar sum
        if self.fused:
            from cxrfm.kernels import fused_linear_cross_entropy

            return fused_linear_cross_entropy(hidden, self.weight, labels, reduction="sum")
        return F.cross_entropy(super().forward(hidden).float(), labels, reduction="sum")


def swap_rmsnorm(module: nn.Module) -> int:
    """Replace every Llama RMSNorm by our fused Triton RMSNorm (same weight name). Returns the count."""
    from cxrfm.kernels import FusedRMSNorm

    swapped = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "LlamaRMSNorm":
            new = FusedRMSNorm(child.weight.shape[0], eps=child.variance_epsilon)
            setattr(module, name, new)
            swapped += 1
        else:
            swapped += swap_rmsnorm(child)
    return swapped
