"""Flash attention (FA2) forward and backward in Triton.

Features: online softmax with fp32 accumulation; causal (bottom-right aligned when Tq != Tk, like flash-attn
>= 2.1) and non-causal; any sequence length (tails are masked); head dims 64 and 128; grouped-query and
multi-query attention (a query head reads its K/V head by index, K/V are never repeated in memory); packed
variable-length batches through `cu_seqlens` (each program reads its sequence's bounds, so one sequence never
attends to another and no padding is stored); block sizes autotuned per GPU and per sequence-length bucket.

Layouts (strides are passed to the kernels, so views such as transformers' (B, H, T, D).transpose(1, 2) need no
copy; only the head dim must be contiguous):
    dense   q: (B, Tq, H, D)   k, v: (B, Tk, Hk, D)   out: (B, Tq, H, D)   lse: (B, H, Tq) fp32
    varlen  q: (total_q, H, D) k, v: (total_k, Hk, D) out: (total_q, H, D) with cu_seqlens_q/k: (nseq + 1,) int32

The backward kernels (FA2 split: delta preprocess, dK/dV kernel looping over Q blocks, separate dQ kernel; no
atomics) live in `_flash_attention_bwd.py`.
"""

import math

import torch
import triton
import triton.language as tl

from ._autotune import INTERPRET, check_device, configs, prune_by_dtype, seq_bucket
from ._flash_attention_bwd import attention_backward

SUPPORTED_HEAD_DIMS = (64, 128)
LN2 = tl.constexpr(0.6931471805599453)  # log2 -> natural-log logsumexp

_FWD_CONFIGS = configs(
    [  # (meta, num_warps, num_stages); the first is the default when CXRFM_AUTOTUNE=0
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),  # the H200's choice for every head dim / causal at 8k
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 2),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 4),
    ],
    # unequal blocks so the interpreter exercises diagonal blocks that straddle the causal boundary
    ({"BLOCK_M": 32, "BLOCK_N": 16}, 4),
    # fp32 inputs (tf32 dots): half-precision tiles would need up to 256 KB of shared memory at head dim 128
    fp32_config=({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2),
)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, offs_m, offs_n, seqlen_k,
               diag, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    # acc: (BLOCK_M, D) fp32, l_i/m_i: (BLOCK_M,) fp32 running sum / max in the log2 domain
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[:, None] < seqlen_k, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            valid = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                valid = valid & (offs_m[:, None] + diag >= cols[None, :])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row whose keys are all masked so far keeps m = -inf; subtract 0 so exp2 gives 0 instead of NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < seqlen_k, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vt)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["HEAD_DIM", "IS_CAUSAL", "IS_VARLEN", "SEQ_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_by_dtype("Q")})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale,
              stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
              stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
              n_heads, group, seqlen_q, seqlen_k, SEQ_BUCKET,
              HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), n_seq * n_heads); one program = one query block of one head
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // n_heads
    off_h = off_bh % n_heads
    off_hk = off_h // group  # GQA/MQA: index the shared K/V head instead of repeating K/V
    if IS_VARLEN:
        # packed batch: batch strides are 0 and the sequence's rows start at cu_seqlens[b]
        q_start = tl.load(CU_Q + off_b)
        seqlen_q = tl.load(CU_Q + off_b + 1) - q_start
        k_start = tl.load(CU_K + off_b)
        seqlen_k = tl.load(CU_K + off_b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
    if start_m * BLOCK_M >= seqlen_q:
        return
    off_b64 = off_b.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = (Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
              + (q_start + offs_m)[:, None] * stride_qt + offs_d[None, :])
    k_ptrs = (K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
              + (k_start + offs_n)[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
              + (k_start + offs_n)[:, None] * stride_vt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seqlen_q, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Split the key range into blocks every row fully sees (no mask work) and the rest (causal diagonal and
    # the ragged tail), which pay for masking. Causal is bottom-right aligned: row i sees keys j <= i + diag.
    diag = seqlen_k - seqlen_q
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, (start_m + 1) * BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(start_m * BLOCK_M + diag + 1, seqlen_k), 0)
    else:
        hi = seqlen_k
        full = seqlen_k
    full_hi = (full // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, full_hi, offs_m, offs_n,
                               seqlen_k, diag, qk_scale, False, IS_CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, full_hi, hi, offs_m, offs_n,
                               seqlen_k, diag, qk_scale, True, IS_CAUSAL, BLOCK_N)

    # Rows that see no key at all (only possible when causal with Tq > Tk) output 0 and get lse = +inf so the
    # backward's exp(s - lse) is 0 for them rather than NaN.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)  # natural-log logsumexp
    row_ok = offs_m < seqlen_q
    tl.store(LSE + off_b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + offs_m, lse, mask=row_ok)
    o_ptrs = (O + off_b64 * stride_ob + off_h.to(tl.int64) * stride_oh
              + (q_start + offs_m)[:, None] * stride_ot + offs_d[None, :])
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("expected q, k, v of rank 4 (B, T, H, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"flash attention (triton) supports head dims {SUPPORTED_HEAD_DIMS}, got {head_dim}; "
            "use the 'sdpa' or 'eager' attention backend for this model"
        )
    if k.shape != v.shape or k.shape[-1] != head_dim or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must be (B, Tk, Hk, {head_dim}) matching q's batch; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("the Triton interpreter has no bf16 tl.dot; test with fp16 or fp32 on CPU")
    check_device(q, k, v, what="flash attention")


def _unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale):
    """q: (B, Tq, H, D), k/v: (B, Tk, Hk, D) -> out (B, Tq, H, D), lse (B, H, Tq) fp32.

    When cu_q/cu_k are given the batch dim is 1 and holds packed sequences; max_q/max_k bound their lengths.
    """
    B, Tq, H, D = q.shape
    Hk = k.shape[2]
    varlen = cu_q is not None
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, Tq), device=q.device, dtype=torch.float32)
    n_seq = cu_q.numel() - 1 if varlen else B
    # packed sequences share the single batch row: zero batch strides make every program start at row 0
    sb = (lambda x: 0) if varlen else (lambda x: x.stride(0))
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seq * H)
    _attn_fwd[grid](
        q, k, v, out, lse, cu_q, cu_k, sm_scale * 1.4426950408889634,
        sb(q), q.stride(1), q.stride(2), sb(k), k.stride(1), k.stride(2),
        sb(v), v.stride(1), v.stride(2), sb(out), out.stride(1), out.stride(2), sb(lse), lse.stride(1),
        H, H // Hk, Tq, k.shape[1], seq_bucket(max(max_q, max_k)),
        HEAD_DIM=D, IS_CAUSAL=bool(causal), IS_VARLEN=varlen,
    )
    return out, lse


