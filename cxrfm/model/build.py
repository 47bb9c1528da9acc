"""The one way to build or load the model: training, eval, predict, serving and the benchmarks all call
`build_model` (a new model from config) or `load_export` (an export written by `save_pretrained`).

Both run in the process that will run the model, and there they: resolve `model.attention` and the fused
kernels for this process's device (cxrfm.model.runtime), register our attention backends with
transformers (a per-process registry), build under `deepspeed.zero.Init` for ZeRO-3 (no rank holds the
whole model) or directly on the device, and move and cast the weights (bf16 on a GPU by default).
The decision is stamped on the model as `model.runtime`, which training logs per rank and serving
reports per replica. `device="meta"` builds shapes only (summaries, the planner).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cxrfm.config import Config, config_from_dict
from cxrfm.model.multitask import CONFIG, WEIGHTS, MultitaskModel
from cxrfm.model.runtime import check_fits, resolve_device, resolve_dtype, resolve_runtime
from cxrfm.text.tokenizer import IMAGE, SPECIAL_TOKENS

# Id of `<image>` in every cxrfm tokenizer: special tokens are added first, in SPECIAL_TOKENS order.
IMAGE_TOKEN_ID = SPECIAL_TOKENS.index(IMAGE)


def default_vocab_size(cfg: Config) -> int:
    """The LM vocabulary when no tokenizer is at hand (BPE size + special and location tokens)."""
    return cfg.model.language.vocab_size or cfg.data.vocab_size + len(SPECIAL_TOKENS)


def build_model(cfg: Config, vocab_size: int | None = None, device: str | torch.device = "auto",
                dtype: str | torch.dtype | None = None, zero3_config: dict | None = None,
                attention: str | None = None, image_token_id: int = IMAGE_TOKEN_ID,
                fallback: bool = False) -> MultitaskModel:
    """A new model from `cfg` in this process.

    device: "auto" (this process's GPU if it sees one, else CPU), "cpu", "cuda[:i]" or "meta".
    dtype: None leaves fp32 weights for DeepSpeed to cast (training); "auto" = bf16 on a GPU, else fp32.
    zero3_config: the DeepSpeed config; parameters are partitioned across ranks as they are created.
    attention: overrides cfg.model.attention. fallback: see `resolve_runtime` (exports trained elsewhere).
    """
    configured = cfg.model.language.vocab_size
    if configured and vocab_size and vocab_size > configured:
        raise ValueError(f"model.language.vocab_size={configured} is smaller than the tokenizer's {vocab_size} tokens; "
                         "raise it or leave it unset (null: the tokenizer's size)")
    # a configured vocabulary may be larger than the tokenizer (padded embedding, e.g. 128256 for a Llama-3 shape)
    vocab_size = configured or vocab_size or default_vocab_size(cfg)
    dev = torch.device("meta") if str(device) == "meta" else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    runtime = resolve_runtime(cfg.model, dev, dt, attention, fallback)
    model_cfg = cfg.model.model_copy(update={"fused_rmsnorm": runtime.fused_rmsnorm,
                                             "fused_cross_entropy": runtime.fused_cross_entropy})
    if zero3_config is not None:
        import deepspeed

        ctx = deepspeed.zero.Init(config_dict_or_path=zero3_config)
    else:
        # meta: shapes only; cuda: weights are created (and initialised) on the GPU directly.
        ctx = dev if dev.type != "cpu" else contextlib.nullcontext()
    with ctx:
        model = MultitaskModel(model_cfg, vocab_size, image_token_id, runtime.attn_implementation)
    if zero3_config is None and dt is not None and dev.type != "meta":
        model = model.to(dtype=dt)
    model.runtime = runtime
    return model


def read_export(path: str | Path) -> tuple[Config, dict]:
    """(the export's full config, its config.json) without loading weights; a clear error if not an export."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a cxrfm export (needs {CONFIG} and {WEIGHTS}); "
                                "train with `cxrfm train` and pass the printed export directory")
    meta = json.loads((path / CONFIG).read_text())
    cfg = config_from_dict(meta["config"]) if "data" in meta["config"] else Config(model=meta["config"]["model"])
    return cfg, meta


def load_export(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto",
                attention: str | None = None, check_memory: bool = False) -> MultitaskModel:
    """An exported model, ready for inference in this process.

    attention: None runs the export's own model.attention when it can run here, else falls back (logged)
    the way "auto" would; an explicit backend that cannot run is an error. check_memory: refuse with one
    line (model size, memory) before loading weights that cannot fit (serving replicas do).
    """
    cfg, meta = read_export(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev) or torch.float32
    if check_memory:
        check_fits(Path(path) / WEIGHTS, dev, dt, what=f"model {Path(path)}")
    cfg.model.language.vocab_size = meta["vocab_size"]  # the saved weights' size, whatever the config said
    model = build_model(cfg, meta["vocab_size"], dev, dt, attention=attention, image_token_id=meta["image_token_id"],
                        fallback=True)
    state = load_file(str(Path(path) / WEIGHTS), device=str(dev))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
        raise ValueError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()
