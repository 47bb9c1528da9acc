"""The one model entry point: build_model / load_export decide attention, kernels, device and dtype here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfm.attention import AttentionBackendError
from cxrfm.model.build import load_export
from cxrfm.model.runtime import DeviceError, ModelTooLarge, check_fits, resolve_device, weight_bytes


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from cxrfm.serving.cli import build_untrained_export

    return build_untrained_export(tmp_path_factory.mktemp("export") / "export")


@pytest.fixture(scope="module")
def export64(tmp_path_factory) -> Path:
    """Heads of dim 64 in the ViT and the LM (GQA): sizes our Triton kernel supports."""
    from cxrfm.serving.cli import build_untrained_export

    return build_untrained_export(tmp_path_factory.mktemp("export64") / "export", [
        "model.vision.hidden_size=128", "model.vision.num_heads=2", "model.language.num_heads=2",
        "model.language.num_kv_heads=1"])


def _with_attention(export: Path, tmp_path: Path, attention: str) -> Path:
    """A copy of the export whose config was trained with another attention backend (same weights)."""
    out = tmp_path / attention
    out.mkdir()
    for f in export.iterdir():
        (out / f.name).symlink_to(f)
    (out / "config.json").unlink()
    meta = json.loads((export / "config.json").read_text())
    meta["config"]["model"]["attention"] = attention
    (out / "config.json").write_text(json.dumps(meta))
    return out


def test_load_export_runs_the_exports_backend_and_says_so(export, tmp_path):
    model = load_export(export, device="cpu")
    assert model.runtime.attention == "sdpa" and model.runtime.device == "cpu" and model.runtime.dtype == "float32"
    eager = load_export(_with_attention(export, tmp_path, "eager"), device="cpu")
    assert eager.runtime.attention == "eager"
    assert eager.language.config._attn_implementation == "eager"  # what transformers really runs
    # an export trained with a backend this process cannot run falls back, and the reason names it
    flash = load_export(_with_attention(export, tmp_path, "flash_attn"), device="cpu")
    assert flash.runtime.attention == "sdpa" and "flash_attn" in flash.runtime.attention_reason
    # asked for explicitly, it is an error that says why
    with pytest.raises(AttentionBackendError, match="flash"):
        load_export(export, device="cpu", attention="flash_attn")


def test_triton_backend_is_registered_in_the_loading_process(export, export64):
    # TRITON_INTERPRET=1 (tests/conftest.py) makes our kernel runnable on the CPU; head dims are checked
    with pytest.raises(AttentionBackendError, match="head dims"):
        load_export(export, device="cpu", attention="triton")
    assert load_export(export, device="cpu", attention="auto").runtime.attention == "sdpa"  # auto never interprets
    model = load_export(export64, device="cpu", attention="triton")
    assert model.runtime.attn_implementation == "cxrfm_triton"
    ref = load_export(export64, device="cpu", attention="eager")
    B, T = 1, 12
    ids = torch.randint(10, 200, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    with torch.no_grad():
        got = model.language(input_ids=ids, attention_mask=mask).logits
        want = ref.language(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_bf16_weights_compute_what_fp32_does(export):
    from cxrfm.model.generate import GenerationOptions, Predictor

    fp32, bf16 = Predictor(export, device="cpu"), Predictor(export, device="cpu", dtype="bfloat16")
    assert fp32.runtime.dtype == "float32" and bf16.runtime.dtype == "bfloat16"
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    images = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (1, 3, 64, 64), dtype=np.uint8))
    present = torch.tensor([[True, False, False]])
    ids = torch.randint(10, 200, (1, 40))
    ids[0, 1:17] = fp32.model.image_token_id
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = fp32.model(ids, mask, images, present)["logits"]
        got = bf16.model(ids, mask, images, present)["logits"].float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2  # bf16 rounding, not a different function
    answer = bf16.vqa({"frontal": images[0, 0].numpy()}, "effusion?", GenerationOptions(max_new_tokens=3))
    assert 1 <= answer.tokens <= 3  # the whole generate path runs in bf16


def test_memory_check_refuses_in_one_line(export):
    need = weight_bytes(export / "model.safetensors", torch.float32)
    assert need == sum(p.numel() * 4 for p in load_export(export, device="cpu").state_dict().values())
    assert weight_bytes(export / "model.safetensors", torch.bfloat16) == need // 2
    assert check_fits(export / "model.safetensors", torch.device("cpu"), torch.float32, budget=need) == need
    with pytest.raises(ModelTooLarge) as e:
        check_fits(export / "model.safetensors", torch.device("cpu"), torch.float32, what="model base", budget=need - 1)
    message = str(e.value)
    assert "\n" not in message and "model base" in message and "GiB" in message and "float32" in message


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="num_gpus"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrfm.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ""})


def test_predict_and_eval_honour_attention_and_report_it(export, export64, tmp_path, small_shards):
    from PIL import Image

    png = tmp_path / "f.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)).save(png)
    eager = _with_attention(export, tmp_path, "eager")
    r = _cli("predict", str(eager), "--task", "vqa", "--image", str(png), "--question", "effusion?",
             "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "model: attention eager" in r.stderr and "cpu float32" in r.stderr
    r = _cli("predict", str(export64), "--task", "vqa", "--image", str(png), "--question", "effusion?",
             "--max-new-tokens", "2", "--attention", "triton")
    assert r.returncode == 0, r.stderr
    assert "model: attention triton" in r.stderr
    r = _cli("eval", str(eager), "--shards", str(small_shards), "--split", "test", "--tasks", "vqa", "--limit", "2",
             "--no-baselines", "--no-mlflow")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model: attention eager" in r.stderr


def test_the_entry_point_is_the_only_construction_path():
    """No package code builds MultitaskModel or loads an export except cxrfm/model/build.py."""
    import ast

    repo = Path(__file__).resolve().parents[2]
    offenders = []
    for folder in ("cxrfm", "serving", "kernels"):
        for path in (repo / folder).rglob("*.py"):
            if path.relative_to(repo).as_posix() == "cxrfm/model/build.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                if (isinstance(f, ast.Name) and f.id == "MultitaskModel") or (
                        isinstance(f, ast.Attribute) and f.attr == "from_pretrained"
                        and isinstance(f.value, ast.Name) and f.value.id in ("MultitaskModel", "cls")):
                    offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert offenders == [], offenders
