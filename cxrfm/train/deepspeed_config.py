"""The DeepSpeed config dict, derived from the cxrfm config (one source of truth), and the optimizer."""

from __future__ import annotations

import math

import torch

from cxrfm.config import Config, TrainConfig


def deepspeed_config(cfg: Config) -> dict:
    ds, tr = cfg.deepspeed, cfg.train
    zero: dict = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    for kind, device in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if device != "none":
            zero[kind] = {"device": device, **({"nvme_path": ds.nvme_path} if device == "nvme" else {})}
    if ds.stage == 3:
        # Lets rank 0 gather full weights for the export without a separate conversion step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * tr.num_workers,
        "gradient_clipping": tr.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": tr.precision == "bf16"},
        "fp16": {"enabled": tr.precision == "fp16"},
        # We hand DeepSpeed a torch optimizer (DeepSpeed's fused Adam needs CUDA).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    tr = cfg.train
    # No weight decay on norms and biases, as is standard for transformers.
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.deepspeed.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=tr.lr, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=tr.lr, betas=(0.9, 0.95), fused=tr.use_gpu)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule of a run: warmup, an optional hold at the peak, cosine decay (see `lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg.train, step))


def lr_factor(tr: TrainConfig, step: int) -> float:
    """The lr multiplier at `step`: linear warmup over warmup_steps, then hold at 1 until the last
    decay_fraction of the remaining steps, which decay by a half cosine to min_lr_ratio at max_steps."""
    if step < tr.warmup_steps:
        return (step + 1) / tr.warmup_steps
    after_warmup = max(1, tr.max_steps - tr.warmup_steps)
    decay_steps = max(1, round(tr.decay_fraction * after_warmup))
    progress = min(1.0, max(0.0, (step - tr.max_steps + decay_steps) / decay_steps))  # 0 until the decay starts
    return tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
