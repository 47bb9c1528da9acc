"""Linear probes: is a property of the image in the visual tokens the LM reads?

For each study's frontal image, three feature sets are probed with an L2-regularised logistic regression
fitted on the train split and scored on the test split:

    pixels             the image as the vision encoder takes it (S x S)
    vision_patches     the encoder's patch grid (P x Dv)
    projector_tokens   the visual tokens written into the LM's `<image>` slots (N x D)

Targets (binary, read from each study's own annotations so any source with them can be probed):

    view         PA vs AP, from the frontal image's view metadata
    laterality   left vs right, from studies whose open laterality questions all answer one side

High accuracy at `projector_tokens` with the VQA answers still at chance means the information reaches the LM
and is lost after it (the loss, the mixture, the prompt); low accuracy means the encoder or projector drops it.
Hand-written (a few lines of LBFGS) rather than scikit-learn, which is not a dependency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cxrfm.data.schema import Study
from cxrfm.eval.ground_truth import iter_split

TARGETS = ("view", "laterality")
FEATURES = ("pixels", "vision_patches", "projector_tokens")


def targets_of(study: Study) -> dict[str, int]:
    """{target: 0/1} for the targets this study answers; absent when it has no clear answer."""
    out = {}
    frontal = study.image("frontal")
    if frontal is not None and frontal.view in ("PA", "AP"):
        out["view"] = int(frontal.view == "AP")
    sides = {qa.answer.strip().lower() for qa in study.vqa if qa.qtype == "laterality" and not qa.closed}
    if sides in ({"left"}, {"right"}):
        out["laterality"] = int(sides == {"left"})
    return out


def _split_rows(shards: str | Path, split: str, size: int, limit: int | None) -> tuple[np.ndarray, list[dict]]:
    from PIL import Image

    images, targets = [], []
    for study, ims in iter_split(shards, split, limit):
        if "frontal" not in ims:
            continue
        im = ims["frontal"]
        if im.shape != (size, size):
            im = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
        images.append(im)
        targets.append(targets_of(study))
    if not images:
        raise ValueError(f"no {split!r} studies with a frontal image in {shards}")
    return np.stack(images), targets  # (n, S, S) uint8


@torch.no_grad()
def features(model, images: np.ndarray, batch: int = 128) -> dict[str, torch.Tensor]:
    """{feature set: (n, F) float32} for (n, S, S) uint8 frontal images."""
    x = torch.from_numpy(images)
    out = {"pixels": x.float().flatten(1) / 255.0, "vision_patches": [], "projector_tokens": []}
    device = next(model.parameters()).device
    for i in range(0, len(x), batch):
        patches = model.vision(x[i:i + batch].to(device))  # (b, P, Dv)
        out["vision_patches"].append(patches.float().flatten(1).cpu())
        frontal = torch.zeros(len(patches), dtype=torch.long, device=device)  # ROLES.index("frontal")
        out["projector_tokens"].append(model.projector(patches, frontal).float().flatten(1).cpu())  # (b, N * D)
    return {k: (torch.cat(v) if isinstance(v, list) else v) for k, v in out.items()}


def probe_accuracy(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, y_test: np.ndarray,
                   l2: float = 1e-2) -> float:
    """Test accuracy of a logistic regression on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    y = torch.as_tensor(y_train, dtype=torch.float32)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x_train @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x_test @ w + b > 0).long().numpy() == y_test).mean())


def probe(model, shards: str | Path, limit: int | None = None) -> dict[str, float]:
    """{"<target>/<feature set>": test accuracy, "<target>/majority": the majority class's accuracy,
    "<target>/n_test": count}."""
    size = model.cfg.vision.image_size
    torch.manual_seed(0)
    tr_images, tr_targets = _split_rows(shards, "train", size, limit)
    te_images, te_targets = _split_rows(shards, "test", size, limit)
    tr_feats, te_feats = features(model, tr_images), features(model, te_images)
    out: dict[str, float] = {}
    for target in TARGETS:
        tr = [i for i, t in enumerate(tr_targets) if target in t]
        te = [i for i, t in enumerate(te_targets) if target in t]
        y_tr = np.array([tr_targets[i][target] for i in tr])
        y_te = np.array([te_targets[i][target] for i in te])
        if len(set(y_tr)) < 2 or not len(y_te):
            continue  # this source does not annotate the target (or only one class)
        out[f"{target}/n_test"] = len(te)
        out[f"{target}/majority"] = float(max(y_te.mean(), 1 - y_te.mean()))
        for name in FEATURES:
            out[f"{target}/{name}"] = probe_accuracy(tr_feats[name][tr], y_tr, te_feats[name][te], y_te)
    if not out:
        raise ValueError(f"no study in {shards} annotates any of {TARGETS} on both splits")
    return out


def format_probe(metrics: dict[str, float]) -> str:
    rows = ["| target | test studies | majority | " + " | ".join(FEATURES) + " |",
            "| --- | ---: | ---: |" + " ---: |" * len(FEATURES)]
    for target in TARGETS:
        if f"{target}/n_test" in metrics:
            accs = " | ".join(f"{metrics[f'{target}/{f}']:.3f}" for f in FEATURES)
            rows.append(f"| {target} | {int(metrics[f'{target}/n_test'])} | {metrics[f'{target}/majority']:.3f} | {accs} |")
    return "\n".join(rows)
