"""The ZeRO planner: model states agree with DeepSpeed's own estimators, activation counts agree with
what autograd really saves, and the plan for the M4CXR-scale spec makes sense."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from cxrfm.config import load_config
from cxrfm.model.build import IMAGE_TOKEN_ID, build_model, default_vocab_size
from cxrfm.plan import GiB, OPTIONS, activation_breakdown, make_plan, model_shape, model_states
from cxrfm.plan.cli import add_parser as add_plan_parser

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "jobs" / "pretrain-m4cxr.yaml"
SMALL = ["train.precision=bf16", "data.max_seq_len=256", "data.vocab_size=6964",
         "model.vision.image_size=128", "model.vision.patch_size=16", "model.vision.hidden_size=256",
         "model.vision.num_layers=4", "model.vision.num_heads=4", "model.vision.intermediate_size=1024",
         "model.projector.hidden_size=512", "model.language.hidden_size=512", "model.language.intermediate_size=1376",
         "model.language.num_layers=6", "model.language.num_heads=8", "model.language.num_kv_heads=4"]
# (GPUs per node, nodes): one GPU, one node of 8, eight nodes of 8.
SETUPS = [(1, 1), (8, 1), (8, 8)]


def _close(ours: float, theirs: float, rel: float = 0.05) -> bool:
    return abs(ours - theirs) <= rel * theirs


@pytest.mark.parametrize("overrides", [
    ["train.precision=bf16"],  # the tiny job
    SMALL,
    SMALL + ["model.language.tie_word_embeddings=true"],  # shared weights are counted once
], ids=["tiny", "small", "small-tied"])
def test_model_states_agree_with_deepspeed_estimators(overrides, monkeypatch, capsys):
    """DeepSpeed's *_all_live estimators run on a real module (they count parameters by storage
    address, which the meta device does not have); spies record the exact numbers they print."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    cfg = load_config(None, overrides)
    model = build_model(cfg, device="meta").to_empty(device="cpu")  # real, uninitialised storage
    shape = model_shape(cfg, model)
    seen: list[tuple[str, dict, tuple]] = []
    for module, name in ((stage_1_and_2, "estimate_zero2_model_states_mem_needs"),
                         (stage3, "estimate_zero3_model_states_mem_needs")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda _real=real, _n=name, **kw: seen.append((_n, kw, _real(**kw))) or seen[-1][2])

    for per_node, nodes in SETUPS:
        seen.clear()
        stage_1_and_2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=per_node, num_nodes=nodes)
        stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=per_node, num_nodes=nodes)
        assert "per GPU" in capsys.readouterr().out
        n = per_node * nodes
        compared = 0
        for name, kw, result in seen:
            if name.endswith("zero2_model_states_mem_needs"):
                cpu, gpu = result
                ours = model_states(shape.total, shape.largest_layer, 2, n, per_node,
                                    "cpu" if kw["cpu_offload"] else "none", "none")
            else:
                if not kw["zero_init"]:  # cxrfm builds ZeRO-3 models under deepspeed.zero.Init
                    continue
                cpu, gpu, _ = result
                ours = model_states(shape.total, shape.largest_layer, 3, n, per_node,
                                    "cpu" if kw["cpu_offload"] else "none",
                                    "cpu" if kw["cpu_offload_params"] else "none")
            assert _close(ours.gpu_total, gpu), (name, kw, ours, gpu)
            assert _close(ours.cpu_per_node, cpu), (name, kw, ours, cpu)
            compared += 1
        assert compared == 5  # ZeRO-2 with/without offload, ZeRO-3 without/optimizer/optimizer+params


