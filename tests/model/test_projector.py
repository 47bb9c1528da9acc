"""The projector: pooled patch grid -> visual tokens, with optional learned cell and role embeddings."""

import pytest
import torch

from cxrfm.config import ProjectorConfig
from cxrfm.model.projector import Projector


def test_position_embedding_puts_cell_and_role_into_the_token():
    torch.manual_seed(0)
    proj = Projector(ProjectorConfig(num_tokens=4, hidden_size=8, position_embedding=True), in_dim=6, out_dim=5)
    patches = torch.ones(2, 16, 6)  # (n, P, Dv): every patch alike, so only the embeddings can differ
    tokens = proj(patches, torch.tensor([0, 2]))  # a frontal and a prior image
    assert tokens.shape == (2, 4, 5)
    assert not torch.allclose(tokens[0, 0], tokens[0, 3])  # cells differ (left vs right column)
    assert not torch.allclose(tokens[0], tokens[1])  # roles differ
    torch.testing.assert_close(tokens[0] - tokens[1], (proj.role[0] - proj.role[2]).expand(4, 5))
    with pytest.raises(ValueError, match="pass roles"):
        proj(patches)


def test_without_position_embedding_identical_patches_give_identical_tokens():
    proj = Projector(ProjectorConfig(num_tokens=4, hidden_size=8), in_dim=6, out_dim=5)
    tokens = proj(torch.ones(2, 16, 6), torch.tensor([0, 2]))
    torch.testing.assert_close(tokens[0, 0], tokens[1, 3])
    assert proj.cell is None and not any("cell" in n for n, _ in proj.named_parameters())
