"""A small CXR finding classifier, trained on the phantom shards, that scores generated images.

Does a generated image show what the prompt asked for? The classifier predicts the CheXpert labels of an
image; against the labels of the prompt's report we report agreement and AUROC. Its penultimate features
give a Fréchet distance between generated and real test images. This is NOT Inception-FID: the feature
space is this classifier's, trained on our own data, so numbers are comparable only between runs that
use the same classifier file. It is trained by `cxrfm classifier train`, never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.nn import functional as F

from cxrfm.data.schema import CHEXPERT_LABELS
from cxrfm.eval.ground_truth import iter_split

# Observations a generated phantom can show (the rest are rare or not drawn).
SCORED = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Lesion", "Edema",
          "Atelectasis", "Support Devices")


class FindingClassifier(nn.Module):
    def __init__(self, image_size: int = 64, width: int = 32):
        super().__init__()
        self.image_size = image_size
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        self.features = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.GELU(), nn.MaxPool2d(2))
            for a, b in zip(chans, chans[1:])
        ])
        self.head = nn.Linear(chans[-1], len(SCORED))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # images: (n, H, W) uint8 -> (n, C) pooled features
        x = images.float().unsqueeze(1) / 127.5 - 1
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.features(x).mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))  # (n, len(SCORED)) logits


def targets(labels: dict[str, int]) -> np.ndarray:
    """Positive (1) vs everything else, for the scored observations."""
    return np.array([1.0 if labels.get(name) == 1 else 0.0 for name in SCORED], dtype=np.float32)


def train_classifier(shards: str | Path, out: str | Path, epochs: int = 8, image_size: int = 64, seed: int = 0,
                     log=print) -> Path:
    torch.manual_seed(seed)
    data = [(ims["frontal"], targets(s.labels)) for s, ims in iter_split(shards, "train") if "frontal" in ims]
    if len(data) < 16:
        raise ValueError(f"{shards}: only {len(data)} training studies with a frontal image; need at least 16")
    x = torch.as_tensor(np.stack([d[0] for d in data]))
    y = torch.as_tensor(np.stack([d[1] for d in data]))
    model = FindingClassifier(image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log(f"classifier epoch {epoch + 1}/{epochs}: bce {total / len(x):.4f}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "image_size": image_size, "labels": list(SCORED)}, out)
    return out


def load_classifier(path: str | Path) -> FindingClassifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no finding classifier at {path}; train one with: cxrfm classifier train SHARDS --out {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = FindingClassifier(blob["image_size"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n, C)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Rank-based AUROC (Mann-Whitney U); None when only one class is present."""
    pos, neg = scores[truth == 1], scores[truth == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]))) + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def score_images(model: FindingClassifier, generated: np.ndarray, prompt_labels: list[dict], real: np.ndarray) -> dict:
    """generated (n, H, W) uint8 made from prompts with `prompt_labels`; real (m, H, W) test images."""
    g = torch.as_tensor(generated)
    probs = torch.sigmoid(model(g)).numpy()
    truth = np.stack([targets(lab) for lab in prompt_labels])
    out = {"generate/label_agreement": float(((probs > 0.5) == (truth > 0.5)).mean())}
    aucs = {name: auroc(probs[:, i], truth[:, i]) for i, name in enumerate(SCORED)}
    for name, value in aucs.items():
        if value is not None:
            out[f"generate/auroc/{name}"] = value
    valid = [v for v in aucs.values() if v is not None]
    if valid:
        out["generate/auroc/macro"] = float(np.mean(valid))
    feats_g = model.embed(g).numpy()
    feats_r = model.embed(torch.as_tensor(real)).numpy()
    out["generate/frechet_classifier_features"] = frechet_distance(feats_g, feats_r)
    return out


__all__ = ["CHEXPERT_LABELS", "FindingClassifier", "SCORED", "auroc", "frechet_distance", "load_classifier",
           "score_images", "train_classifier"]
