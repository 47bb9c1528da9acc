"""Flash attention backward (FA2 split) in Triton; see flash_attention.py for layouts and conventions.

    1. preprocess: delta = rowsum(dO * O)                        (B, H, Tq) fp32
    2. dK/dV: one program per (key block, KV head); loops over every query block of every query head in the
       group, recomputing P = exp(S - lse) from the saved logsumexp, so dK/dV are summed in registers and
       written once (no atomics, no repeated K/V for GQA).
    3. dQ: one program per (query block, query head); loops over key blocks.

Masking: the dK/dV loop only masks the causal diagonal; rows past the query tail load lse = +inf, so their P
is 0 without a mask. The dQ loop needs no tail mask either: keys past the tail load K = 0, so they add
nothing to dQ = dS @ K.
"""

import torch
import triton
import triton.language as tl

from ._autotune import configs, prune_by_dtype, seq_bucket

LOG2E = tl.constexpr(1.4426950408889634)

_DKDV_CONFIGS = configs(
    [  # (meta, num_warps, num_stages); the first is the default when CXRFM_AUTOTUNE=0
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 8, 3),  # H200 at 8k, head dim 128 (64 chose 64x64 causal, 32x128 not)
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 4, 3),
        ({"BLOCK_M": 32, "BLOCK_N": 128}, 8, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 128}, 8, 2),
    ],
    ({"BLOCK_M": 16, "BLOCK_N": 32}, 4),
    fp32_config=({"BLOCK_M": 32, "BLOCK_N": 64}, 4, 2),
)
_DQ_CONFIGS = configs(
    [
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3),  # the H200's choice at 8k
        ({"BLOCK_M": 128, "BLOCK_N": 32}, 4, 3),
        ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3),
        ({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3),
    ],
    ({"BLOCK_M": 32, "BLOCK_N": 16}, 4),
    fp32_config=({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 2),
)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, CU_Q, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                    stride_db, stride_dh, n_heads, seqlen_q,
                    HEAD_DIM: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), n_seq * n_heads)
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    if IS_VARLEN:
        q_start = tl.load(CU_Q + off_b)
        seqlen_q = tl.load(CU_Q + off_b + 1) - q_start
    else:
        q_start = 0
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (q_start + offs_m)[:, None]
    mask = offs_m[:, None] < seqlen_q
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(DELTA + off_b * stride_db + off_h * stride_dh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot, lo, hi,
                offs_n, seqlen_q, diag, qk_scale, MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    # k, v: (BLOCK_N, D); dk, dv: (BLOCK_N, D) fp32. Work in the transposed (key, query) orientation so no
    # (BLOCK_M, BLOCK_N) tile needs transposing before the dK/dV products.
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        q = tl.load(q_ptrs + start_m * stride_qt, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        lse = tl.load(lse_ptrs + start_m, mask=row_ok, other=float("inf"))  # +inf: P = 0 past the tail
        qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :] * LOG2E)
        if MASKED:
            pT = tl.where(rows[None, :] + diag >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_ptrs + start_m * stride_dot, mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        delta = tl.load(delta_ptrs + start_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["HEAD_DIM", "IS_CAUSAL", "IS_VARLEN", "SEQ_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_by_dtype("Q")})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, sm_scale, qk_scale,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
                   stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
                   n_kv_heads, group, seqlen_q, seqlen_k, SEQ_BUCKET,
                   HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(max_seqlen_k, BLOCK_N), n_seq * n_kv_heads); one program = one key block of one KV head
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // n_kv_heads
    off_hk = off_bh % n_kv_heads
    if IS_VARLEN:
        q_start = tl.load(CU_Q + off_b)
        seqlen_q = tl.load(CU_Q + off_b + 1) - q_start
        k_start = tl.load(CU_K + off_b)
        seqlen_k = tl.load(CU_K + off_b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
    if start_n * BLOCK_N >= seqlen_k:
        return
    off_b64 = off_b.to(tl.int64)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < seqlen_k
    kv_rows = (k_start + offs_n)[:, None]
    k = tl.load(K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + kv_rows * stride_kt + offs_d[None, :],
                mask=col_ok, other=0.0)
    v = tl.load(V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + kv_rows * stride_vt + offs_d[None, :],
                mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Causal (bottom-right aligned, row i sees keys j <= i + diag): query rows before `lo` see none of this
    # key block; rows from `mask_hi` on see all of it; rows in between need the diagonal mask.
    diag = seqlen_k - seqlen_q
    n0 = start_n * BLOCK_N
    q_rows = (q_start + offs_m)[:, None]
    for g in range(group):
        off_h = (off_hk * group + g).to(tl.int64)
        q_ptrs = Q + off_b64 * stride_qb + off_h * stride_qh + q_rows * stride_qt + offs_d[None, :]
        do_ptrs = DO + off_b64 * stride_dob + off_h * stride_doh + q_rows * stride_dot + offs_d[None, :]
        lse_ptrs = LSE + off_b64 * stride_lb + off_h * stride_lh + q_start + offs_m
        delta_ptrs = DELTA + off_b64 * stride_lb + off_h * stride_lh + q_start + offs_m
        if IS_CAUSAL:
            lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
            mask_hi = lo + tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag - lo, 0), BLOCK_M) * BLOCK_M
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                 lo, tl.minimum(mask_hi, seqlen_q), offs_n, seqlen_q, diag, qk_scale, True, BLOCK_M)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                 mask_hi, seqlen_q, offs_n, seqlen_q, diag, qk_scale, False, BLOCK_M)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dot,
                                 0, seqlen_q, offs_n, seqlen_q, diag, qk_scale, False, BLOCK_M)

    dk = dk * sm_scale  # dS was taken w.r.t. the scaled scores
    tl.store(DK + off_b64 * stride_dkb + off_hk.to(tl.int64) * stride_dkh + kv_rows * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + off_b64 * stride_dvb + off_hk.to(tl.int64) * stride_dvh + kv_rows * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, offs_m, offs_n, seqlen_k,
              diag, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    # q, do: (BLOCK_M, D); dq: (BLOCK_M, D) fp32
    for start_n in range(lo, hi, BLOCK_N):
        col_ok = (start_n + offs_n)[:, None] < seqlen_k
        k = tl.load(k_ptrs + start_n * stride_kt, mask=col_ok, other=0.0)  # (BLOCK_N, D)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=col_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] + diag >= (start_n + offs_n)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["HEAD_DIM", "IS_CAUSAL", "IS_VARLEN", "SEQ_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_by_dtype("Q")})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, sm_scale, qk_scale,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 stride_dob, stride_dot, stride_doh, stride_lb, stride_lh, stride_dqb, stride_dqt, stride_dqh,
                 n_heads, group, seqlen_q, seqlen_k, SEQ_BUCKET,
                 HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid: (cdiv(max_seqlen_q, BLOCK_M), n_seq * n_heads); one program = one query block of one head
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // n_heads
    off_h = off_bh % n_heads
    off_hk = off_h // group
    if IS_VARLEN:
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
    row_ok = offs_m < seqlen_q
    q_rows = (q_start + offs_m)[:, None]
    q = tl.load(Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh + q_rows * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b64 * stride_dob + off_h.to(tl.int64) * stride_doh + q_rows * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    l_off = off_b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + offs_m
    lse = tl.load(LSE + l_off, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    k_ptrs = (K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
              + (k_start + offs_n)[:, None] * stride_kt + offs_d[None, :])
    v_ptrs = (V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
              + (k_start + offs_n)[:, None] * stride_vt + offs_d[None, :])
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    diag = seqlen_k - seqlen_q
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(seqlen_k, (start_m + 1) * BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(start_m * BLOCK_M + diag + 1, seqlen_k), 0)
        full_hi = (full // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen_k
        full_hi = seqlen_k
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, full_hi, offs_m, offs_n,
                   seqlen_k, diag, qk_scale, False, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, full_hi, hi, offs_m, offs_n,
                   seqlen_k, diag, qk_scale, True, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + off_b64 * stride_dqb + off_h.to(tl.int64) * stride_dqh + q_rows * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def attention_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, sm_scale):
    """Gradients of flash attention. All tensors in the dense layout of attention_forward (batch 1 when varlen)."""
    B, Tq, H, D = q.shape
    Hk = k.shape[2]
    varlen = cu_q is not None
    n_seq = cu_q.numel() - 1 if varlen else B
    sb = (lambda x: 0) if varlen else (lambda x: x.stride(0))
    delta = torch.empty_like(lse)  # (B, H, Tq) fp32
    pre_block = 64
    _bwd_preprocess[(triton.cdiv(max_q, pre_block), n_seq * H)](
        out, do, delta, cu_q, sb(out), out.stride(1), out.stride(2), sb(do), do.stride(1), do.stride(2),
        sb(delta), delta.stride(1), H, Tq, HEAD_DIM=D, IS_VARLEN=varlen, BLOCK_M=pre_block,
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    qk_scale = sm_scale * 1.4426950408889634
    bucket = seq_bucket(max(max_q, max_k))
    common = (sb(q), q.stride(1), q.stride(2), sb(k), k.stride(1), k.stride(2), sb(v), v.stride(1), v.stride(2),
              sb(do), do.stride(1), do.stride(2), sb(lse), lse.stride(1))
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), n_seq * Hk)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, sm_scale, qk_scale, *common,
        sb(dk), dk.stride(1), dk.stride(2), sb(dv), dv.stride(1), dv.stride(2),
        Hk, H // Hk, Tq, k.shape[1], bucket, HEAD_DIM=D, IS_CAUSAL=bool(causal), IS_VARLEN=varlen,
    )
    _attn_bwd_dq[lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seq * H)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, sm_scale, qk_scale, *common,
        sb(dq), dq.stride(1), dq.stride(2),
        H, H // Hk, Tq, k.shape[1], bucket, HEAD_DIM=D, IS_CAUSAL=bool(causal), IS_VARLEN=varlen,
    )
    return dq, dk, dv
