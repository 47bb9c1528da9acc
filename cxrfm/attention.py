"""The one place that chooses an attention backend.

Backends (config `model.attention`):
    triton      our Triton flash attention (cxrfm.kernels), registered with transformers as "cxrfm_triton"
    flash_attn  transformers' "flash_attention_2" (package flash-attn)
    xformers    xformers.ops.memory_efficient_attention, registered as "cxrfm_xformers" (package xformers)
    sdpa        transformers' built-in torch scaled_dot_product_attention
    eager       transformers' built-in matmul + softmax
    auto        the first that can run here: triton on a CUDA GPU, else sdpa

`resolve_backend(requested, device)` returns the name to pass as transformers' `attn_implementation` and a
sentence saying why. A backend that was asked for explicitly but cannot run is an error that says what to
install (or, for triton without a GPU, what it needs); only "auto" falls back.

Our two registered functions take transformers' attention-interface call
    fn(module, query (B, H, Tq, D), key (B, Hk, Tk, D), value, attention_mask, scaling=None, dropout=0.0, **kw)
    -> (out (B, Tq, H, D), None)
and handle, like flash_attention_2: `module.is_causal` (ViT non-causal, Llama causal) or an `is_causal` kwarg;
GQA/MQA (fewer K/V heads, never repeated); padding masks (registered mask function returns the 2D mask or None,
and padded tokens are removed before the kernel); packed sequences, from `cu_seq_lens_q/k` + `max_length_q/k`
kwargs or from `position_ids` that restart (batch of one), so one sequence never attends to another.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_ATTN = "cxrfm_triton"
XFORMERS_ATTN = "cxrfm_xformers"
BACKENDS = ("triton", "flash_attn", "xformers", "sdpa", "eager")
# config name -> the attn_implementation name transformers knows it by
IMPLEMENTATIONS = {"triton": TRITON_ATTN, "flash_attn": "flash_attention_2", "xformers": XFORMERS_ATTN,
                   "sdpa": "sdpa", "eager": "eager"}
_PACKAGE = {"triton": "triton", "flash_attn": "flash-attn", "xformers": "xformers"}
_MODULE = {"triton": "triton", "flash_attn": "flash_attn", "xformers": "xformers"}


class AttentionBackendError(RuntimeError):
    """An explicitly requested attention backend cannot run here."""


def _installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULE[backend]) is not None


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU through the (slow) interpreter. The one place
    cxrfm reads it; it must be set before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: str) -> str | None:
    """None if our Triton kernels can run on `device` in this process, else why not."""
    if not _installed("triton"):
        return "package 'triton' is not installed (pip install triton)"
    if device.startswith("cuda") and torch.cuda.is_available():
        return None
    if triton_interpreter():
        return None
    return f"it needs a CUDA GPU and this process runs on {device} (TRITON_INTERPRET=1 runs it slowly on the CPU, for testing)"


def backend_name(impl: str) -> str:
    """transformers attn_implementation name -> our config name ("cxrfm_triton" -> "triton")."""
    return {v: k for k, v in IMPLEMENTATIONS.items()}.get(impl, impl)


def _dims(head_dim: int | tuple[int, ...] | list[int] | None) -> tuple[int, ...]:
    if head_dim is None:
        return ()
    return (head_dim,) if isinstance(head_dim, int) else tuple(head_dim)


def _why_not(backend: str, device: str, head_dim) -> str | None:
    """None if `backend` can run on `device`, else the reason it cannot (with what to install)."""
    if backend in ("sdpa", "eager"):
        return None
    if not _installed(backend):
        return f"package {_PACKAGE[backend]!r} is not installed (pip install {_PACKAGE[backend]})"
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if backend == "triton":
        reason = triton_runs_on(device)
        if reason is not None:
            return reason
        from cxrfm.kernels import SUPPORTED_HEAD_DIMS

        bad = [d for d in _dims(head_dim) if d not in SUPPORTED_HEAD_DIMS]
        if bad:
            return f"it supports head dims {SUPPORTED_HEAD_DIMS}, not {bad[0]} (model head dims: {_dims(head_dim)})"
        return None
    if not cuda:
        return "it needs a CUDA GPU"
    return None


def resolve_backend(requested: str, device: str, head_dim: int | tuple[int, ...] | None = None) -> tuple[str, str]:
    """Map config `model.attention` to a transformers attn_implementation name plus the reason for it.

    requested: "auto" or one of BACKENDS; device: where the model runs ("cuda", "cuda:1", "cpu") — call it
    in that process (cxrfm.model.runtime does); head_dim: the head dim(s) of every attention that will use it.
    Registers our backends with transformers so the returned name can be passed to from_pretrained/from_config.
    """
    requested = (requested or "auto").lower()
    device = str(device)
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose 'auto' or one of {BACKENDS}")
    register_backends()
    if requested != "auto":
        reason = _why_not(requested, device, head_dim)
        if reason is not None:
            raise AttentionBackendError(f"attention backend {requested!r} was requested but cannot run: {reason}")
        choice = (IMPLEMENTATIONS[requested], f"{requested!r} as configured, on {device}")
    else:
        if not (device.startswith("cuda") and torch.cuda.is_available()):
            # never pick the interpreter automatically: it exists for tests and is orders of magnitude slower
            reason = f"it needs a CUDA GPU and the model runs on {device}"
        else:
            reason = _why_not("triton", device, head_dim)
        if reason is None:
            choice = (TRITON_ATTN, f"auto: Triton flash attention on {device}")
        else:
            choice = ("sdpa", f"auto: sdpa, because the triton backend cannot run here: {reason}")
    return choice


def padding_mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                          attention_mask=None, **kwargs):
    """transformers mask function for our backends, same contract as its flash_attention_mask.

    Returns None when no token is padded (the kernel's own causal / packed masking then applies) or the 2D
    (batch, kv_length) bool mask of real tokens, which the attention function turns into packed sequences.
    """
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:]
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            attention_mask = None
    return attention_mask


_REGISTERED = False


def register_backends() -> None:
    """Register "cxrfm_triton" and "cxrfm_xformers" (functions and mask functions) with transformers."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    for name, fn in ((TRITON_ATTN, triton_attention_forward), (XFORMERS_ATTN, xformers_attention_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, padding_mask_function)
    _REGISTERED = True


# ---------------------------------------------------------------------------------------------------------------
# From transformers' arguments to one dense or packed call


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def _packed_from_position_ids(position_ids: torch.Tensor, total: int):
    """position_ids (1, T) that restart (e.g. 0..4, 0..2) -> (cu_seqlens (nseq+1,) int32, max_len); else None."""
    pos = position_ids.reshape(-1)
    if pos.numel() != total or total < 2:
        return None
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1  # a sequence starts wherever positions stop counting up by one
    if not bool(starts[1:].any()):
        return None
    idx = torch.nonzero(starts).flatten().to(torch.int32)
    cu = torch.cat([idx, idx.new_tensor([total])])
    return cu, int((cu[1:] - cu[:-1]).max())


def _attend(module, query, key, value, attention_mask, scaling, dropout, kwargs, dense_fn, varlen_fn, name):
    """Shared driver. query: (B, H, Tq, D); key/value: (B, Hk, Tk, D) -> (B, Tq, H, D).

    dense_fn(q, k, v, causal, scale) takes (B, T, H, D); varlen_fn(q, k, v, cu_q, cu_k, max_q, max_k, causal,
    scale) takes (total, H, D).
    """
    if dropout and dropout > 0.0:
        raise NotImplementedError(f"{name}: attention dropout is not supported (got {dropout}); set it to 0")
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"{name}: {unsupported} is not supported; use the 'sdpa' or 'eager' backend")
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, H, D) views, no copy
    B, Tq, H, D = q.shape
    Tk = k.shape[1]

    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{name} expects a 2D padding mask (its registered mask function makes one); "
                             f"got shape {tuple(attention_mask.shape)}. Custom 4D masks need 'sdpa' or 'eager'.")
        # unpad: keep real tokens only, run the packed kernel, scatter back (padded rows output 0)
        mask_k = attention_mask[:, -Tk:].bool()
        mask_q = mask_k[:, -Tq:] if Tq <= Tk else None
        if mask_q is None:
            raise ValueError(f"{name}: query longer than keys with a padding mask is not supported")
        idx_k = torch.nonzero(mask_k.flatten()).flatten()
        idx_q = torch.nonzero(mask_q.flatten()).flatten()
        len_k = mask_k.sum(-1, dtype=torch.int32)
        len_q = mask_q.sum(-1, dtype=torch.int32)
        out = varlen_fn(q.reshape(B * Tq, H, D)[idx_q], k.reshape(B * Tk, -1, D)[idx_k], v.reshape(B * Tk, -1, D)[idx_k],
                        _cu_from_lengths(len_q), _cu_from_lengths(len_k), int(len_q.max()), int(len_k.max()),
                        causal, scale)
        full = out.new_zeros(B * Tq, H, D).index_copy(0, idx_q, out)
        return full.view(B, Tq, H, D)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    packed = None
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        packed = (cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k))
    elif B == 1 and Tq == Tk and kwargs.get("position_ids") is not None:
        found = _packed_from_position_ids(kwargs["position_ids"], Tq)
        if found is not None:
            packed = (found[0], found[0], found[1], found[1])
    if packed is not None:
        out = varlen_fn(q.reshape(B * Tq, H, D), k.reshape(B * Tk, -1, D), v.reshape(B * Tk, -1, D), *packed,
                        causal, scale)
        return out.view(B, Tq, H, D)
    return dense_fn(q, k, v, causal, scale)


