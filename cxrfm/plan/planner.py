"""ZeRO memory and time planner: will this spec fit on N GPUs of a kind, and how long will it take?

`cxrfm plan jobs/pretrain-m4cxr.yaml --gpus 64 --gpu h100-80gb` builds the model on the `meta` device
(nothing is allocated), counts its parameters, and prints per ZeRO stage and offload choice the memory
per GPU for parameters, gradients, optimizer states and activations (with and without activation
checkpointing), whether it fits, and an estimated step time, tokens/s, MFU and days for a token budget.
It then recommends a stage, micro-batch and checkpointing setting.

Model-state bytes follow DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`), so the two agree; tests/test_plan.py checks that. Activation
bytes are counted per saved tensor of the transformers ViT and Llama blocks (the recipe of Korthikanti
et al., "Reducing Activation Recomputation in Large Transformer Models", adapted to SwiGLU, GQA and
fused attention kernels); the diffusion decoder, a UNet or DiT with no short closed form, is traced
on the `meta` device instead. Step time is a roofline: FLOPs at an assumed utilisation plus the part
of the ZeRO collectives and offload traffic that does not hide behind compute. These are estimates
for choosing a setup, not measurements: `cxrfm bench train` measures.

This module holds the per-stage rows, the recommendation and the table; the hardware table and the
model-side counts (parameters, model states, activations, FLOPs) are in costs.py, the command in cli.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cxrfm.config import Config, ConfigError
from cxrfm.plan.costs import (CONTEXT_RESERVE, CPU_ADAM_PARAMS_PER_S, FRAGMENTATION, GPU, GPUS, INTERCONNECTS,
                              MICRO_BATCHES, NVME_BW, OPTIONS, GiB, ModelShape, ModelStates, _act_bytes,
                              activation_bytes, host_usable, inter_node_bw, model_shape, model_states, step_flops)


@dataclass
class Row:
    stage: int
    offload_optimizer: str
    offload_param: str
    states: ModelStates
    activations: int
    activations_ckpt: int
    buffers: int
    total: int
    total_ckpt: int
    fits: bool  # GPU memory without activation checkpointing, and host memory
    fits_ckpt: bool  # the same with checkpointing
    fits_host: bool  # host memory per node (offloaded states, checkpoint loading) within job.memory_per_node
    checkpointing: bool  # the setting the timing below assumes (off when it fits without)
    step_s: float
    tokens_per_s: float
    mfu: float
    days: float


@dataclass
class Plan:
    spec: str
    gpu: str
    num_gpus: int
    gpus_per_node: int
    precision: str
    micro_batch: int
    grad_accum: int
    seq_len: int
    images_per_sample: int
    utilisation: float
    token_budget: float
    shape: ModelShape
    rows: list[Row]
    spec_option: tuple[int, str, str] = (2, "none", "none")  # the spec's own deepspeed settings
    recommendation: dict[str, Any] = field(default_factory=dict)
    interconnect: str = "rdma"
    host_memory: int | None = None  # job.memory_per_node in bytes; None: not checked


def _buffers(cfg: Config, stage: int) -> int:
    a = _act_bytes(cfg.train.precision)
    # ZeRO-1/2 keep a reduce bucket and an all-gather bucket; ZeRO-3 adds its prefetch bucket (5e7).
    return int(2 * cfg.deepspeed.reduce_bucket_size * a + (5e7 * a if stage == 3 else 0))


def _row(cfg: Config, shape: ModelShape, gpu: GPU, n: int, per_node: int, option: tuple[int, str, str],
         micro_batch: int, grad_accum: int, images: int, util: float, budget: float,
         interconnect: str = "rdma", host_memory: int | None = None) -> Row:
    stage, off_opt, off_par = option
    prec = cfg.train.precision
    a = _act_bytes(prec)
    st = model_states(shape.total - shape.frozen, shape.largest_layer, stage, n, per_node, off_opt, off_par, prec,
                      frozen=shape.frozen)
    act = activation_bytes(cfg, micro_batch, False, images)
    act_ck = activation_bytes(cfg, micro_batch, True, images)
    buf = _buffers(cfg, stage)
    usable = gpu.memory * (1 - FRAGMENTATION) - CONTEXT_RESERVE
    total, total_ck = st.gpu_total + act + buf, st.gpu_total + act_ck + buf
    fits_host = host_memory is None or st.cpu_per_node <= host_usable(host_memory, per_node)
    fits, fits_ck = total <= usable and fits_host, total_ck <= usable and fits_host
    # Time the setting that fits without recompute if any; otherwise checkpointing, or the spec's choice.
    ckpt = (not fits and fits_ck) or (not fits and not fits_ck and (cfg.train.activation_checkpointing
                                                                    or total_ck <= usable < total))

    # Compute: model FLOPs, plus one extra forward when checkpointing recomputes.
    model_flops = step_flops(cfg, shape, images, micro_batch) * grad_accum  # per GPU per optimizer step
    hw_flops = model_flops * (4 / 3 if ckpt else 1)
    peak = gpu.peak_flops[prec]
    compute = hw_flops / (peak * util)
    # Collectives (ring algorithms move (N-1)/N of the data per GPU per pass).
    bw = gpu.intra_node_bw if n <= per_node else inter_node_bw(gpu, interconnect, per_node)
    ring = (n - 1) / n * shape.total * a / bw if n > 1 else 0.0
    passes = {1: 2.0, 2: 1.0 * grad_accum + 1.0, 3: 3.0 * grad_accum}[stage]
    comm = ring * passes
    overlap = 0.8 if (cfg.deepspeed.overlap_comm or stage == 3) else 0.5
    exposed = max(0.0, comm - overlap * compute)
    # Offload: the optimizer step runs on host cores; grads go down and 16-bit params come back.
    nodes = max(1, math.ceil(n / per_node))
    offload = 0.0
    if off_opt != "none":
        offload += shape.total / nodes / CPU_ADAM_PARAMS_PER_S + 2 * shape.total / n * a / gpu.pcie_bw
    if off_par != "none":
        offload += grad_accum * 2 * shape.total / n * a / gpu.pcie_bw  # fetch partitions for fwd and bwd
    if off_opt == "nvme":
        offload += 2 * st.nvme_per_node / NVME_BW  # read and write back the states every step
    if off_par == "nvme":
        offload += grad_accum * 2 * shape.total / nodes * a / NVME_BW
    step = compute + exposed + offload
    tokens = micro_batch * grad_accum * n * cfg.data.max_seq_len
    tps = tokens / step
    mfu = model_flops * n / (step * n * peak)
    days = budget / tps / 86400
    return Row(stage, off_opt, off_par, st, act, act_ck, buf, total, total_ck, fits, fits_ck, fits_host, ckpt, step,
               tps, mfu, days)


def host_memory_per_node(cfg: Config) -> int | None:
    """The spec's job.memory_per_node in bytes (a Kubernetes quantity); None when the spec sets none."""
    from kubernetes.utils import parse_quantity  # the Kubernetes client's own quantity parser

    return int(parse_quantity(cfg.job.memory_per_node)) if cfg.job.memory_per_node else None


