"""Shared fixtures: a small synthetic shard set built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton kernels run in the interpreter on CPU-only machines; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return REPO / "jobs" / "tiny.yaml"


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """120 phantom studies in shards of 20, with manifest and tokenizer (a few seconds)."""
    from cxrfm.config import load_config
    from cxrfm.data.build import build

    out = tmp_path_factory.mktemp("shards")
    cfg = load_config(None, ["data.num_studies=120", "data.shard_size=20", "data.vocab_size=600"])
    build(cfg.data, out)
    return out

