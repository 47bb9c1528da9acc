"""Projector: patch features -> a fixed number of visual tokens in the LM's embedding space.

Pools the patch grid to a sqrt(N) x sqrt(N) grid (keeps where things are, which grounding needs),
then a two-layer MLP as in LLaVA-1.5. With `position_embedding`, each visual token also gets a learned
embedding of its grid cell and of its image's role, so position and image identity are in the token's
content where the LM's attention can match on them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from cxrfm.config import ProjectorConfig
from cxrfm.data.samples import ROLES


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.side = math.isqrt(cfg.num_tokens)
        self.fc1 = nn.Linear(in_dim, cfg.hidden_size)
        self.fc2 = nn.Linear(cfg.hidden_size, out_dim)
        if cfg.position_embedding:
            self.cell = nn.Parameter(torch.randn(self.side * self.side, out_dim) * 0.02)  # (N, D)
            self.role = nn.Parameter(torch.randn(len(ROLES), out_dim) * 0.02)  # (roles, D)
        else:
            self.cell = self.role = None

    def forward(self, patches: torch.Tensor, roles: torch.Tensor | None = None) -> torch.Tensor:
        """patches (n, P, Dv); roles (n,) index into ROLES of each image (needed with position_embedding)."""
        n, p, d = patches.shape  # (n, P, Dv)
        grid = math.isqrt(p)
        x = patches.transpose(1, 2).reshape(n, d, grid, grid)  # (n, Dv, g, g)
        x = F.adaptive_avg_pool2d(x, self.side).flatten(2).transpose(1, 2)  # (n, N, Dv)
        x = self.fc2(F.gelu(self.fc1(x)))  # (n, N, D)
        if self.cell is not None:
            if roles is None:
                raise ValueError("this projector embeds each image's role: pass roles (n,) with the patches")
            x = x + self.cell + self.role[roles].unsqueeze(1)  # (n, N, D)
        return x
