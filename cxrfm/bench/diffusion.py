"""`cxrfm bench diffusion`: one training step (forward + backward) of the diffusion decoder per
`model.diffusion.attention_head_dim`, on the same weights and the same batch.

Why it exists: the head split changes no parameter, only how the UNet's attention is computed, and its
cost is not the FLOPs. At 32 x 32 pixels the top level attends over 1,024 positions; PyTorch's CPU flash
kernel pays per head, so 4 heads of 8 channels cost ~4x one head of 32 for the same FLOPs.

Baseline: the first head dim in `--head-dims` (8, the config default), measured in the same process with
the variants interleaved, so a busy host slows every variant alike. The decision of device and threads is
made here, in the process that runs the model (CPU: one thread, one Ray Train worker's share).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", default=None, help="job YAML whose model.diffusion is measured (default: jobs/tiny.yaml)")
    p.add_argument("--head-dims", default="8,32", help="channels per attention head to compare; the first is the baseline")
    p.add_argument("--rows", type=int, default=1, help="generate rows (images) per step; tiny-learn averages 0.8 per worker")
    p.add_argument("--text-tokens", type=int, default=60, help="report tokens each image cross-attends to")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: 1, one worker's share)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _decoders(args, head_dims: list[int], device) -> tuple[dict, object]:
    """{head dim: DiffusionDecoder}, all holding the first one's weights (the head split changes no shape)."""
    from cxrfm.config import load_config
    from cxrfm.model.diffusion import DiffusionDecoder

    out, first, cfg = {}, None, None
    for h in head_dims:
        cfg = load_config(args.config, [*args.overrides, "model.diffusion.enabled=true",
                                        f"model.diffusion.attention_head_dim={h}"])
        torch.manual_seed(0)
        dec = DiffusionDecoder(cfg.model.diffusion, cfg.model.language.hidden_size).to(device).train()
        if first is None:
            first = dec.state_dict()
        else:
            dec.load_state_dict(first)
        out[h] = dec
    return out, cfg


def _step_ms(dec, images, cond, mask, seed: int) -> float:
    dec.zero_grad(set_to_none=True)
    cond.grad = None
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    # Same timesteps and noise for every variant at this step.
    dec(images, cond, mask, generator=torch.Generator().manual_seed(seed)).backward()
    sync()
    return (time.perf_counter() - t) * 1000


def run(args: argparse.Namespace) -> str:
    head_dims = [int(x) for x in args.head_dims.split(",") if x.strip()]
    if not head_dims:
        raise SystemExit("cxrfm bench diffusion: --head-dims is empty; give e.g. --head-dims 8,32")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    decs, cfg = _decoders(args, head_dims, device)
    d = cfg.model.diffusion
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.rows, d.image_size, d.image_size), generator=g, dtype=torch.uint8).to(device)
    cond = torch.randn(args.rows, args.text_tokens, cfg.model.language.hidden_size, generator=g).to(device)
    cond.requires_grad_(True)  # the LM's hidden states get a gradient in training
    mask = torch.ones(args.rows, args.text_tokens, dtype=torch.bool, device=device)
    times = {h: [] for h in head_dims}
    for rep in range(args.warmup + args.steps):
        for h in head_dims:  # interleaved: host load hits every variant alike
            ms = _step_ms(decs[h], images, cond, mask, seed=rep)
            if rep >= args.warmup:
                times[h].append(ms)
    base = statistics.median(times[head_dims[0]])
    params = sum(p.numel() for p in decs[head_dims[0]].parameters())
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    lines = [f"diffusion decoder fwd+bwd, {d.backbone} {d.block_out_channels} at {d.image_size} px, {args.rows} image(s) "
             f"x {args.text_tokens} text tokens, {params:,} parameters (the same for every row), {where}",
             f"{'channels/head':>14} {'heads per level':>16} {'median ms':>10} {'min ms':>8} {'vs baseline':>12}"]
    levels = d.block_out_channels if d.backbone == "unet" else [d.dit_hidden_size]
    for h in head_dims:
        med = statistics.median(times[h])
        heads = ",".join(str(c // h) for c in levels)
        tag = "baseline" if h == head_dims[0] else f"{base / med:.2f}x"
        lines.append(f"{h:>14} {heads:>16} {med:>10.1f} {min(times[h]):>8.1f} {tag:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = add_args(argparse.ArgumentParser(prog="cxrfm bench diffusion")).parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
