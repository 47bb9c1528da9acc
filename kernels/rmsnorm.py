"""Fused RMSNorm forward and backward in Triton.

    y = x / sqrt(mean(x^2) + eps) * w        statistics in fp32, output in x's dtype

Forward: one program per row reads x once, writes y and the row's 1/rms (fp32, saved for backward).
Backward: each program walks a strided set of rows, writes dx per row and keeps its share of dw in fp32
registers; the (n_programs, N) partial sums are reduced by one torch.sum, so there are no atomics and the
result does not depend on scheduling.
"""

import torch
import triton
import triton.language as tl

from ._autotune import check_device

MAX_FUSED_SIZE = 65536  # one row must fit in registers/shared memory of one program


@triton.jit
def _rms_norm_fwd(X, Y, W, RSTD, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    # grid: (M,); X, Y: (M, N) rows; W: (N,); RSTD: (M,) fp32
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, M, N,
                  BLOCK_N: tl.constexpr):
    # grid: (P,); program p handles rows p, p + P, ...; DW_PART: (P, N) fp32
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    # 64-bit row pointers advanced by the program stride: row * stride can overflow int32 for big activations
    pid64 = pid.to(tl.int64)
    x_ptr = X + pid64 * stride_x
    dy_ptr = DY + pid64 * stride_dy
    dx_ptr = DX + pid64 * stride_dx
    for row in range(pid, M, n_prog):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        x_ptr += n_prog * stride_x
        dy_ptr += n_prog * stride_dy
        dx_ptr += n_prog * stride_dx
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def _launch_params(N):
    if N > MAX_FUSED_SIZE:
        raise ValueError(f"fused RMSNorm supports rows of at most {MAX_FUSED_SIZE} elements, got {N}")
    block = triton.next_power_of_2(N)
    return block, min(max(block // 256, 1), 16)


class RMSNormFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, N)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        M, N = x2.shape
        block, warps = _launch_params(N)
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
        if M > 0:
            _rms_norm_fwd[(M,)](x2, y, weight, rstd, x2.stride(0), y.stride(0), N, eps, BLOCK_N=block, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        block, warps = _launch_params(N)
        dx = torch.empty_like(x2)
        # enough programs to fill the GPU, few enough that the (P, N) partial dw stays small
        if x2.is_cuda:
            n_prog = min(M, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
        else:
            n_prog = min(M, 4)
        n_prog = max(n_prog, 1)
        dw_part = torch.zeros((n_prog, N), dtype=torch.float32, device=x2.device)
        if M > 0:
            _rms_norm_bwd[(n_prog,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0),
                                     M, N, BLOCK_N=block, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., N), weight: (N,) -> (..., N) in x's dtype."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    check_device(x, weight, what="fused RMSNorm")
    return RMSNormFunc.apply(x, weight.contiguous(), float(eps))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unfused PyTorch RMSNorm with the kernel's numerics (fp32 statistics, output in x's dtype)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


class FusedRMSNorm(torch.nn.Module):
    """Drop-in for LlamaRMSNorm (same `weight` / `variance_epsilon` attributes, so state dicts load unchanged)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
