"""Projector: patch features -> a fixed number of visual tokens in the LM's embedding space.

Pools the patch grid to a sqrt(N) x sqrt(N) grid (keeps where things are, which grounding needs),
then a two-layer MLP as in LLaVA-1.5.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cxrfm.config import ProjectorConfig


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.side = math.isqrt(cfg.num_tokens)
        self.fc1 = nn.Linear(in_dim, cfg.hidden_size)
        self.fc2 = nn.Linear(cfg.hidden_size, out_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, p, d = patches.shape  # (n, P, Dv)
        grid = math.isqrt(p)
        x = patches.transpose(1, 2).reshape(n, d, grid, grid)  # (n, Dv, g, g)
        x = F.adaptive_avg_pool2d(x, self.side).flatten(2).transpose(1, 2)  # (n, N, Dv)
        return self.fc2(F.gelu(self.fc1(x)))  # (n, N, D)
