"""Attention dispatch: backend resolution, and our Triton backend inside real transformers models.

On a CPU-only machine the Triton kernels run under the interpreter (fp32, tiny models); the reference is the
same weights with transformers' "eager" attention. Tolerances: relative Frobenius error 1e-4 on logits and
gradients (fp32 everywhere; the interpreter's matmuls are numpy's).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must precede the first import of cxrfm.kernels (kernels are decorated at import time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cxrfm.attention import TRITON_ATTN, AttentionBackendError, register_backends, resolve_backend  # noqa: E402

transformers = pytest.importorskip("transformers")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEVICE == "cpu" else 5e-3  # tf32 dots on a GPU


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def _registered():
    register_backends()
    torch.manual_seed(0)


def _pair(build):
    """The same randomly initialised model twice: once with our backend, once with eager attention."""
    torch.manual_seed(0)
    ours = build(TRITON_ATTN).to(DEVICE)
    ref = build("eager").to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == TRITON_ATTN
    return ours, ref


def _llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=128)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=torch.float32)


def _vit(impl, dropout=0.0):
    cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                 image_size=32, patch_size=8, num_channels=1, attention_probs_dropout_prob=dropout)
    return transformers.ViTModel._from_config(cfg, attn_implementation=impl, dtype=torch.float32)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_llama_matches_eager_logits_and_grads():
    ours, ref = _pair(_llama)
    ids = torch.randint(0, 100, (2, 21), device=DEVICE)  # odd length: masked tails in every block loop
    outs = []
    for m in (ours, ref):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits, _grads(m)))
    assert rel_err(outs[0][0], outs[1][0]) < TOL
    assert rel_err(outs[0][1], outs[1][1]) < TOL


def test_vit_is_non_causal_and_matches_eager():
    ours, ref = _pair(_vit)
    px = torch.randn(2, 1, 32, 32, device=DEVICE)  # 16 patches + CLS = 17 tokens
    outs = []
    for m in (ours, ref):
        h = m(pixel_values=px).last_hidden_state
        (h * torch.linspace(-1, 1, h.shape[-1], device=DEVICE)).sum().backward()
        outs.append((h, _grads(m)))
    assert rel_err(outs[0][0], outs[1][0]) < TOL
    assert rel_err(outs[0][1], outs[1][1]) < TOL


def test_packed_batch_equals_separate_sequences():
    ours, ref = _pair(_llama)
    a = torch.randint(0, 100, (1, 13), device=DEVICE)
    b = torch.randint(0, 100, (1, 8), device=DEVICE)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(13), torch.arange(8)])[None].to(DEVICE)  # positions restart: two sequences
    with torch.no_grad():
        got = ours(input_ids=packed, position_ids=pos).logits
        for model in (ours, ref):
            sep = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
            assert rel_err(got, sep) < TOL
        # without the restart the second sequence would see the first: the outputs must then differ
        fused = ours(input_ids=packed).logits
    assert rel_err(fused[:, 13:], got[:, 13:]) > 1e-3


def test_packed_cu_seqlens_kwargs_gradients_match_separate():
    ours, _ = _pair(_llama)
    a = torch.randint(0, 100, (1, 11), device=DEVICE)
    b = torch.randint(0, 100, (1, 6), device=DEVICE)
    cu = torch.tensor([0, 11, 17], dtype=torch.int32, device=DEVICE)
    pos = torch.cat([torch.arange(11), torch.arange(6)])[None].to(DEVICE)
    logits = ours(input_ids=torch.cat([a, b], 1), position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=11, max_length_k=11).logits
    logits.square().mean().backward()
    g_packed = _grads(ours)
    ours.zero_grad()
    sep = torch.cat([ours(input_ids=a).logits, ours(input_ids=b).logits], 1)
    sep.square().mean().backward()
    assert rel_err(logits, sep) < TOL
    assert rel_err(g_packed, _grads(ours)) < TOL


def test_padding_mask_matches_eager():
    ours, ref = _pair(_llama)
    ids = torch.randint(0, 100, (2, 15), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding on the second row
    with torch.no_grad():
        got, want = (m(input_ids=ids, attention_mask=mask).logits for m in (ours, ref))
    keep = mask.bool()
    assert rel_err(got[keep], want[keep]) < TOL


def test_auto_falls_back_to_sdpa_without_gpu():
    if torch.cuda.is_available():
        name, why = resolve_backend("auto", "cuda")
        assert name == TRITON_ATTN and "Triton" in why
    name, why = resolve_backend("auto", "cpu")
    assert name == "sdpa" and "CUDA GPU" in why


def test_explicit_builtin_backends():
    assert resolve_backend("sdpa", "cpu")[0] == "sdpa"
    assert resolve_backend("eager", "cpu")[0] == "eager"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("magic", "cpu")


@pytest.mark.parametrize("backend,package", [("flash_attn", "flash-attn"), ("xformers", "xformers")])
def test_missing_package_is_an_error_naming_it(backend, package):
    import importlib.util

    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(AttentionBackendError, match=f"pip install {package}"):
        resolve_backend(backend, "cuda")


def test_triton_without_gpu_is_an_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(AttentionBackendError, match="CUDA GPU"):
        resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", "cpu")[0] == TRITON_ATTN
    with pytest.raises(AttentionBackendError, match="head dims"):
        resolve_backend("triton", "cpu", head_dim=96)


def test_dropout_is_refused():
    ours = _vit(TRITON_ATTN, dropout=0.1).to(DEVICE).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        ours(pixel_values=torch.randn(1, 1, 32, 32, device=DEVICE))
