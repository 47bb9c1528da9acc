"""Parameter counts per component, computed on the `meta` device (no weights allocated)."""

from __future__ import annotations

from torch import nn

from cxrfm.config import Config


def count_parameters(model: nn.Module) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def summarize(cfg: Config, vocab_size: int | None = None) -> dict[str, int]:
    from cxrfm.model.build import build_model  # here: summary stays light (see cxrfm/model/__init__.py)

    return count_parameters(build_model(cfg, vocab_size, device="meta"))


def format_summary(counts: dict[str, int]) -> str:
    total = counts["total"]
    rows = [f"{'component':<12} {'parameters':>16} {'share':>7}"]
    for name, n in counts.items():
        rows.append(f"{name:<12} {n:>16,} {100 * n / max(total, 1):>6.1f}%")
    return "\n".join(rows)


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions parameters; ds_numel is the full size


def train_flops(model, cfg, batch: int, seq_len: int | None = None) -> float:
    """Matmul FLOPs of one step (forward + backward = 3 x forward), PaLM appendix B style, for `batch` rows
    of `seq_len` tokens (default data.max_seq_len; training trims each batch to its longest row).

    Counted: 6 x (LM params except the embedding table, which is a lookup) x tokens; the LM head only
    on the answer half, where the loss is computed; 6 x ViT params x patches; the attention score and
    value products (causal LM: half of the square)."""
    lm_body = sum(_numel(p) for n, p in model.language.named_parameters()
                  if "embed_tokens" not in n and "lm_head" not in n)
    head = _numel(model.language.lm_head.weight)
    vit = sum(_numel(p) for p in model.vision.parameters())
    T, L, D = seq_len or cfg.data.max_seq_len, cfg.model.language.num_layers, cfg.model.language.hidden_size
    patches = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    Lv, Dv = cfg.model.vision.num_layers, cfg.model.vision.hidden_size
    dense = 6 * lm_body * T * batch + 6 * head * (T // 2) * batch + 6 * vit * patches * batch
    attn = 6 * L * D * T * T * batch + 12 * Lv * Dv * patches * patches * batch
    return float(dense + attn)
