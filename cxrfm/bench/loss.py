"""`cxrfm bench loss`: peak memory (and time) of the LM loss, fused chunked linear+CE vs. unfused.

Unfused is what transformers' LlamaForCausalLM does: logits = lm_head(h) in bf16, upcast to fp32, then
cross_entropy; forward + backward. Fused is cxrfm.kernels.fused_linear_cross_entropy, which never holds the
(tokens x vocab) logits. Peak = torch.cuda.max_memory_allocated during forward + backward minus what was
allocated before (the inputs); gradients produced count. Target: fused at least 4x below unfused.
"""

from __future__ import annotations

import argparse
import os

import torch


def add_loss_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--chunk-size", type=int, default=0, help="tokens per chunk (0: the kernel's default)")
    p.add_argument("--reps", type=int, default=3)
    return p


def _unfused(h, w, y):
    logits = h @ w.t()  # (N, V) bf16, as lm_head produces it
    return torch.nn.functional.cross_entropy(logits.float(), y, ignore_index=-100)


def _measure(fn, h, w, y, reps):
    """(peak bytes above the inputs, median ms) of fn(h, w, y).backward()."""
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(h, w, y).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(reps):
        h.grad = w.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(h, w, y).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return peak, sorted(times)[len(times) // 2]


def run_loss_memory_bench(args: argparse.Namespace) -> str:
    # Here: TRITON_INTERPRET is set in main() before triton is first imported.
    from cxrfm.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    if not torch.cuda.is_available():
        # memory numbers on CPU would not describe the GPU allocator; check the loss value instead
        torch.manual_seed(0)
        h = torch.randn(64, 64)
        w = 0.1 * torch.randn(1000, 64)
        y = torch.randint(0, 1000, (64,))
        got = fused_linear_cross_entropy(h, w, y, chunk_size=16).item()
        want = linear_cross_entropy_reference(h, w, y).item()
        return (f"No CUDA GPU: memory and timings are not meaningful on CPU; correctness only: "
                f"fused loss {got:.6f} vs unfused {want:.6f} (64 tokens, vocab 1000)")
    torch.manual_seed(0)
    N, H, V = args.tokens, args.hidden, args.vocab
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    y[: N // 10] = -100  # some ignored tokens (prompt / image positions)
    chunk = args.chunk_size or None

    def fused(a, b, c):
        return fused_linear_cross_entropy(a, b, c, chunk_size=chunk)

    with torch.no_grad():
        lf, lu = fused(h, w, y).item(), _unfused(h, w, y).item()
    fused_peak, fused_ms = _measure(fused, h, w, y, args.reps)
    gh_f, gw_f = h.grad.float(), w.grad.float()
    try:
        unfused_peak, unfused_ms = _measure(_unfused, h, w, y, args.reps)
        gerr = max(((gh_f - h.grad.float()).norm() / h.grad.float().norm()).item(),
                   ((gw_f - w.grad.float()).norm() / w.grad.float().norm()).item())
    except torch.cuda.OutOfMemoryError:
        unfused_peak, unfused_ms, gerr = float("nan"), float("nan"), float("nan")
    gib = 2.0 ** 30
    return "\n".join([
        f"LM loss fwd+bwd, bf16, {torch.cuda.get_device_name()}: {N} tokens x hidden {H} x vocab {V}",
        f"{'':>8} {'peak GiB':>9} {'ms':>8} {'loss':>10}",
        f"{'unfused':>8} {unfused_peak / gib:>9.2f} {unfused_ms:>8.1f} {lu:>10.5f}",
        f"{'fused':>8} {fused_peak / gib:>9.2f} {fused_ms:>8.1f} {lf:>10.5f}",
        f"memory ratio unfused/fused: {unfused_peak / fused_peak:.1f}x (target >= 4x); "
        f"gradient rel. diff fused vs unfused: {gerr:.1e}",
    ])


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before cxrfm.kernels is imported
    args = add_loss_bench_args(argparse.ArgumentParser(prog="cxrfm bench loss")).parse_args(argv)
    print(run_loss_memory_bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
