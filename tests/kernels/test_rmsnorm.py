"""Fused RMSNorm vs. the PyTorch reference (and transformers' LlamaRMSNorm), outputs and gradients.

Relative Frobenius errors against a float64 reference: fp32 1e-5, fp16 2e-3, bf16 1.5e-2 (the output is
rounded to the input dtype, so these are a few ulps of that dtype).
"""

import pytest
import torch

from cxrfm.kernels import FusedRMSNorm, rms_norm, rms_norm_reference

CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _check(x, w, eps, rel_err):
    y = rms_norm(x, w, eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = rms_norm_reference(xr, wr, eps)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.double())
    t = TOL[x.dtype]
    assert rel_err(y, yr) < t
    assert rel_err(dx, dxr) < t
    assert rel_err(dw, dwr) < t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 300), (5, 64), (1, 1000)])
def test_matches_reference(shape, dtype, device, rel_err):
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    _check(x, w, 1e-6, rel_err)


def test_strided_rows_and_large_eps(device, rel_err):
    # a column slice has row stride != N; the kernel takes the row stride instead of copying
    base = torch.randn(9, 2 * 96, device=device)
    x = base[:, :96].detach().requires_grad_()
    w = torch.randn(96, device=device, requires_grad=True)
    _check(x, w, 1e-1, rel_err)


def test_module_matches_llama_rmsnorm(device, rel_err):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(128, eps=1e-5).to(device)
    ref.weight.data.normal_(1.0, 0.1)
    ours = FusedRMSNorm(128, eps=1e-5).to(device)
    ours.load_state_dict(ref.state_dict())  # same parameter name, so checkpoints interchange
    x = torch.randn(4, 11, 128, device=device, requires_grad=True)
    y_ours, y_ref = ours(x), ref(x)
    assert rel_err(y_ours, y_ref) < 1e-5
    dy = torch.randn_like(y_ref)
    dx_ours, dw_ours = torch.autograd.grad(y_ours, (x, ours.weight), dy)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, ref.weight), dy)
    assert rel_err(dx_ours, dx_ref) < 1e-5, f"dx err {rel_err(dx_ours, dx_ref):.2e}"
    assert rel_err(dw_ours, dw_ref) < 1e-5, f"dweight err {rel_err(dw_ours, dw_ref):.2e}"


def test_bad_weight_shape(device):
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8, device=device), torch.ones(4, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real shapes, bf16)")
@pytest.mark.parametrize("N", [4096, 5120])
def test_gpu_real_shape_bf16(N, rel_err):
    x = torch.randn(8192, N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(N, device="cuda")).to(torch.bfloat16).requires_grad_()
    _check(x, w, 1e-6, rel_err)