class FlashAttnFunc(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the logsumexp; the backward recomputes P block by block."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale):
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        out, lse = attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.meta = (max_q, max_k, causal, sm_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, sm_scale = ctx.meta
        dq, dk, dv = attention_backward(_unit_stride(dout), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, sm_scale)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attn_func(q, k, v, causal: bool = False, softmax_scale: float | None = None):
    """Dense batch. q: (B, Tq, H, D), k/v: (B, Tk, Hk, D) with H % Hk == 0 -> (B, Tq, H, D)."""
    _check_inputs(q, k, v)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttnFunc.apply(q, k, v, None, None, q.shape[1], k.shape[1], causal, scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal: bool = False, softmax_scale: float | None = None):
    """Packed batch. q: (total_q, H, D), k/v: (total_k, Hk, D), cu_seqlens_*: (nseq + 1,) -> (total_q, H, D).

    Sequence i occupies rows cu_seqlens[i]:cu_seqlens[i+1]; attention never crosses sequences.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("flash_attn_varlen_func expects q, k, v of rank 3 (total, H, D)")
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    _check_inputs(q4, k4, v4)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = FlashAttnFunc.apply(q4, k4, v4, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), causal, scale)
    return out.squeeze(0)


def attention_reference(q, k, v, causal: bool = False, softmax_scale: float | None = None,
                        cu_seqlens_q=None, cu_seqlens_k=None):
    """Materialized-softmax reference in the inputs' dtype, same layouts and conventions as the kernels.

    Dense: q (B, Tq, H, D), k/v (B, Tk, Hk, D). Varlen: q (total_q, H, D) with cu_seqlens (each sequence run
    separately). Rows that see no key output 0, as in the kernel.
    """
    if cu_seqlens_q is not None:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = [
            attention_reference(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]],
                                causal, softmax_scale)[0]
            for i in range(len(cq) - 1)
        ]
        return torch.cat(outs, 0)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # (B, H, Tq, D)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)  # the reference may repeat K/V; the kernel does not
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        tq, tk = q.shape[1], k.shape[1]
        rows = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        s = s.masked_fill(rows < torch.arange(tk, device=q.device)[None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, vh).transpose(1, 2)  # (B, Tq, H, D)