def test_model_states_at_7b_scale_agree_with_deepspeed_formulas():
    """The 7B model only fits on `meta` here, where DeepSpeed's counting cannot run; given the same
    counts, the planner's rows still equal DeepSpeed's estimates for 64 GPUs."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from cxrfm.model.summary import count_parameters

    cfg = load_config(PRETRAIN)
    model = build_model(cfg, device="meta")
    shape = model_shape(cfg, model)
    assert shape.total == count_parameters(model)["total"]
    assert 6.7e9 < shape.language < 6.8e9 and 7.5e9 < shape.total < 7.9e9  # + ViT-L + the DiT decoder
    kw = {"total_params": shape.total, "num_gpus_per_node": 8, "num_nodes": 8}
    for (stage, off_opt, off_par) in OPTIONS:
        ours = model_states(shape.total, shape.largest_layer, stage, 64, 8, off_opt, off_par)
        if stage == 2:
            _, gpu = estimate_zero2_model_states_mem_needs(cpu_offload=off_opt != "none", **kw)
        elif stage == 3 and "nvme" not in (off_opt, off_par):
            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                largest_layer_params=shape.largest_layer, cpu_offload=off_opt != "none",
                cpu_offload_params=off_par != "none", zero_init=True, **kw)
        else:
            continue
        assert _close(ours.gpu_total, gpu), (stage, off_opt, off_par)


def _saved_activation_bytes(cfg, micro_batch: int, images: int, checkpointing: bool) -> int:
    """Bytes of every tensor autograd saves for backward in one training forward (weights excluded)."""
    torch.manual_seed(0)
    attn = "eager" if cfg.model.attention == "eager" else "sdpa"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.train.precision]
    model = build_model(cfg, device="cpu", dtype=dtype, attention=attn).train()
    if checkpointing:
        model.enable_activation_checkpointing()
    s, n_tok, side = cfg.data.max_seq_len, cfg.model.projector.num_tokens, cfg.model.vision.image_size
    ids = torch.randint(1036, default_vocab_size(cfg), (micro_batch, s))
    ids[:, 1:1 + images * n_tok] = IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + images * (n_tok + 1)] = -100  # the prompt: BOS, then a role marker + visual tokens per image
    present = torch.zeros(micro_batch, 3, dtype=torch.bool)
    present[:, :images] = True
    pixels = torch.randint(0, 255, (micro_batch, 3, side, side), dtype=torch.uint8)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: list[torch.Tensor] = []  # holding them keeps the allocator from reusing their addresses

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, torch.ones_like(ids), pixels, present, labels=labels)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


NO_DIFFUSION = ["model.diffusion.enabled=false", "data.tasks={report: 0.5, vqa: 0.3, grounding: 0.2}"]


@pytest.mark.parametrize("overrides,images,checkpointing", [
    ([], 1, False),
    (["train.precision=bf16"], 3, False),
    (["train.precision=bf16"], 3, True),
    (["train.precision=bf16", "model.attention=eager"], 1, False),
    (SMALL[:1] + ["model.language.hidden_size=256", "model.language.intermediate_size=688",
                  "model.language.num_layers=4", "data.max_seq_len=256", "model.vision.hidden_size=128"], 3, True),
])
def test_activation_counts_match_what_autograd_saves(overrides, images, checkpointing):
    """The closed forms for the LM, ViT, projector and loss (the decoder is traced: next test)."""
    cfg = load_config(None, NO_DIFFUSION + overrides)
    parts = activation_breakdown(cfg, 2, checkpointing, images)
    assert parts["diffusion"] == 0
    # Forward-saved tensors only: the backward transients are peaks, not saved tensors.
    estimate = sum(v for k, v in parts.items() if k != "logits_backward" and not k.endswith("_recompute"))
    assert _close(estimate, _saved_activation_bytes(cfg, 2, images, checkpointing), rel=0.06)


@pytest.mark.parametrize("overrides", [[], ["model.diffusion.backbone=dit"]], ids=["unet", "dit"])
def test_diffusion_profile_matches_a_real_forward(overrides):
    """The meta-device trace against a real CPU training forward of the same decoder: activations
    within [-5%, +25%] (the trace keeps fused-attention tensors and counts views' bases whole, so it
    errs high), FLOPs within 5%."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cxrfm.model.diffusion import DiffusionDecoder
    from cxrfm.plan import diffusion_profile

    cfg = load_config(None, overrides)
    per_sample, flops = diffusion_profile(cfg)
    torch.manual_seed(0)
    decoder = DiffusionDecoder(cfg.model.diffusion, cfg.model.language.hidden_size).train()
    n, length, side = 2, cfg.model.diffusion.max_text_tokens, cfg.data.image_size
    inputs = (torch.randint(0, 255, (n, side, side), dtype=torch.uint8),
              torch.randn(n, length, cfg.model.language.hidden_size, requires_grad=True),
              torch.ones(n, length, dtype=torch.bool))
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        decoder(*inputs)
    # The FLOP counter cannot see inside CPU's fused attention kernel: count with the math one.
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        decoder(*inputs)
    weights = {p.untyped_storage().data_ptr() for p in decoder.parameters()}
    saved = sum(nb for ptr, nb in {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.items()
                if ptr not in weights)
    assert 0.95 * saved <= n * per_sample <= 1.25 * saved
    assert _close(n * flops, counter.get_total_flops())


@pytest.fixture(scope="module")
def pretrain():
    cfg = load_config(PRETRAIN)
    return cfg, build_model(cfg, device="meta")


def test_pretrain_plan_on_64_h100(pretrain):
    cfg, model = pretrain
    plan = make_plan(cfg, 64, "h100-80gb", model=model)
    rows = {(r.stage, r.offload_optimizer, r.offload_param): r for r in plan.rows}
    assert len(rows) == len(OPTIONS)
    z1, z3 = rows[(1, "none", "none")], rows[(3, "none", "none")]
    # ZeRO-1 keeps full 16-bit weights and grads (~26 GiB) per GPU; ZeRO-3 shards them 64 ways.
    assert z1.states.params + z1.states.grads > 25 * GiB > 20 * GiB > z3.states.gpu_total
    assert z3.fits_ckpt and not z1.fits and z1.fits_ckpt
    for r in plan.rows:
        assert r.activations_ckpt < r.activations / 3
        assert r.step_s > 0 and r.days == pytest.approx(plan.token_budget / r.tokens_per_s / 86400)
        assert 0 < r.mfu <= plan.utilisation
    rec = plan.recommendation
    assert rec["fits"] and rec["stage"] in (1, 2, 3) and rec["micro_batch_size"] >= 1
    # The recommendation keeps the spec's global batch of 512 sequences.
    assert rec["micro_batch_size"] * rec["grad_accum"] * 64 == 512


def test_one_small_gpu_needs_offload(pretrain):
    cfg, model = pretrain
    plan = make_plan(cfg, 1, "l4-24gb", model=model)
    assert not any(r.fits_ckpt for r in plan.rows if r.offload_optimizer == "none")
    rec = plan.recommendation
    # 16 bytes per parameter of optimizer state cannot stay on a 24 GB card: they go to host memory.
    assert rec["fits"] and rec["offload_optimizer"] != "none" and rec["activation_checkpointing"]


def _plan_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="cxrfm")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_cli(capsys):
    rc, out, _ = _plan_cli([str(PRETRAIN), "--gpus", "64", "--gpu", "h100-80gb", "--tokens", "20B"], capsys)
    assert rc == 0
    assert "64 x h100-80gb (8 node(s) x 8)" in out and "token budget 2e+10" in out
    assert "recommended: ZeRO-" in out and "--set deepspeed.stage=" in out
    table = [line.lstrip("*").split() for line in out.splitlines() if line.lstrip("*").split()[:1] in (["1"], ["2"], ["3"])]
    assert [row[0] for row in table] == [str(o[0]) for o in OPTIONS]
    assert [line for line in out.splitlines() if line.startswith("*")][0].split()[:2] == ["*", "3"]  # the spec's ZeRO-3

    rc, out, _ = _plan_cli([str(PRETRAIN), "--gpus", "8", "--json"], capsys)
    plan = json.loads(out)
    assert rc == 0 and plan["num_gpus"] == 8 and len(plan["rows"]) == len(OPTIONS)
    assert plan["shape"]["total"] > 7.5e9


