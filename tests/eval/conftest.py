import pytest
import torch

from cxrfm.config import load_config
from cxrfm.model.build import build_model
from cxrfm.text.tokenizer import load_tokenizer


@pytest.fixture(scope="package")
def export(small_shards, tmp_path_factory):
    """An untrained tiny export (small diffusion decoder) trained on nothing but `small_shards`' tokenizer."""
    cfg = load_config(None, [f"data.shards={small_shards}", "model.diffusion.image_size=16"])
    tok = load_tokenizer(small_shards / "tokenizer")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "export"
    build_model(cfg, len(tok)).save_pretrained(path, full_config=cfg, tokenizer=tok)
    return path
