"""`cxrfm probe`: linear probes of view and laterality from pixels, patches and visual tokens."""

import json
import subprocess
import sys

import torch

from cxrfm.data.schema import ImageRef, Study, VQAPair
from cxrfm.eval.probe import FEATURES, probe_accuracy, targets_of


def _study(view, answers):
    return Study(study_id="s", patient_id="p", split="train", source="synthetic",
                 images=[ImageRef(role="frontal", key="frontal.png", view=view, width=8, height=8)],
                 vqa=[VQAPair(question=f"q{i}", answer=a, qtype="laterality", closed=False) for i, a in enumerate(answers)])


def test_targets_come_from_the_studys_own_annotations():
    assert targets_of(_study("AP", ["left", "left"])) == {"view": 1, "laterality": 1}
    assert targets_of(_study("PA", ["right"])) == {"view": 0, "laterality": 0}
    assert targets_of(_study("PA", ["left", "right"])) == {"view": 0}  # no single side
    assert targets_of(_study("PA", ["bilateral"])) == {"view": 0}
    assert targets_of(_study("LATERAL", [])) == {}


def test_probe_separates_a_linear_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    y = (x[:, 3] > 0).long().numpy()
    assert probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.85
    noise = torch.randn(400, 20, generator=g)
    assert probe_accuracy(noise[:300], y[:300], noise[300:], y[300:]) < 0.7


def test_probe_cli_prints_every_feature_set(export, tmp_path):
    out = subprocess.run([sys.executable, "-m", "cxrfm.cli", "probe", str(export), "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "p.json").read_text())
    assert metrics["view/n_test"] > 0
    for name in FEATURES:
        assert 0.0 <= metrics[f"view/{name}"] <= 1.0
        assert f"view/{name}" in metrics
    # PA and AP phantoms differ visibly (AP: magnified heart, higher clavicles, scapulae over the lungs)
    assert metrics["view/pixels"] >= metrics["view/majority"]
    assert "| view |" in out.stdout