def triton_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for our Triton flash attention ("cxrfm_triton")."""
    from cxrfm.kernels import flash_attn_func, flash_attn_varlen_func

    def dense(q, k, v, causal, scale):
        return flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scale)

    return _attend(module, query, key, value, attention_mask, scaling, dropout, kwargs, dense, varlen, TRITON_ATTN), None


def xformers_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over xformers.ops.memory_efficient_attention ("cxrfm_xformers")."""
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias as xbias

    def grouped(q, k, v):
        # GQA without copies: xformers takes (B, T, G, Hg, D) with K/V expanded (stride 0) over Hg
        B, Tq, H, D = q.shape
        Hk = k.shape[2]
        if Hk == H:
            return q, k, v
        g = H // Hk
        return (q.reshape(B, Tq, Hk, g, D), k[:, :, :, None].expand(-1, -1, -1, g, -1),
                v[:, :, :, None].expand(-1, -1, -1, g, -1))

    def run(q, k, v, bias, scale):
        shape = q.shape
        qg, kg, vg = grouped(q, k, v)
        return xops.memory_efficient_attention(qg, kg, vg, attn_bias=bias, scale=scale).reshape(shape)

    def dense(q, k, v, causal, scale):
        bias = None
        if causal:
            bias = xbias.LowerTriangularMask() if q.shape[1] == k.shape[1] else xbias.LowerTriangularFromBottomRightMask()
        return run(q, k, v, bias, scale)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        cls = xbias.BlockDiagonalCausalFromBottomRightMask if causal else xbias.BlockDiagonalMask
        out = run(q[None], k[None], v[None], cls.from_seqlens(lq, lk), scale)
        return out[0]

    return _attend(module, query, key, value, attention_mask, scaling, dropout, kwargs, dense, varlen, XFORMERS_ATTN), None
