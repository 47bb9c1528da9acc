"""Triton flash attention vs. the materialized-softmax reference, outputs and gradients.

Tolerances are relative Frobenius errors (||out - ref|| / ||ref||) against a float64 reference:
    fp32 under the interpreter (numpy matmuls)   1e-5
    fp32 on a GPU (tl.dot uses tf32)             5e-3
    fp16                                         3e-3
    bf16 (GPU only)                              1.5e-2
The small shapes run everywhere (interpreter on CPU, kernels on a GPU); the real shapes need a GPU.
"""

import pytest
import torch

from cxrfm.kernels import attention_reference, flash_attn_func, flash_attn_varlen_func
from cxrfm.kernels.flash_attention import attention_forward

CUDA = torch.cuda.is_available()


def tol(dtype):
    if dtype == torch.float32:
        return 5e-3 if CUDA else 1e-5
    return {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype]


def _grads_vs_reference(out, inputs, ref_fn, rel_err, dtype, cu=None):
    """Backprop one random dO through the kernel and through the float64 reference; compare everything."""
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ref = ref_fn(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    t = tol(dtype)
    assert rel_err(out, ref) < t, f"out err {rel_err(out, ref):.2e}"
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert g.shape == gr.shape
        assert rel_err(g, gr) < 2 * t, f"d{name} err {rel_err(g, gr):.2e}"


# (B, Tq, Tk, H, Hk, D, causal, dtype): odd tails, GQA (4/2), MQA (4/1), Tq != Tk both ways, both head dims
DENSE_CASES = [
    (2, 45, 45, 4, 2, 64, True, torch.float32),
    (1, 37, 37, 2, 2, 64, False, torch.float32),
    (1, 50, 50, 4, 1, 64, True, torch.float16),
    (2, 19, 50, 2, 1, 64, True, torch.float32),  # decode-like: queries are the last 19 positions
    (1, 50, 19, 2, 2, 64, True, torch.float32),  # more queries than keys: the first rows see nothing
    (1, 33, 33, 2, 2, 128, True, torch.float16),
    (1, 40, 23, 2, 1, 128, False, torch.float32),
    (3, 1, 40, 4, 2, 64, True, torch.float32),  # one decode step against a cache
]


@pytest.mark.parametrize("B,Tq,Tk,H,Hk,D,causal,dtype", DENSE_CASES)
def test_dense_matches_reference(B, Tq, Tk, H, Hk, D, causal, dtype, device, rel_err):
    q = torch.randn(B, Tq, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Tk, Hk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Tk, Hk, D, device=device, dtype=dtype, requires_grad=True)
    out = flash_attn_func(q, k, v, causal=causal)
    assert out.shape == (B, Tq, H, D) and out.dtype == dtype
    _grads_vs_reference(out, (q, k, v), lambda a, b, c: attention_reference(a, b, c, causal), rel_err, dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hk", [2, 1])
def test_varlen_matches_per_sequence_reference(causal, Hk, device, rel_err):
    # lengths include 1 and ones that end mid-block, so every kind of tail meets a sequence boundary
    lens = [17, 1, 33, 30]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    total, H, D, dtype = sum(lens), 4, 64, torch.float32
    q = torch.randn(total, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, Hk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, Hk, D, device=device, dtype=dtype, requires_grad=True)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
    assert out.shape == (total, H, D)
    _grads_vs_reference(out, (q, k, v), lambda a, b, c: attention_reference(a, b, c, causal, None, cu, cu),
                        rel_err, dtype)


def test_varlen_sequences_are_isolated(device):
    # changing sequence 1 must not change sequence 0's output or its gradients
    lens, H, D = [20, 27], 2, 64
    cu = torch.tensor([0, 20, 47], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(47, H, D, device=device) for _ in range(3))
    out_a = flash_attn_varlen_func(q, k, v, cu, cu, 27, 27, causal=False)
    k2 = k.clone()
    k2[20:] += 5.0
    out_b = flash_attn_varlen_func(q, k2, v, cu, cu, 27, 27, causal=False)
    torch.testing.assert_close(out_a[:20], out_b[:20], rtol=0, atol=0)
    assert not torch.allclose(out_a[20:], out_b[20:])


def test_transformers_layout_views_need_no_copy(device, rel_err):
    # transformers hands over (B, H, T, D); the kernel reads the (B, T, H, D) transpose view through strides
    q, k, v = (torch.randn(2, 4, 29, 64, device=device, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    _grads_vs_reference(out, (q, k, v),
                        lambda a, b, c: attention_reference(a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), True),
                        rel_err, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_pytorch_sdpa(causal, device, rel_err):
    """Against PyTorch's own scaled_dot_product_attention (not our reference): output and dq, dk, dv, with
    GQA (4 query heads on 2 KV heads), an odd length and a softmax scale of our choosing."""
    B, T, H, Hk, D, scale = 2, 21, 4, 2, 64, 0.2
    q = torch.randn(B, T, H, D, device=device, requires_grad=True)
    k = torch.randn(B, T, Hk, D, device=device, requires_grad=True)
    v = torch.randn(B, T, Hk, D, device=device, requires_grad=True)

    def sdpa(a, b, c):  # (B, T, H, D) in and out, K/V heads repeated for the grouped queries
        b, c = (x.transpose(1, 2).repeat_interleave(H // Hk, dim=1) for x in (b, c))
        return torch.nn.functional.scaled_dot_product_attention(a.transpose(1, 2), b, c, is_causal=causal,
                                                                scale=scale).transpose(1, 2)

    out = flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)
    _grads_vs_reference(out, (q, k, v), sdpa, rel_err, torch.float32)


def test_logsumexp_and_scale(device, rel_err):
    q, k, v = (torch.randn(1, 26, 2, 64, device=device) for _ in range(3))
    scale = 0.3
    out, lse = attention_forward(q, k, v, None, None, 26, 26, False, scale)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    assert rel_err(lse, torch.logsumexp(s, -1)) < (1e-3 if CUDA else 1e-6)
    assert rel_err(out, attention_reference(q.double(), k.double(), v.double(), False, scale)) < tol(torch.float32)


@pytest.mark.parametrize("D", [32, 80, 256])
def test_unsupported_head_dim_is_rejected(D, device):
    q = torch.randn(1, 8, 2, D, device=device)
    with pytest.raises(ValueError, match="head dims"):
        flash_attn_func(q, q, q)


def test_bad_group_is_rejected(device):
    q = torch.randn(1, 8, 3, 64, device=device)
    k = torch.randn(1, 8, 2, 64, device=device)
    with pytest.raises(ValueError, match="multiple"):
        flash_attn_func(q, k, k)


# ----------------------------------------------------------------------------------------- GPU, real shapes


def _sdpa_reference(q, k, v, causal):
    """fp32 SDPA on upcast inputs as the real-shape reference (the float64 materialized one is too big)."""
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.float().transpose(1, 2) for x in (q, k, v))
    kt, vt = kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


@pytest.mark.parametrize("B,T,H,Hk,D,causal", [
    (1, 8192, 16, 16, 128, True),
    (2, 2048, 16, 4, 128, True),
    (2, 4000, 12, 12, 64, False),
    (4, 1023, 8, 1, 64, True),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real shapes, bf16)")
def test_gpu_real_shapes(B, T, H, Hk, D, causal, dtype, rel_err):
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype, requires_grad=True)
    out = flash_attn_func(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = _sdpa_reference(*ref_in, causal)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    t = tol(dtype)
    assert rel_err(out, ref) < t, f"out err {rel_err(out, ref):.2e}"
    for name, g, gr in zip("qkv", grads, ref_grads):
        assert rel_err(g, gr) < 2 * t, f"d{name} err {rel_err(g, gr):.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real shapes, bf16)")
def test_gpu_varlen_bf16(rel_err):
    lens = [1, 517, 2048, 3001, 64]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    total, H, Hk, D = sum(lens), 16, 4, 128
    q = torch.randn(total, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    c = cu.tolist()
    ref = torch.cat([_sdpa_reference(*(x[None, c[i]:c[i + 1]] for x in ref_in), True)[0] for i in range(len(lens))])
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    assert rel_err(out, ref) < tol(torch.bfloat16)
    for g, gr in zip(grads, ref_grads):
        assert rel_err(g, gr) < 2 * tol(torch.bfloat16)


def _candidates(autotune_module):
    """Two half-precision configs, an interpreter one and the fp32-only one: the lists the pruning tests use."""
    return autotune_module.configs([({"BLOCK_M": 128}, 4, 3), ({"BLOCK_M": 64}, 8, 3)], ({"BLOCK_M": 16}, 4),
                                   fp32_config=({"BLOCK_M": 32}, 4, 2))


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_fp32_inputs_get_their_own_config(autotune, monkeypatch):
    # half-precision tiles overflow shared memory in fp32 (seen on an H200: 256 KB needed at head dim 128)
    from cxrfm.kernels import _autotune

    monkeypatch.setattr(_autotune, "INTERPRET", False)
    monkeypatch.setenv("CXRFM_AUTOTUNE", autotune)
    cands = _candidates(_autotune)
    prune = _autotune.prune_by_dtype("Q")
    fp32 = prune(cands, {"Q": torch.empty(1, dtype=torch.float32)})
    half = prune(cands, {"Q": torch.empty(1, dtype=torch.bfloat16)})
    assert [c.kwargs["BLOCK_M"] for c in fp32] == [32]
    assert [c.kwargs["BLOCK_M"] for c in half] == ([128, 64] if autotune == "1" else [128])


def test_fp32_mark_survives_freed_configs(monkeypatch):
    # the fp32 config was once tracked by id(): after a config list was freed, Python reused its ids and
    # a half-precision config built later was taken for the fp32 one (CI saw [128, 32] for fp32 inputs)
    import gc

    from cxrfm.kernels import _autotune

    monkeypatch.setattr(_autotune, "INTERPRET", False)
    monkeypatch.setenv("CXRFM_AUTOTUNE", "1")
    prune = _autotune.prune_by_dtype("Q")
    half_q, fp32_q = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
    wrong = []
    for _ in range(50):
        cands = _candidates(_autotune)
        half = [c.kwargs["BLOCK_M"] for c in prune(cands, {"Q": half_q})]
        fp32 = [c.kwargs["BLOCK_M"] for c in prune(cands, {"Q": fp32_q})]
        if (half, fp32) != ([128, 64], [32]):
            wrong.append((half, fp32))
        del cands
        gc.collect()  # frees the configs so their ids can be handed out again
    assert wrong == []