def make_plan(cfg: Config, num_gpus: int | None = None, gpu: str = "h100-80gb", gpus_per_node: int | None = None,
              tokens: float | None = None, utilisation: float = 0.45, images_per_sample: int = 3,
              spec: str = "", model=None, interconnect: str = "rdma", host_memory: int | None = None) -> Plan:
    """`host_memory`: bytes per node for the host-memory check (default: the spec's job.memory_per_node)."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; known: {', '.join(GPUS)}")
    if interconnect not in INTERCONNECTS:
        raise ConfigError(f"unknown --interconnect {interconnect!r}; known: {', '.join(INTERCONNECTS)}")
    host_memory = host_memory if host_memory is not None else host_memory_per_node(cfg)
    hw = GPUS[gpu]
    n = num_gpus or cfg.train.num_workers
    if n < 1:
        raise ConfigError("--gpus must be at least 1")
    per_node = min(n, gpus_per_node or hw.gpus_per_node)
    if not 0 < utilisation <= 1:
        raise ConfigError("--utilisation must be in (0, 1], e.g. 0.45")
    shape = model_shape(cfg, model)
    mb, ga, s = cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.data.max_seq_len
    budget = tokens if tokens is not None else float(cfg.train.max_steps * mb * ga * n * s)
    rows = [_row(cfg, shape, hw, n, per_node, o, mb, ga, images_per_sample, utilisation, budget, interconnect, host_memory)
            for o in OPTIONS]
    ds = cfg.deepspeed
    plan = Plan(spec, gpu, n, per_node, cfg.train.precision, mb, ga, s, images_per_sample, utilisation, budget, shape,
                rows, (ds.stage, ds.offload_optimizer, ds.offload_param), interconnect=interconnect,
                host_memory=host_memory)
    plan.recommendation = recommend(cfg, shape, hw, n, per_node, images_per_sample, utilisation, budget, interconnect,
                                    host_memory)
    return plan


def recommend(cfg: Config, shape: ModelShape, hw: GPU, n: int, per_node: int, images: int, util: float,
              budget: float, interconnect: str = "rdma", host_memory: int | None = None) -> dict[str, Any]:
    """Fastest (stage, offload, micro-batch, checkpointing) that fits, keeping the spec's global batch
    (micro-batch x grad_accum x GPUs) as close as the micro-batch allows.

    The roofline cannot see per-micro-step overheads (kernel launches, ZeRO hooks), so candidates within
    3% of the fastest count as equal; among those the plainest wins: no offload, then the lowest stage,
    then the largest micro-batch."""
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.num_workers
    fitting: list[tuple[Row, int, int]] = []
    for option in OPTIONS:
        for mb in MICRO_BATCHES:
            if mb * n > global_batch and mb > 1:
                break
            ga = max(1, round(global_batch / (mb * n)))
            row = _row(cfg, shape, hw, n, per_node, option, mb, ga, images, util, budget, interconnect, host_memory)
            if row.fits or row.fits_ckpt:
                fitting.append((row, mb, ga))
    best = None
    if fitting:
        fastest = max(r.tokens_per_s for r, _, _ in fitting)
        near = [c for c in fitting if c[0].tokens_per_s >= 0.97 * fastest]
        best = min(near, key=lambda c: (c[0].offload_optimizer != "none", c[0].stage, -c[1]))
    if best is None:
        host = "" if host_memory is None else f" and {host_memory / GiB:.0f} GiB of host memory per node"
        return {"fits": False, "reason": f"nothing fits on {n} x {hw.name}{host}, even ZeRO-3 with NVMe offload and "
                                         "micro-batch 1: add GPUs or host memory (job.memory_per_node), shorten "
                                         "data.max_seq_len or shrink the model"}
    row, mb, ga = best
    return {"fits": True, "stage": row.stage, "offload_optimizer": row.offload_optimizer,
            "offload_param": row.offload_param, "micro_batch_size": mb, "grad_accum": ga,
            "activation_checkpointing": row.checkpointing, "tokens_per_s": row.tokens_per_s,
            "step_s": row.step_s, "days": row.days}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _g(x: float) -> str:
    return f"{x / GiB:6.1f}" if x >= 0.1 * GiB or x == 0 else f"{x / GiB:6.3f}"


def format_plan(plan: Plan) -> str:
    hw, sh = GPUS[plan.gpu], plan.shape
    nodes = math.ceil(plan.num_gpus / plan.gpus_per_node)
    usable = hw.memory * (1 - FRAGMENTATION) - CONTEXT_RESERVE
    out = [
        f"plan for {plan.spec or 'config'} on {plan.num_gpus} x {plan.gpu} ({nodes} node(s) x {plan.gpus_per_node}); "
        f"{hw.memory / GiB:.1f} GiB per GPU, {usable / GiB:.1f} GiB usable after context and fragmentation",
        f"model: {_count(sh.total)} parameters (vision {_count(sh.vision)}, projector {_count(sh.projector)}, "
        f"language {_count(sh.language)}, diffusion {_count(sh.diffusion)}, {_count(sh.frozen)} frozen); "
        f"largest layer {_count(sh.largest_layer)}",
        f"batch: {plan.precision}, sequence {plan.seq_len}, micro-batch {plan.micro_batch}, grad_accum {plan.grad_accum}, "
        f"{plan.images_per_sample} image(s) per sample (worst case for memory)",
        f"assumed utilisation {plan.utilisation:.0%} of {hw.peak_flops[plan.precision] / 1e12:.0f} TFLOPS peak on executed "
        f"FLOPs; token budget {plan.token_budget:.3g} tokens",
        f"between nodes: {plan.interconnect} at {inter_node_bw(hw, plan.interconnect, plan.gpus_per_node) / 1e9:.1f} GB/s "
        f"per GPU; host memory per node: " + ("not checked (no job.memory_per_node)" if plan.host_memory is None else
        f"{plan.host_memory / GiB:.0f} GiB (job.memory_per_node), {host_usable(plan.host_memory, plan.gpus_per_node) / GiB:.0f} "
        "GiB for model states after Ray's object store and the training processes"),
        "",
        "memory per GPU in GiB (act = activations; ckpt = activation checkpointing); host/NVMe per node in GiB "
        "(! = over the host memory); * = the spec's setting",
        f"{'stage':>5} {'offload':>10} {'params':>6} {'grads':>6} {'optim':>6} {'states':>6} {'act':>6} "
        f"{'total':>6} {'fits':>4} {'act+ck':>6} {'total':>6} {'fits':>4} {'host':>6} {'nvme':>6} "
        f"{'ckpt':>4} {'step s':>7} {'tokens/s':>9} {'MFU':>5} {'days':>7}",
    ]
    for r in plan.rows:
        off = "-" if r.offload_optimizer == "none" else f"{r.offload_optimizer}/{r.offload_param}"
        mark = "*" if (r.stage, r.offload_optimizer, r.offload_param) == plan.spec_option else " "
        out.append(
            f"{mark}{r.stage:>4} {off:>10} {_g(r.states.params)} {_g(r.states.grads)} {_g(r.states.optimizer)} "
            f"{_g(r.states.gpu_total)} {_g(r.activations)} {_g(r.total)} {'yes' if r.fits else 'no':>4} "
            f"{_g(r.activations_ckpt)} {_g(r.total_ckpt)} {'yes' if r.fits_ckpt else 'no':>4} "
            f"{_g(r.states.cpu_per_node)}{' ' if r.fits_host else '!'}{_g(r.states.nvme_per_node)} "
            f"{'on' if r.checkpointing else 'off':>4} "
            f"{r.step_s:7.2f} {r.tokens_per_s:9.0f} {r.mfu:5.1%} {r.days:7.1f}")
    rec = plan.recommendation
    out.append("")
    if rec.get("fits"):
        off = "" if rec["offload_optimizer"] == "none" else \
            f" deepspeed.offload_optimizer={rec['offload_optimizer']} deepspeed.offload_param={rec['offload_param']}"
        out.append(f"recommended: ZeRO-{rec['stage']}{off}, micro-batch {rec['micro_batch_size']}, grad_accum "
                   f"{rec['grad_accum']}, activation checkpointing {'on' if rec['activation_checkpointing'] else 'off'}: "
                   f"~{rec['tokens_per_s']:.0f} tokens/s, {rec['days']:.1f} days for the budget")
        out.append(f"  --set deepspeed.stage={rec['stage']}{off.replace(' deepspeed', ' --set deepspeed')} "
                   f"--set train.micro_batch_size={rec['micro_batch_size']} --set train.grad_accum={rec['grad_accum']} "
                   f"--set train.activation_checkpointing={str(rec['activation_checkpointing']).lower()}")
    else:
        out.append(f"recommended: {rec['reason']}")
    out.append("estimates, not measurements: check with `cxrfm bench train` on one node before a long run")
    return "\n".join(out)
