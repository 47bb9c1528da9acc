"""`cxrfm bench attention`: our Triton flash attention vs. SDPA (and flash-attn, xformers when installed).

Sweeps sequence length, head dim, causal / not, forward and forward+backward in bf16, all backends measured in
the same run with triton.testing.do_bench (median of CUDA-event timings). Prints TFLOP/s per backend, ours
over the best other backend, and ours as a percentage of the GPU's dense bf16 peak. Every configuration is
also checked against SDPA on the same inputs: the err column is the largest relative error of our output and
(when fwd_bwd is measured) our dq, dk, dv.

FLOPs counted as the matmuls only: forward 4*B*H*T^2*D (halved when causal), forward+backward 3.5x that
(the backward does 5 of the 7 T^2 matmuls), the convention of the flash-attention papers.

On a machine without CUDA the timings would mean nothing: it runs a small correctness check instead (kernels
under the Triton interpreter) and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from cxrfm.model.runtime import PEAK_BF16_TFLOPS, gpu_peak_tflops  # noqa: E402,F401 - re-exported here


def attention_flops(batch, heads, seqlen, head_dim, causal, mode):
    f = 4.0 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def add_attention_bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    p.add_argument("--head-dims", default="128,64")
    p.add_argument("--causal", default="both", choices=["both", "causal", "non-causal"])
    p.add_argument("--modes", default="fwd,fwd_bwd", help="fwd and/or fwd_bwd")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen held constant across the sweep")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim / head_dim")
    p.add_argument("--kv-heads", type=int, default=0, help="K/V heads (0: same as query heads)")
    p.add_argument("--backends", default="auto", help="comma list of sdpa,flash_attn,xformers, or 'auto'")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    return p


def _other_backends(requested: str) -> list[str]:
    if requested == "auto":
        found = ["sdpa"]
        found += [b for b in ("flash_attn", "xformers") if importlib.util.find_spec(b) is not None]
        return found
    return [b.strip() for b in requested.split(",") if b.strip() and b.strip() != "triton"]


def _make_fn(backend, q, k, v, causal):
    """(fn() -> output, the tensors to differentiate) for (B, T, H, D) inputs.

    Each backend gets its preferred layout, made here, outside the timed region.
    """
    if backend == "triton":
        from cxrfm.kernels import flash_attn_func  # here: main() sets TRITON_INTERPRET before triton loads

        return (lambda: flash_attn_func(q, k, v, causal=causal)), [q, k, v]
    if backend == "sdpa":
        import torch.nn.functional as F

        g = q.shape[2] // k.shape[2]
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        return (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=g > 1)), [qt, kt, vt]
    if backend == "flash_attn":
        import flash_attn

        return (lambda: flash_attn.flash_attn_func(q, k, v, causal=causal)), [q, k, v]
    if backend == "xformers":
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        return (lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias)), [q, k, v]
    raise ValueError(f"unknown backend {backend!r}")


def _time_ms(backend, q, k, v, causal, mode, warmup, rep):
    import triton.testing

    fn, inputs = _make_fn(backend, q, k, v, causal)
    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    dout = torch.randn_like(fn())

    def step():
        torch.autograd.grad(fn(), inputs, dout)  # no .grad accumulation kernels in the timing

    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def _check_vs_sdpa(q, k, v, causal, grads: bool) -> float:
    """Largest relative error of our output (and dq, dk, dv) against SDPA's, both in bf16, on these inputs."""
    from cxrfm.kernels import flash_attn_func  # here: main() sets TRITON_INTERPRET before triton loads

    sdpa, sdpa_in = _make_fn("sdpa", q, k, v, causal)
    ours, ref = flash_attn_func(q, k, v, causal=causal), sdpa().transpose(1, 2)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    err = rel(ours, ref)
    if grads:
        dout = torch.randn_like(ours)
        g = torch.autograd.grad(ours, (q, k, v), dout)
        gr = torch.autograd.grad(ref, sdpa_in, dout)
        err = max([err] + [rel(a, b.transpose(1, 2)) for a, b in zip(g, gr)])
    return err


