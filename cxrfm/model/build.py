"""Build the model from config: on a device, on `meta` (no memory), or under ZeRO-3 partitioning."""

from __future__ import annotations

import contextlib

import torch

from cxrfm.config import Config
from cxrfm.model.multitask import MultitaskModel
from cxrfm.text.tokenizer import IMAGE, SPECIAL_TOKENS

# Id of `<image>` in every cxrfm tokenizer: special tokens are added first, in SPECIAL_TOKENS order.
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index(IMAGE)


def default_vocab_size(cfg: Config) -> int:
    """The LM vocabulary when no tokenizer is at hand (BPE size + special and location tokens)."""
    return cfg.model.language.vocab_size or cfg.data.vocab_size + len(SPECIAL_TOKENS)


def build_model(cfg: Config, vocab_size: int | None = None, device: str | torch.device = "cpu",
                attn_implementation: str = "sdpa", zero3_config: dict | None = None) -> MultitaskModel:
    """`device="meta"` allocates nothing (for summaries and the planner); with `zero3_config`, parameters
    are partitioned across ranks as they are created, so no rank ever holds the whole model."""
    vocab_size = vocab_size or default_vocab_size(cfg)
    if zero3_config is not None:
        import deepspeed

        ctx = deepspeed.zero.Init(config_dict_or_path=zero3_config)
    else:
        # meta: shapes only; cuda: weights are created (and initialised) on the GPU directly.
        ctx = torch.device(device) if str(device) != "cpu" else contextlib.nullcontext()
    with ctx:
        model = MultitaskModel(cfg.model, vocab_size, IMAGE_TOKEN_ID, attn_implementation)
    return model
