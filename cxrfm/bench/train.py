"""`cxrfm bench train`: one training step of the multitask model per attention backend and with /
without the fused RMSNorm and cross-entropy kernels: tokens/s, MFU, peak memory, and the loss after
the same steps from the same weights and data (the curves must agree across backends).

Baseline: `sdpa` without fused kernels, measured in the same run. Single device, plain AdamW: this
measures the model's step, not DeepSpeed's communication (that is `cxrfm plan`'s estimate).
"""

from __future__ import annotations

import argparse
import time

import torch

from cxrfm.attention import triton_interpreter
from cxrfm.model.runtime import gpu_peak_tflops
from cxrfm.model.summary import train_flops
from cxrfm.config import load_config
from cxrfm.model.build import IMAGE_TOKEN_ID

# A ~1B-parameter LM with a ViT-B-class encoder: big enough to load an H100, small enough for one.
GPU_PRESET = [
    "model.vision.image_size=448", "model.vision.patch_size=14", "model.vision.hidden_size=768",
    "model.vision.num_layers=12", "model.vision.num_heads=12", "model.vision.intermediate_size=3072",
    "model.projector.num_tokens=256", "model.projector.hidden_size=2048",
    "model.language.hidden_size=2048", "model.language.intermediate_size=5504", "model.language.num_layers=16",
    "model.language.num_heads=16", "model.language.num_kv_heads=8", "model.language.max_position_embeddings=8192",
    "model.language.vocab_size=128256", "data.max_seq_len=4096", "train.use_gpu=true", "train.precision=bf16",
]


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--preset", choices=["auto", "tiny", "gpu-1b"], default="auto", help="auto: gpu-1b on CUDA, else tiny")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (0: 4 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (0: 10 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (0: 3 on GPU, 1 on CPU)")
    p.add_argument("--backends", default="sdpa,triton,flash_attn", help="attention backends to compare")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _batch(cfg, vocab: int, batch: int, device, seed: int = 0) -> dict:
    """One frontal image per row, its visual tokens, a prompt, and an answer that the loss covers."""
    g = torch.Generator().manual_seed(seed)
    T, N, S = cfg.data.max_seq_len, cfg.model.projector.num_tokens, cfg.model.vision.image_size
    ids = torch.randint(3000, vocab, (batch, T), generator=g)
    ids[:, 1 : 1 + N] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, : T // 2] = -100  # first half prompt, second half answer
    return {
        "input_ids": ids.to(device), "attention_mask": torch.ones(batch, T, dtype=torch.long, device=device),
        "images": torch.randint(0, 256, (batch, 3, S, S), generator=g, dtype=torch.uint8).to(device),
        "image_present": torch.tensor([[True, False, False]] * batch, device=device),
        "labels": labels.to(device), "task": torch.zeros(batch, dtype=torch.long, device=device),
    }


def _run_variant(base, backend: str, fused: bool, args, device) -> dict:
    from cxrfm.attention import AttentionBackendError
    from cxrfm.model.build import build_model

    cfg = base.model_copy(deep=True)
    cfg.model.attention = backend
    cfg.model.fused_rmsnorm = cfg.model.fused_cross_entropy = fused
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    try:  # the same entry point as training: attention and kernels resolved for this device
        model = build_model(cfg, cfg.model.language.vocab_size, device=device, dtype=dtype)
    except AttentionBackendError as e:
        return {"skipped": str(e).splitlines()[0]}
    impl = model.runtime.attn_implementation
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = _batch(cfg, cfg.model.language.vocab_size, args.batch, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = model(**data)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = sorted(times)[len(times) // 2]
    tokens = args.batch * cfg.data.max_seq_len
    out = {"step_ms": step_s * 1e3, "tokens_s": tokens / step_s, "loss": losses[-1], "impl": impl,
           "tflops": train_flops(model, cfg, args.batch) / step_s / 1e12}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    return out


def run_train_bench(args: argparse.Namespace) -> str:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.preset if args.preset != "auto" else ("gpu-1b" if cuda else "tiny")
    overrides = (GPU_PRESET if preset == "gpu-1b" else ["model.language.vocab_size=4096"]) + args.overrides
    base = load_config(None, overrides)
    args.batch = args.batch or (4 if cuda else 2)
    args.steps = args.steps or (10 if cuda else 2)
    args.warmup = args.warmup or (3 if cuda else 1)
    peak = gpu_peak_tflops(torch.cuda.get_device_name()) if cuda else None
    lines = [f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; preset {preset}; batch {args.batch} x "
             f"{base.data.max_seq_len} tokens; median of {args.steps} steps after {args.warmup} warmup"]
    if not cuda:
        lines.append("CPU: timings are not meaningful here; this checks that every variant runs and agrees.")
    lines.append(f"{'attention':<11} {'fused':<6} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
                 f"{'peak GiB':>9} {'loss':>8} {'vs sdpa':>8}")
    baseline = None
    for backend in args.backends.split(","):
        for fused in (False, True):
            if fused and not (cuda or triton_interpreter()):
                continue
            r = _run_variant(base, backend, fused, args, device)
            if "skipped" in r:
                lines.append(f"{backend:<11} {str(fused):<6} skipped: {r['skipped']}")
                break
            baseline = baseline or r
            mfu = f"{100 * r['tflops'] / peak:5.1f}%" if peak else "   n/a"
            mem = f"{r['peak_gib']:9.2f}" if "peak_gib" in r else f"{'n/a':>9}"
            lines.append(f"{backend:<11} {str(fused):<6} {r['step_ms']:9.1f} {r['tokens_s']:10.0f} {r['tflops']:8.1f} "
                         f"{mfu:>6} {mem} {r['loss']:8.4f} {baseline['step_ms'] / r['step_ms']:7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = add_args(argparse.ArgumentParser(prog="cxrfm bench train")).parse_args(argv)
    print(run_train_bench(args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
