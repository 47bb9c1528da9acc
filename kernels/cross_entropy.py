"""Fused, chunked linear + cross-entropy for large vocabularies.

    loss = mean_{i : label_i != ignore_index} [ logsumexp(h_i @ W^T) - (h_i @ W^T)[label_i] ]

The (tokens x vocab) logits are never materialized: tokens are processed in chunks, and for each chunk
    1. logits_c = h_c @ W^T                      (C, V) fp32   [PyTorch/cuBLAS, fp32 accumulate and output]
    2. per row: logsumexp, loss, and in place    (C, V)        [Triton: two passes over the row]
       dlogits = (softmax - onehot(label)) / n_valid  (0 for ignored rows)
    3. grad_h_c = dlogits @ W; grad_W += dlogits^T @ h_c        [PyTorch/cuBLAS]
so the gradients are finished during the forward and the backward only multiplies them by the incoming
scalar gradient. Peak extra memory is one chunk's logits plus grad_W, instead of several (N, V) tensors.

grad_W is accumulated in the weight's dtype by default (each chunk's product is summed in fp32 by cuBLAS and
rounded once per chunk), which is what keeps the fused loss at a fraction of the unfused memory; pass
`fp32_grad_accum=True` to accumulate in fp32 instead (an extra 4 * V * H bytes).
"""

import torch
import triton
import triton.language as tl

from ._autotune import INTERPRET, check_device

IGNORE_INDEX = -100


@triton.jit
def _ce_rows(LOGITS, GRAD, LABELS, LOSS, SCALE, stride_l, stride_g, V, ignore_index,
             COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # grid: (C,); LOGITS: (C, V) fp32; GRAD: (C, V) any float dtype, may alias LOGITS; LOSS: (C,) fp32
    row = tl.program_id(0).to(tl.int64)
    l_ptr = LOGITS + row * stride_l
    label = tl.load(LABELS + row).to(tl.int32)
    cols = tl.arange(0, BLOCK_V)
    # pass 1: online max / sum over the vocabulary; seeded with element 0 so the loop carries fp32 scalars
    m = tl.load(l_ptr).to(tl.float32)
    s = m * 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(l_ptr + start + cols, mask=start + cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    ignored = label == ignore_index
    safe_label = tl.where(ignored, 0, label)
    target = tl.load(l_ptr + safe_label)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target))
    if COMPUTE_GRAD:
        # pass 2: dloss/dlogits = (softmax - onehot) * scale, scale = 1/n_valid (mean) or 1 (sum), 0 if ignored
        scale = tl.where(ignored, 0.0, tl.load(SCALE))
        g_ptr = GRAD + row * stride_g
        for start in range(0, V, BLOCK_V):
            c = start + cols
            x = tl.load(l_ptr + c, mask=c < V, other=0.0)
            g = tl.exp(x - lse)
            g = tl.where(c == label, g - 1.0, g) * scale
            tl.store(g_ptr + c, g.to(GRAD.dtype.element_ty), mask=c < V)


_MM_OUT_DTYPE_OK = True


def _logits_fp32(h, w):
    """h: (C, H), w: (V, H) -> (C, V) fp32, accumulated in fp32 without an fp32 copy of W when possible."""
    global _MM_OUT_DTYPE_OK
    if h.dtype == torch.float32:
        return h @ w.t()
    if h.is_cuda and _MM_OUT_DTYPE_OK:
        try:
            return torch.mm(h, w.t(), out_dtype=torch.float32)  # cuBLAS: half inputs, fp32 output
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK = False  # older torch: logits rounded to the input dtype, then upcast
    return (h @ w.t()).float()


def _default_chunk(n_tokens, vocab):
    # about 256 MiB of fp32 logits per chunk: big enough for efficient GEMMs, few grad_W roundings
    return max(1, min(n_tokens, max(16, (256 * 2**20) // (4 * vocab))))


class FusedLinearCrossEntropyFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, fp32_grad_accum, need_grad):
        # hidden: (N, H), weight: (V, H), labels: (N,)
        N, H = hidden.shape
        V = weight.shape[0]
        need_h, need_w = need_grad
        valid = labels != ignore_index
        # scale kept on device (no host sync): 1/n_valid for mean (0 when every label is ignored), 1 for sum
        if reduction == "mean":
            scale = 1.0 / valid.sum().clamp_min(1).to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        scale = scale.reshape(1).contiguous()
        loss_rows = torch.empty((N,), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        if need_w:
            grad_w = torch.zeros(weight.shape, device=weight.device,
                                 dtype=torch.float32 if fp32_grad_accum else weight.dtype)
        compute_grad = need_h or need_w
        block_v = 64 if INTERPRET else 4096
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            h_c = hidden[s:e]
            logits = _logits_fp32(h_c, weight)  # (C, V) fp32
            # gradient in the matmul dtype, written straight from the kernel (aliases logits when fp32)
            if not compute_grad or hidden.dtype == torch.float32:
                grad = logits
            else:
                grad = torch.empty_like(logits, dtype=hidden.dtype)
            _ce_rows[(e - s,)](logits, grad, labels[s:e], loss_rows[s:e], scale, logits.stride(0), grad.stride(0),
                               V, ignore_index, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
                               num_warps=1 if INTERPRET else 8)
            if need_h:
                torch.mm(grad, weight, out=grad_h[s:e])  # (C, H)
            if need_w:
                if fp32_grad_accum:
                    grad_w.addmm_(grad.t().float(), h_c.float())
                else:
                    grad_w.addmm_(grad.t(), h_c)  # (V, H) += (V, C) @ (C, H)
            del logits, grad
        loss = loss_rows.sum() * scale[0] if reduction == "mean" else loss_rows.sum()
        if grad_w is not None and fp32_grad_accum:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.has = (need_h, need_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.has
        # the usual case is d(total)/d(loss) == 1: skip a multiply that would copy grad_W (V x H)
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_h = grad_h * grad_loss.to(grad_h.dtype) if need_h else None
            grad_w = grad_w * grad_loss.to(grad_w.dtype) if need_w else None
        return (grad_h if need_h else None), (grad_w if need_w else None), None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                               chunk_size: int | None = None, fp32_grad_accum: bool = False) -> torch.Tensor:
    """Cross-entropy of (hidden @ weight^T) against labels without materializing the logits.

    hidden: (..., H), weight: (V, H) (e.g. lm_head.weight), labels: (...,) int with ignore_index for masked
    tokens (shift them for next-token prediction before calling). Returns an fp32 scalar; with reduction
    "mean" an all-ignored batch gives 0 (torch gives NaN), so a batch without text tokens cannot poison training.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != h2.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {h2.shape[0]} tokens")
    h2 = h2.contiguous()
    check_device(h2, weight, labels, what="fused linear cross-entropy")
    chunk = int(chunk_size) if chunk_size else _default_chunk(h2.shape[0], weight.shape[0])
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    if h2.shape[0] == 0:
        return (h2.sum() * 0.0 + weight.sum() * 0.0).float()
    return FusedLinearCrossEntropyFunc.apply(h2, weight, labels.contiguous(), int(ignore_index), reduction,
                                             max(1, chunk), bool(fp32_grad_accum), need)


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
    """Unfused reference: full fp32 logits, then torch's cross-entropy (0 instead of NaN when all ignored)."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    labels = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp_min(1)
    return loss