def test_plan_cli_when_nothing_fits_and_bad_input(capsys):
    # Eager attention at 16k tokens materialises 32 x 16k x 16k scores per layer: nothing can hold it.
    rc, out, _ = _plan_cli([str(PRETRAIN), "--gpus", "1", "--gpu", "l4-24gb", "--set", "model.attention=eager",
                            "--set", "data.max_seq_len=16384", "--set", "model.language.max_position_embeddings=16384"],
                           capsys)
    assert rc == 1 and "nothing fits on 1 x l4-24gb" in out
    rc, _, err = _plan_cli([str(PRETRAIN), "--set", "deepspeed.stage=4"], capsys)
    assert rc == 2 and "deepspeed.stage" in err
    with pytest.raises(SystemExit):
        _plan_cli([str(PRETRAIN), "--gpu", "tpu-v5"], capsys)
    with pytest.raises(SystemExit):
        _plan_cli([str(PRETRAIN), "--tokens", "lots"], capsys)


def test_plan_defaults_to_the_specs_gpus(capsys):
    """Without --gpus / --gpu / --gpus-per-node the plan is for the GPUs the spec's job section asks for."""
    rc, out, _ = _plan_cli([str(PRETRAIN), "--set", "job.gpu_type=a100-80gb"], capsys)
    # 64 x 80 GB hold the pretraining model: exit 0 with a recommendation (1 would mean nothing fits).
    assert rc == 0 and "on 64 x a100-80gb (8 node(s) x 8)" in out and "recommended: ZeRO-" in out
    rc, out, _ = _plan_cli([str(PRETRAIN), "--set", "job.num_nodes=16", "--set", "job.gpus_per_node=4"], capsys)
    assert rc == 0 and "on 64 x h100-80gb (16 node(s) x 4)" in out and "recommended: ZeRO-" in out


