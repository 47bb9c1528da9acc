"""The hand-written batched decode step equals transformers' `LlamaForCausalLM.forward` on the same
left-padded batch: logits at every step, through cache growth and a rebuild that drops and re-aligns rows."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cxrfm.serving.decode_step import BatchKV, LlamaDecoder


def _lm(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _reference(lm, seqs: list[list[int]]) -> torch.Tensor:
    """Next-token logits of each sequence, each alone, no cache: (B, V)."""
    with torch.no_grad():
        return torch.cat([lm(input_ids=torch.tensor([s])).logits[:, -1] for s in seqs])


def _prefill(lm, seq: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        cache = lm(input_ids=torch.tensor([seq]), use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]  # per layer (1, Hkv, T, Dh)


def test_step_matches_transformers_forward_through_growth_and_rebuild():
    for kv_heads in (4, 2):  # multi-head and grouped-query attention
        lm, g = _lm(kv_heads), torch.Generator().manual_seed(1)
        seqs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 11, 8)]  # unequal: left padding
        prompts = [s[:-1] for s in seqs]  # the last token is fed by the first step, as the loop does
        kv = BatchKV.from_rows([_prefill(lm, s) for s in prompts], [len(s) for s in prompts], headroom=1)
        dec = LlamaDecoder(lm)
        for step in range(6):  # headroom 1: the cache grows on the second step and after
            logits = dec.step(kv, torch.tensor([s[-1] for s in seqs]), torch.tensor([len(s) - 1 for s in seqs]))
            torch.testing.assert_close(logits, _reference(lm, seqs), atol=1e-4, rtol=1e-4)
            for s, t in zip(seqs, logits.argmax(-1).tolist()):
                s.append(t)
            if step == 2:  # the middle sequence leaves, a new one joins: re-laid as the loop does
                keep = [0, 2]
                old = kv.rows(torch.tensor(keep), max(len(seqs[i]) - 1 for i in keep))
                joiner = torch.randint(3, 97, (17,), generator=g).tolist()
                seqs = [seqs[i] for i in keep] + [joiner]
                kv = BatchKV.from_rows([old, _prefill(lm, joiner[:-1])], [len(s) - 1 for s in seqs], headroom=4)
        assert kv.width == max(len(s) for s in seqs) - 1
