"""Causal language model: Llama architecture built from config (transformers `LlamaForCausalLM`)."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from cxrfm.config import LanguageConfig


def llama_config(cfg: LanguageConfig, vocab_size: int, attn_implementation: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation=attn_implementation,
        # No padding_idx: pad positions never reach the loss, and zeroing a row would index into
        # parameters that ZeRO-3 has already partitioned away (size 0) at construction.
        pad_token_id=None, bos_token_id=1, eos_token_id=2,
    )


def build_language_model(cfg: LanguageConfig, vocab_size: int, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    return LlamaForCausalLM(llama_config(cfg, vocab_size, attn_implementation))