def test_interconnect_is_a_parameter_of_the_step_time(pretrain, capsys):
    """Across nodes, NCCL over TCP (one shared 100 Gb/s NIC per node) exposes far more communication than
    RDMA (a NIC per GPU); inside one node the fabric plays no part."""
    from cxrfm.plan import GPUS, inter_node_bw

    cfg, model = pretrain
    h100 = GPUS["h100-80gb"]
    assert inter_node_bw(h100, "rdma", 8) == h100.inter_node_bw
    assert inter_node_bw(h100, "tcp", 8) == pytest.approx(100e9 / 8 * 0.7 / 8)
    rdma, tcp = make_plan(cfg, 64, "h100-80gb", model=model), make_plan(cfg, 64, "h100-80gb", model=model, interconnect="tcp")
    for a, b in zip(rdma.rows, tcp.rows):
        assert b.step_s > a.step_s and b.tokens_per_s < a.tokens_per_s
        assert (a.total, a.fits, a.fits_ckpt) == (b.total, b.fits, b.fits_ckpt)  # memory does not depend on it
    z3 = {(r.stage, r.offload_optimizer): r for r in tcp.rows}[(3, "none")]
    assert z3.step_s > 10 * {(r.stage, r.offload_optimizer): r for r in rdma.rows}[(3, "none")].step_s
    one_node = [make_plan(cfg, 8, "h100-80gb", model=model, interconnect=i) for i in ("rdma", "tcp")]
    assert [r.step_s for r in one_node[0].rows] == [r.step_s for r in one_node[1].rows]
    rc, out, _ = _plan_cli([str(PRETRAIN), "--interconnect", "tcp"], capsys)
    assert rc == 0 and "between nodes: tcp at 1.1 GB/s per GPU" in out
    with pytest.raises(SystemExit):
        _plan_cli([str(PRETRAIN), "--interconnect", "carrier-pigeon"], capsys)


def test_offloaded_states_must_fit_the_nodes_host_memory(pretrain, capsys):
    """One L4 per node needs the optimizer offloaded to host memory (~184 GB for 7.7 B parameters): it fits
    the spec's 1280Gi nodes, not 128Gi ones, and the plan says so instead of recommending it."""
    from cxrfm.plan import host_usable

    cfg, model = pretrain
    big = make_plan(cfg, 1, "l4-24gb", model=model)
    assert big.host_memory == 1280 * GiB and big.recommendation["fits"]
    assert big.recommendation["offload_optimizer"] != "none"
    small = make_plan(cfg, 1, "l4-24gb", model=model, host_memory=128 * GiB)
    offloaded = [r for r in small.rows if r.offload_optimizer == "cpu"]
    assert offloaded and not any(r.fits_host or r.fits or r.fits_ckpt for r in offloaded)
    assert all(r.states.cpu_per_node > host_usable(128 * GiB, 1) for r in offloaded)
    # What still fits: states on NVMe, host memory keeping only swap buffers.
    assert small.recommendation["fits"] and small.recommendation["offload_optimizer"] == "nvme"
    assert big.recommendation["offload_optimizer"] == "cpu"
    rc, out, _ = _plan_cli([str(PRETRAIN), "--gpus", "1", "--gpu", "l4-24gb", "--gpus-per-node", "1",
                            "--set", "job.memory_per_node=128Gi"], capsys)
    assert "128 GiB (job.memory_per_node)" in out
    rows = [line for line in out.splitlines() if "cpu/" in line]
    assert rows and all("!" in line for line in rows)
