"""One decode step for a batch of running sequences, over a preallocated left-padded KV cache.

Continuous batching decodes one token for up to `max_batch_size` sequences per step, hundreds of steps a
second on a small model. Through transformers' `LlamaForCausalLM.forward` such a step costs 1.7x what it
does here (tiny model, 14 sequences, CPU: 2.6 vs 1.5 ms), spent outside the arithmetic: it builds a 4-D mask from the 2-D one, re-derives cache positions and concatenates every
layer's K/V onto a `DynamicCache` (a copy of the whole cache per step). Here a step runs the same modules
(norms, projections, rotary embedding, MLP, head: the weights and any fused kernels the runtime swapped in)
on a cache allocated once per batch membership, writing each new K/V into its column and attending with
the padding mask kept as a boolean tensor. Attention here is always torch SDPA, whatever backend the
model runs (`model.attention` still runs the prefill): one query per row is a memory-bound read of the
cache, not the long query blocks the fused kernels are for. Written by hand because transformers has no public one-token
step over a caller-owned batched cache; tests/serving/test_decode_step.py checks it against
`LlamaForCausalLM.forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class BatchKV:
    """K/V of B sequences, left-padded to a common width: per layer (B, Hkv, capacity, Dh), valid (B, capacity)
    True where a row holds a real position. Columns [0, width) are in use; a step writes column `width`."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, width: int):
        self.keys, self.values, self.valid, self.width = keys, values, valid, width

    @classmethod
    def from_rows(cls, rows: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int], headroom: int) -> BatchKV:
        """rows[i][layer] = (K, V) of shape (1, Hkv, length_i, Dh), or a (B_i, Hkv, W_i, Dh) block whose rows
        share `lengths` entries; laid out right-aligned at width max(lengths), with `headroom` free columns."""
        width = max(lengths)
        capacity = width + max(1, headroom)
        keys, values = [], []
        for layer in range(len(rows[0])):
            k0 = rows[0][layer][0]
            b = sum(r[layer][0].shape[0] for r in rows)
            k = k0.new_zeros(b, k0.shape[1], capacity, k0.shape[3])
            v = torch.zeros_like(k)
            at = 0
            for r in rows:
                rk, rv = r[layer]
                n = rk.shape[2]
                k[at:at + rk.shape[0], :, width - n:width] = rk
                v[at:at + rk.shape[0], :, width - n:width] = rv
                at += rk.shape[0]
            keys.append(k)
            values.append(v)
        dev = keys[0].device
        cols = torch.arange(capacity, device=dev)
        n = torch.tensor(lengths, device=dev)[:, None]
        valid = (cols >= width - n) & (cols < width)  # (B, capacity)
        return cls(keys, values, valid, width)

    def rows(self, index: torch.Tensor, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The last `length` columns in use of the rows `index`, per layer: (len(index), Hkv, length, Dh)."""
        lo = self.width - length
        # slice first: the gather then copies only the columns in use, not the free capacity
        return [(k[:, :, lo:self.width].index_select(0, index), v[:, :, lo:self.width].index_select(0, index))
                for k, v in zip(self.keys, self.values)]

    def grow(self, extra: int) -> None:
        """Make room for `extra` more columns (doubling, so a long answer re-allocates O(log n) times)."""
        capacity = self.valid.shape[1]
        if self.width + extra <= capacity:
            return
        more = max(extra, capacity)
        self.keys = [F.pad(k, (0, 0, 0, more)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, 0, more)) for v in self.values]
        self.valid = F.pad(self.valid, (0, more))


class LlamaDecoder:
    """The one-token step of a transformers `LlamaForCausalLM` (what cxrfm's language model is)."""

    def __init__(self, lm):
        self.lm, self.body = lm, lm.model
        cfg = lm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @torch.no_grad()
    def step(self, kv: BatchKV, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (B,) each row's last token, positions (B,) their RoPE positions -> next-token logits (B, V).
        Appends this step's K/V to `kv` (column kv.width) and advances it."""
        kv.grow(1)
        col, b = kv.width, tokens.shape[0]
        kv.valid[:, col] = True
        mask = kv.valid[:, None, None, :col + 1]  # (B, 1, 1, W+1): real positions only
        h = self.body.embed_tokens(tokens[:, None])  # (B, 1, D)
        cos, sin = self.body.rotary_emb(h, positions[:, None])  # (B, 1, Dh)
        group = self.heads // self.kv_heads
        for layer, keys, values in zip(self.body.layers, kv.keys, kv.values):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, 1, self.heads, self.head_dim).transpose(1, 2)  # (B, H, 1, Dh)
            k = attn.k_proj(x).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, 1, Dh)
            v = attn.v_proj(x).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys[:, :, col] = k[:, :, 0]
            values[:, :, col] = v[:, :, 0]
            # Grouped-query attention without repeating K/V: a KV head's G query heads become G query rows.
            q = q.reshape(b, self.kv_heads, group, self.head_dim)  # (B, Hkv, G, Dh)
            o = F.scaled_dot_product_attention(q, keys[:, :, :col + 1], values[:, :, :col + 1], attn_mask=mask,
                                               scale=attn.scaling)  # (B, Hkv, G, Dh)
            h = h + attn.o_proj(o.reshape(b, 1, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        kv.width = col + 1
        h = self.body.norm(h)  # (B, 1, D)
        return self.lm.lm_head(h[:, -1])  # (B, V)
