"""The DeepSpeed config builder: every stage, offload target and batch setting reaches the dict DeepSpeed
gets, and DeepSpeed's own config parser reads back the same ZeRO stage, offload devices and batch sizes.

(The end-to-end run asks the live engine for its ZeRO stage; this covers every combination cheaply.)
"""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from cxrfm.config import load_config
from cxrfm.train.deepspeed_config import deepspeed_config, make_scheduler

GPU = ["train.use_gpu=true", "train.precision=bf16"]  # offload is only allowed with GPUs


def _build(*overrides: str) -> dict:
    return deepspeed_config(load_config(None, list(overrides)))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_is_passed_through_and_deepspeed_reads_it(stage):
    ds = _build(f"deepspeed.stage={stage}", "train.num_workers=1")
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    # Only ZeRO-3 shards the parameters, so only it needs the gather on save for the export.
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) is (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == stage
    assert parsed.zero_enabled


def test_zero_tuning_knobs_are_passed_through():
    ds = _build("deepspeed.overlap_comm=true", "deepspeed.contiguous_gradients=false",
                "deepspeed.reduce_bucket_size=1234", "train.num_workers=1")
    zero = ds["zero_optimization"]
    assert (zero["overlap_comm"], zero["contiguous_gradients"], zero["reduce_bucket_size"]) == (True, False, 1234)
    parsed = DeepSpeedConfig(ds).zero_config
    assert (parsed.overlap_comm, parsed.contiguous_gradients, parsed.reduce_bucket_size) == (True, False, 1234)


@pytest.mark.parametrize("stage, optimizer, param, want_optimizer, want_param", [
    (2, "cpu", "none", {"device": "cpu"}, None),
    (2, "nvme", "none", {"device": "nvme", "nvme_path": "/mnt/nvme"}, None),
    (3, "cpu", "cpu", {"device": "cpu"}, {"device": "cpu"}),
    (3, "none", "nvme", None, {"device": "nvme", "nvme_path": "/mnt/nvme"}),
    (3, "nvme", "nvme", {"device": "nvme", "nvme_path": "/mnt/nvme"}, {"device": "nvme", "nvme_path": "/mnt/nvme"}),
])
def test_offload_targets(stage, optimizer, param, want_optimizer, want_param):
    ds = _build(*GPU, f"deepspeed.stage={stage}", f"deepspeed.offload_optimizer={optimizer}",
                f"deepspeed.offload_param={param}", "deepspeed.nvme_path=/mnt/nvme", "train.num_workers=1",
                "model.language.tie_word_embeddings=false")
    zero = ds["zero_optimization"]
    assert zero.get("offload_optimizer") == want_optimizer
    assert zero.get("offload_param") == want_param
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == stage
    for kind, want in (("offload_optimizer", want_optimizer), ("offload_param", want_param)):
        got = getattr(parsed.zero_config, kind)
        if want is None:
            assert got is None or got.device == "none", (kind, got)
        else:
            assert got.device == want["device"]
            assert (str(got.nvme_path) if want["device"] == "nvme" else None) == want.get("nvme_path")


@pytest.mark.parametrize("micro, accum, workers", [(8, 1, 2), (2, 3, 1), (4, 4, 8), (1, 16, 64)])
def test_batch_sizes(micro, accum, workers):
    ds = _build(f"train.micro_batch_size={micro}", f"train.grad_accum={accum}", f"train.num_workers={workers}")
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    # The global batch DeepSpeed checks: micro batch x accumulation steps x data-parallel workers.
    assert ds["train_batch_size"] == micro * accum * workers
    if workers == 1:  # this process is a world of one, so DeepSpeed's own consistency check applies
        parsed = DeepSpeedConfig(ds)
        assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps,
                parsed.train_batch_size) == (micro, accum, micro * accum)


@pytest.mark.parametrize("precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_precision_and_clipping(precision, bf16, fp16):
    ds = _build("train.use_gpu=true", f"train.precision={precision}", "train.clip_grad=0.5", "train.num_workers=1")
    assert ds["bf16"] == {"enabled": bf16} and ds["fp16"] == {"enabled": fp16}
    assert ds["gradient_clipping"] == 0.5
    assert DeepSpeedConfig(ds).gradient_clipping == 0.5


def _lrs(*overrides: str, steps: int) -> list[float]:
    """The lr the real LambdaLR gives at each step, stepped as the training loop steps it."""
    cfg = load_config(None, [f"train.max_steps={steps}", "train.lr=1.0", *overrides])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = make_scheduler(cfg, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_default_schedule_is_warmup_then_cosine_over_the_rest():
    lrs = _lrs("train.warmup_steps=10", "train.min_lr_ratio=0.1", steps=110)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # it decays from the first step after warmup
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_decay_fraction_holds_the_peak_then_anneals_to_the_same_floor():
    lrs = _lrs("train.warmup_steps=10", "train.min_lr_ratio=0.1", "train.decay_fraction=0.2", steps=110)
    # 100 steps after warmup: 80 at the peak, then 20 of half-cosine down to min_lr_ratio.
    assert lrs[10:90] == pytest.approx([1.0] * 80)
    assert lrs[100] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(lrs[90:], lrs[91:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2"])
def test_decay_fraction_outside_0_1_is_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match="decay_fraction"):
        load_config(None, [f"train.decay_fraction={bad}"])
