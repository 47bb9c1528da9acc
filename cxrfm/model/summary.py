"""Parameter counts per component, computed on the `meta` device (no weights allocated)."""

from __future__ import annotations

from torch import nn

from cxrfm.config import Config


def count_parameters(model: nn.Module) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def summarize(cfg: Config, vocab_size: int | None = None) -> dict[str, int]:
    from cxrfm.model.build import build_model

    return count_parameters(build_model(cfg, vocab_size, device="meta"))


def format_summary(counts: dict[str, int]) -> str:
    total = counts["total"]
    rows = [f"{'component':<12} {'parameters':>16} {'share':>7}"]
    for name, n in counts.items():
        rows.append(f"{name:<12} {n:>16,} {100 * n / max(total, 1):>6.1f}%")
    return "\n".join(rows)
