"""Fused chunked linear + cross-entropy vs. the unfused reference (full logits + torch cross_entropy).

Relative errors against float64: fp32 1e-5 (loss and both gradients); fp16 3e-3 (logits and the gradient
are rounded to fp16 before the GEMMs); bf16 (GPU) 2e-2 for the gradients, 5e-3 for the loss.
"""

import pytest
import torch

from cxrfm.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

CUDA = torch.cuda.is_available()


def _run(h, w, y, rel_err, tol_loss, tol_grad, upstream=1.0, **kw):
    loss = fused_linear_cross_entropy(h, w, y, **kw)
    gh, gw = torch.autograd.grad(loss * upstream, (h, w))
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    red = kw.get("reduction", "mean")
    ref = linear_cross_entropy_reference(hr, wr, y, reduction=red)
    ghr, gwr = torch.autograd.grad(ref * upstream, (hr, wr))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref) < tol_loss, f"loss {loss.item()} vs {ref.item()}"
    assert gh.shape == h.shape and gw.shape == w.shape
    assert rel_err(gh, ghr) < tol_grad, f"dh err {rel_err(gh, ghr):.2e}"
    assert rel_err(gw, gwr) < tol_grad, f"dW err {rel_err(gw, gwr):.2e}"


def _inputs(N, H, V, dtype, device, n_ignored=4):
    h = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    w = (0.2 * torch.randn(V, H, device=device)).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=device)
    y[:n_ignored] = -100
    return h, w, y


@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_matches_reference(chunk_size, reduction, device, rel_err):
    h, w, y = _inputs(26, 48, 301, torch.float32, device)
    _run(h, w, y, rel_err, 1e-5, 1e-5, chunk_size=chunk_size, reduction=reduction)


def test_fp16_and_3d_hidden(device, rel_err):
    h, w, y = _inputs(26, 64, 257, torch.float16, device)
    h3 = h.detach().view(2, 13, 64).requires_grad_()
    _run(h3, w, y.view(2, 13), rel_err, 1e-3, 3e-3, chunk_size=8)


def test_upstream_gradient_and_fp32_accumulation(device, rel_err):
    h, w, y = _inputs(20, 32, 130, torch.float32, device)
    _run(h, w, y, rel_err, 1e-5, 1e-5, upstream=2.5, chunk_size=6, fp32_grad_accum=True)


def test_all_ignored_gives_zero_loss_and_grads(device):
    h, w, y = _inputs(9, 32, 70, torch.float32, device, n_ignored=9)
    loss = fused_linear_cross_entropy(h, w, y)
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_no_grad_and_frozen_weight(device, rel_err):
    h, w, y = _inputs(12, 32, 90, torch.float32, device)
    with torch.no_grad():
        l0 = fused_linear_cross_entropy(h, w, y)
    ref = linear_cross_entropy_reference(h.detach().double(), w.detach().double(), y)
    assert rel_err(l0, ref) < 1e-5
    w_frozen = w.detach()
    loss = fused_linear_cross_entropy(h, w_frozen, y)
    loss.backward()
    assert w_frozen.grad is None
    # PyTorch's own cross-entropy on the full float64 logits is the reference for dh.
    hr = h.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(hr @ w_frozen.double().t(), y, ignore_index=-100).backward()
    assert rel_err(h.grad, hr.grad) < 1e-5, f"dh err {rel_err(h.grad, hr.grad):.2e}"


def test_rejects_bad_inputs(device):
    h, w, y = _inputs(6, 16, 20, torch.float32, device)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(h, w, y[:5])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real shapes, bf16)")
def test_gpu_bf16_real_shape_and_memory(rel_err):
    N, H, V = 4096, 1024, 32768
    h, w, y = _inputs(N, H, V, torch.bfloat16, "cuda", n_ignored=100)
    _run(h, w, y, rel_err, 5e-3, 2e-2)
    # the fused loss never holds the (N, V) logits: its peak is under half of one fp32 copy of them, and at
    # least 4x below the unfused loss's peak (the target)
    def peak_of(fn):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(h, w, y).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak_of(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=256))
    unfused = peak_of(linear_cross_entropy_reference)
    assert fused < N * V * 4 / 2, f"fused peak {fused / 2**20:.0f} MiB"
    assert unfused / fused >= 4, f"unfused {unfused / 2**20:.0f} MiB vs fused {fused / 2**20:.0f} MiB"