def _cpu_check() -> str:
    """Small correctness check without a GPU: ours (interpreter) vs. SDPA in fp32, forward and backward."""
    from cxrfm.kernels import INTERPRET, flash_attn_func  # here: main() sets TRITON_INTERPRET first

    if not INTERPRET:
        return ("No CUDA GPU: timings are not meaningful on CPU, and the Triton kernels need a GPU or "
                "TRITON_INTERPRET=1 (set before import) for a correctness check.")
    import torch.nn.functional as F

    rows = ["No CUDA GPU: timings are not meaningful on CPU; checking correctness only (Triton interpreter, fp32).",
            f"{'T':>5} {'D':>4} {'causal':>6} {'out err':>9} {'grad err':>9}"]
    torch.manual_seed(0)
    for T, D, causal in ((48, 64, True), (33, 128, False)):
        q, k, v = (torch.randn(1, T, 2, D, requires_grad=True) for _ in range(3))
        out = flash_attn_func(q, k, v, causal=causal)
        ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal).transpose(1, 2)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        gr = torch.autograd.grad(ref.sum(), (q, k, v))
        err = ((out - ref).norm() / ref.norm()).item()
        gerr = max(((a - b).norm() / b.norm()).item() for a, b in zip(g, gr))
        rows.append(f"{T:>5} {D:>4} {str(causal):>6} {err:>9.1e} {gerr:>9.1e}")
    return "\n".join(rows)


def run_attention_bench(args: argparse.Namespace, echo=None) -> str:
    """Run the sweep (or the CPU correctness check) and return the table as text.

    echo: optional callable given each line as soon as it is measured (the CLI prints progressively, so a run
    cut short still shows the rows it finished).
    """
    if not torch.cuda.is_available():
        text = _cpu_check()
        if echo:
            echo(text)
        return text
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        if echo:
            echo(line)

    name = torch.cuda.get_device_name()
    peak = gpu_peak_tflops(name)
    others = _other_backends(args.backends)
    backends = ["triton"] + others
    seqlens = [int(s) for s in str(args.seqlens).split(",")]
    head_dims = [int(d) for d in str(args.head_dims).split(",")]
    causals = {"both": [True, False], "causal": [True], "non-causal": [False]}[args.causal]
    modes = [m.strip() for m in str(args.modes).split(",")]
    hdr = (f"{'T':>6} {'D':>4} {'causal':>6} {'mode':>8} " + " ".join(f"{b:>10}" for b in backends)
           + f" {'ours/best':>9} {'%peak':>6} {'err':>8}")
    emit(f"attention TFLOP/s, bf16, {name} (dense bf16 peak: {peak or 'unknown'} TFLOP/s), "
         f"{args.tokens} tokens per batch, model dim {args.model_dim}; err = max rel. error vs SDPA (out, grads)")
    emit(hdr)
    emit("-" * len(hdr))
    for D in head_dims:
        H = args.model_dim // D
        Hk = args.kv_heads or H
        for T in seqlens:
            B = max(1, args.tokens // T)
            for causal in causals:
                q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                err = _check_vs_sdpa(q, k, v, causal, "fwd_bwd" in modes)
                for mode in modes:
                    flops = attention_flops(B, H, T, D, causal, mode)
                    tf = {}
                    for b in backends:
                        try:
                            ms = _time_ms(b, q, k, v, causal, mode, args.warmup_ms, args.rep_ms)
                            tf[b] = flops / (ms * 1e-3) / 1e12
                        except Exception as e:  # a backend without this config (e.g. head dim) is reported, not fatal
                            tf[b] = None
                            emit(f"  ({b} failed at T={T} D={D}: {type(e).__name__}: {str(e)[:80]})")
                    best_other = max((tf[b] for b in others if tf.get(b)), default=None)
                    ratio = f"{tf['triton'] / best_other:.2f}" if tf["triton"] and best_other else "n/a"
                    pct = f"{100 * tf['triton'] / peak:.0f}%" if tf["triton"] and peak else "n/a"
                    cells = " ".join(f"{tf[b]:>10.1f}" if tf[b] else f"{'-':>10}" for b in backends)
                    emit(f"{T:>6} {D:>4} {str(causal):>6} {mode:>8} {cells} {ratio:>9} {pct:>6} {err:>8.1e}")
                del q, k, v
                torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available():
        # before cxrfm.kernels is imported: lets the CPU correctness check run the kernels in the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = add_attention_bench_args(argparse.ArgumentParser(prog="cxrfm bench attention")).parse_args(argv)
    run_attention_bench(args, echo=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
