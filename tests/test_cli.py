"""The command line as users meet it: one clear line per user error, and exit codes that scripts can trust."""

import json
import subprocess
import sys


def cxrfm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cxrfm.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_bad_config_key_fails_before_any_work():
    r = cxrfm("train", "--set", "train.max_stepz=5")
    assert r.returncode == 2
    assert "unknown config key 'train.max_stepz'" in r.stderr and "Traceback" not in r.stderr


def test_gpu_job_on_a_machine_without_gpus_is_one_clear_line():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a GPU")
    r = cxrfm("train", "--set", "train.use_gpu=true", "--set", "train.precision=bf16")
    assert r.returncode == 2
    assert "set train.use_gpu=false" in r.stderr and "Traceback" not in r.stderr


def test_missing_shard_directory(tmp_path):
    r = cxrfm("data", "verify", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "cxrfm data build" in r.stderr


def test_resume_unknown_run(tmp_path):
    r = cxrfm("train", "--resume", "no-such-run", "--set", f"train.output_dir={tmp_path}")
    assert r.returncode == 2 and "no run 'no-such-run'" in r.stderr


def test_data_build_then_verify(tmp_path):
    out = tmp_path / "shards"
    r = cxrfm("data", "build", "--source", "synthetic", "--out", str(out), "--set", "data.num_studies=30",
              "--set", "data.shard_size=10", "--set", "data.vocab_size=400")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and (out / "manifest.json").is_file()
    r = cxrfm("data", "verify", str(out))
    assert r.returncode == 0 and "30 samples ok, 0 problem(s)" in r.stdout


def test_model_summary_builds_the_7b_config_without_allocating():
    r = cxrfm("model", "summary", "--json", "--set", "model.language.hidden_size=4096",
              "--set", "model.language.intermediate_size=11008", "--set", "model.language.num_layers=32",
              "--set", "model.language.num_heads=32", "--set", "model.language.num_kv_heads=32",
              "--set", "model.language.vocab_size=32000")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["language"] == 6_738_415_616
