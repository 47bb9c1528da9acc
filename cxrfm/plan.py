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
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from cxrfm.config import Config, ConfigError, load_config

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    """One accelerator kind: usable memory (as nvidia-smi reports it), dense peak FLOP/s, link speeds."""

    name: str
    memory: int  # bytes
    peak_flops: dict[str, float]  # per training precision, dense tensor-core peak
    intra_node_bw: float  # bytes/s per GPU for collectives inside a node (NVLink, or PCIe without it)
    inter_node_bw: float  # bytes/s per GPU across nodes (one NIC per GPU on these systems)
    pcie_bw: float  # bytes/s host <-> GPU, what offload traffic crosses
    gpus_per_node: int = 8


MiB = 2**20
GPUS: dict[str, GPU] = {g.name: g for g in (
    # H100 SXM: 989 TFLOPS bf16 dense, NVLink 4 at 450 GB/s per direction, 400 Gb/s NIC per GPU, PCIe 5.
    GPU("h100-80gb", 81559 * MiB, {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}, 450e9, 50e9, 50e9),
    GPU("h200-141gb", 143771 * MiB, {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}, 450e9, 50e9, 50e9),
    # A100 SXM: 312 TFLOPS bf16 dense, NVLink 3 at 300 GB/s, 200 Gb/s NIC per GPU, PCIe 4.
    GPU("a100-80gb", 81920 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}, 300e9, 25e9, 25e9),
    GPU("a100-40gb", 40536 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}, 300e9, 25e9, 25e9),
    # L4: no NVLink, collectives cross PCIe; typical cloud nodes carry 8 on 100-200 Gb/s.
    GPU("l4-24gb", 23034 * MiB, {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}, 25e9, 12.5e9, 25e9),
)}

# (stage, offload_optimizer, offload_param): the rows the planner compares.
OPTIONS: tuple[tuple[int, str, str], ...] = (
    (1, "none", "none"), (2, "none", "none"), (2, "cpu", "none"),
    (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu"), (3, "nvme", "nvme"),
)
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
CONTEXT_RESERVE = int(1.5 * GiB)  # CUDA context, cuBLAS/NCCL workspaces
FRAGMENTATION = 0.05  # caching-allocator slack, as a share of the GPU
CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeedCPUAdam throughput per node (AVX-512, all cores)
NVME_BW = 6e9  # bytes/s per node, one PCIe 4 NVMe drive (read and write alike)
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's `additional_buffer_factor` for host memory


@dataclass
class ModelShape:
    total: int  # unique parameters (tied weights once), as DeepSpeed's model_to_params counts them
    largest_layer: int  # most parameters held directly by one module (what ZeRO-3 gathers at once)
    vision: int
    projector: int
    language: int
    embedding: int  # input embedding table: a lookup, not matmul FLOPs
    diffusion: int = 0  # the text-to-CXR decoder, its frozen VAE included
    frozen: int = 0  # parameters that get no gradient (the VAE): 16-bit copies only, no optimizer states


def model_shape(cfg: Config, model=None) -> ModelShape:
    """Count parameters on the `meta` device: the 7B model costs no memory here."""
    import torch

    if model is None:
        from cxrfm.model.build import build_model

        model = build_model(cfg, device=torch.device("meta"))
    unique = {id(p): p for p in model.parameters()}
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)

    def count(mod) -> int:
        return sum({id(p): p.numel() for p in mod.parameters()}.values()) if mod is not None else 0

    return ModelShape(total=sum(p.numel() for p in unique.values()), largest_layer=largest,
                      vision=count(model.vision), projector=count(model.projector), language=count(model.language),
                      embedding=model.language.get_input_embeddings().weight.numel(),
                      diffusion=count(getattr(model, "diffusion", None)),
                      frozen=sum(p.numel() for p in unique.values() if not p.requires_grad))


@dataclass
class ModelStates:
    """Bytes per GPU for the model states, and host/NVMe bytes per node for what is offloaded."""

    params: int
    grads: int
    optimizer: int
    cpu_per_node: int
    nvme_per_node: int = 0

    @property
    def gpu_total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_states(total: int, largest_layer: int, stage: int, num_gpus: int, gpus_per_node: int,
                 offload_optimizer: str = "none", offload_param: str = "none",
                 precision: str = "bf16", frozen: int = 0) -> ModelStates:
    """Mixed precision Adam: 2 bytes 16-bit params + 2 bytes 16-bit grads + 4 bytes fp32 grads
    + 4 bytes fp32 master params + 8 bytes Adam moments, partitioned as each ZeRO stage does.
    Totals equal DeepSpeed's estimators (stage 2: 2P + 18P/N; stage 3: 4L + 18P/N, where ZeRO-3
    keeps the partition's gradients in fp32 only; offload: 2P, 4L + 2P/N, 4L); the split into
    params/grads/optimizer is ours. fp32 training has no master copy and no separate 16-bit
    copies: 4 + 4 + 8 bytes. `total` counts trainable parameters; `frozen` ones (DeepSpeed's
    estimators treat them as trainable) only add their 16-bit copy, partitioned under ZeRO-3."""
    P, L, N = total, largest_layer, num_gpus
    nodes = max(1, math.ceil(N / gpus_per_node))
    if precision == "fp32":
        p16, g16, g32, master = 4, 4, 0, 0
    else:
        p16, g16, g32, master = 2, 2, 4, 4
    opt = master + 8  # fp32 master params + Adam m and v
    off_opt, off_par = offload_optimizer != "none", offload_param != "none"
    nvme = 0
    if stage in (1, 2):
        params = p16 * P
        if off_opt:
            # Gradients stream to host per bucket; only the 16-bit parameters stay on the GPU.
            grads = g16 * P if stage == 1 else 0
            optimizer = 0
            cpu = P * max(4 * N, 16) * DS_BUFFER_FACTOR
        else:
            grads = (g16 * P if stage == 1 else g16 * P // N) + g32 * P // N
            optimizer = opt * P // N
            cpu = P * 4 * gpus_per_node * DS_BUFFER_FACTOR  # loading a checkpoint on every local rank
    else:
        # ZeRO-3 gathers one layer at a time (16-bit params, then its 16-bit grads): 4L in all.
        gathered = p16 * L
        params = gathered + (0 if off_par else p16 * P // N)
        # The partition's gradients live in fp32 only (16-bit ones are reduce-scattered per bucket).
        grads = (g16 * L) + (0 if off_opt else (g32 or g16) * P // N)
        optimizer = 0 if off_opt else opt * P // N
        if off_par:
            cpu = P * 18 / nodes * DS_BUFFER_FACTOR
        elif off_opt:
            cpu = P * 16 / nodes * DS_BUFFER_FACTOR
        else:
            cpu = L * 4 * gpus_per_node * DS_BUFFER_FACTOR  # zero.Init: one layer materialised at a time
    if "nvme" in (offload_optimizer, offload_param):
        # States live on the drive; host memory keeps pinned swap buffers of a few layers.
        nvme = (opt + g32) * P // nodes + (p16 * P // nodes if offload_param == "nvme" else 0)
        cpu = L * 4 * gpus_per_node * DS_BUFFER_FACTOR * 4
    params += p16 * frozen // (N if stage == 3 else 1)
    return ModelStates(int(params), int(grads), int(optimizer), int(cpu), int(nvme))


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def answer_tokens(cfg: Config, images_per_sample: int) -> int:
    """Most loss-bearing tokens a sample can have: the prompt holds at least BOS plus, per image, a
    role marker and `num_tokens` visual tokens (cxrfm.data.samples); logits exist only for the rest."""
    return max(1, cfg.data.max_seq_len - 1 - images_per_sample * (cfg.model.projector.num_tokens + 1))


class _FusedAttention:
    """Stand-in for scaled_dot_product_attention while tracing on `meta`: keeps what a fused GPU kernel
    keeps for backward (q, k, v, output, row log-sum-exp), never the score matrix that the meta
    device's math decomposition would save."""

    flops = 0

    @staticmethod
    def sdpa(q, k, v, *args, **kwargs):
        import torch

        _FusedAttention.flops += 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
                ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
                return out

            @staticmethod
            def backward(ctx, grad):
                q, k, v, _, _ = ctx.saved_tensors
                return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

        return Fn.apply(q, k, v)


def diffusion_profile(cfg: Config) -> tuple[int, float]:
    """(activation bytes, forward FLOPs) per `generate` sample of the diffusion decoder, or (0, 0).

    A UNet or DiT has no short closed form, so its training forward is run on the `meta` device
    (shapes only, no memory) under a saved-tensor hook and torch's FlopCounterMode."""
    d = cfg.model.diffusion
    if not d.enabled:
        return 0, 0.0
    return _diffusion_profile(d.model_dump_json(), cfg.model.language.hidden_size, cfg.data.image_size,
                              cfg.train.precision)


@functools.lru_cache(maxsize=16)
def _diffusion_profile(diffusion_json: str, cond_dim: int, image_size: int, precision: str) -> tuple[int, float]:
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from cxrfm.config import DiffusionConfig
    from cxrfm.model.diffusion import DiffusionDecoder

    dcfg = DiffusionConfig.model_validate_json(diffusion_json)
    with torch.device("meta"):
        decoder = DiffusionDecoder(dcfg, cond_dim)
    decoder = decoder.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]).train()
    n, length = 2, dcfg.max_text_tokens
    kept: list = []
    real, _FusedAttention.flops = F.scaled_dot_product_attention, 0
    F.scaled_dot_product_attention = _FusedAttention.sdpa
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            decoder(torch.zeros(n, image_size, image_size, dtype=torch.uint8, device="meta"),
                    torch.zeros(n, length, cond_dim, device="meta", requires_grad=True),
                    torch.ones(n, length, dtype=torch.bool, device="meta"))
    finally:
        F.scaled_dot_product_attention = real
    # Views share their base's memory: count each base once (meta tensors have no addresses).
    bases = {id(b): b.numel() * b.element_size() for b in (t if t._base is None else t._base for t in kept)}
    return sum(bases.values()) // n, (counter.get_total_flops() + _FusedAttention.flops) / n


def activation_breakdown(cfg: Config, micro_batch: int, checkpointing: bool, images_per_sample: int = 3,
                         vocab_size: int | None = None) -> dict[str, int]:
    """Bytes of activations on one GPU for one micro-batch, by part of the model.

    Per Llama block and token, the tensors autograd keeps: inputs of both RMSNorms and of the q/k/v,
    o, gate/up and down projections, q, k, v for attention, gate, up, SiLU(gate) and their product:
    6h + 2kv + 4i values, plus the fp32 copy each transformers RMSNorm keeps (not the fused one).
    Per ViT block and token: 8h + 2i. Eager attention adds the score matrices (fused kernels keep
    only row statistics). Logits exist for answer tokens only: the loss keeps their fp32
    log-probabilities (4V bytes each), and its backward briefly adds their fp32 gradient and its
    16-bit cast (`logits_backward`); the fused linear + cross-entropy kernel keeps instead the hidden
    gradient and one V x h weight gradient per task. With checkpointing each block keeps only its
    input, plus one block's full activations while backward recomputes it (`*_recompute`). The
    diffusion decoder is traced instead (`diffusion_profile`); checkpointing does not cover it.
    tests/test_plan.py checks these counts against the tensors autograd really saves."""
    from cxrfm.data.samples import LM_TASKS
    from cxrfm.model.build import default_vocab_size

    a = _act_bytes(cfg.train.precision)
    m, lm, vis, proj = cfg.model, cfg.model.language, cfg.model.vision, cfg.model.projector
    eager = m.attention == "eager"
    V = vocab_size or default_vocab_size(cfg)
    s, n_ans = cfg.data.max_seq_len, answer_tokens(cfg, images_per_sample)
    h, i, kv = lm.hidden_size, lm.intermediate_size, lm.num_kv_heads * (lm.hidden_size // lm.num_heads)
    norm_fp32 = 0 if m.fused_rmsnorm else 4 * h  # the upcast input (16-bit) or the normalised values (fp32)
    lm_layer = s * ((6 * h + 2 * kv + 4 * i) * a + 2 * norm_fp32) + (lm.num_heads * s * s * (4 + a) if eager else 0)
    if m.fused_cross_entropy:
        head = s * (h * a + norm_fp32) + n_ans * h * a + len(LM_TASKS) * V * h * a / micro_batch
        head_backward = 0  # chunked: the logits never exist whole
    else:
        head = s * (h * a + norm_fp32) + n_ans * (h * a + 4 * V)  # final norm; answer hidden states, log-probs
        head_backward = n_ans * V * (4 + a)
    t = (vis.image_size // vis.patch_size) ** 2 + 1
    hv, iv = vis.hidden_size, vis.intermediate_size
    vit_layer = t * (8 * hv + 2 * iv) * a + (vis.num_heads * t * t * 2 * a if eager else 0)
    projector = ((t - 1) * hv + proj.num_tokens * (hv + 2 * proj.hidden_size)) * a  # pooling input, MLP
    if checkpointing:
        parts = {"language": lm.num_layers * s * h * a, "language_recompute": lm_layer,
                 "vision": images_per_sample * vis.num_layers * t * hv * a, "vision_recompute": vit_layer}
    else:
        parts = {"language": lm.num_layers * lm_layer, "vision": images_per_sample * vis.num_layers * vit_layer}
    parts.update(logits=head, logits_backward=head_backward, projector=images_per_sample * projector)
    # Worst case: every row of the micro-batch is a `generate` row (the LM still runs on all of them).
    parts["diffusion"] = diffusion_profile(cfg)[0]
    return {k: int(micro_batch * v) for k, v in parts.items()}


def activation_bytes(cfg: Config, micro_batch: int, checkpointing: bool, images_per_sample: int = 3,
                     vocab_size: int | None = None) -> int:
    return sum(activation_breakdown(cfg, micro_batch, checkpointing, images_per_sample, vocab_size).values())


def step_flops(cfg: Config, shape: ModelShape, images_per_sample: int, micro_batch: int) -> float:
    """Model FLOPs to train on one micro-batch (forward + backward = 3x forward, no recompute)."""
    lm, vis, s = cfg.model.language, cfg.model.vision, cfg.data.max_seq_len
    t = (vis.image_size // vis.patch_size) ** 2 + 1
    lm_flops = 6 * (shape.language - shape.embedding) * s + 6 * lm.num_layers * s * s * lm.hidden_size  # causal
    vit_flops = 6 * shape.vision * t + 12 * vis.num_layers * t * t * vis.hidden_size
    proj_flops = 6 * shape.projector * cfg.model.projector.num_tokens
    # The decoder trains on the expected share of `generate` rows, and on one blank row when there are none.
    share = cfg.data.tasks.get("generate", 0.0) / sum(cfg.data.tasks.values())
    diffusion = 3 * diffusion_profile(cfg)[1] * max(1.0, micro_batch * share) if shape.diffusion else 0.0
    return micro_batch * (lm_flops + images_per_sample * (vit_flops + proj_flops)) + diffusion


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
    fits: bool
    fits_ckpt: bool
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


def _buffers(cfg: Config, stage: int) -> int:
    a = _act_bytes(cfg.train.precision)
    # ZeRO-1/2 keep a reduce bucket and an all-gather bucket; ZeRO-3 adds its prefetch bucket (5e7).
    return int(2 * cfg.deepspeed.reduce_bucket_size * a + (5e7 * a if stage == 3 else 0))


def _row(cfg: Config, shape: ModelShape, gpu: GPU, n: int, per_node: int, option: tuple[int, str, str],
         micro_batch: int, grad_accum: int, images: int, util: float, budget: float) -> Row:
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
    fits, fits_ck = total <= usable, total_ck <= usable
    # Time the setting that fits without recompute if any; otherwise checkpointing, or the spec's choice.
    ckpt = (not fits and fits_ck) or (not fits and not fits_ck and cfg.train.activation_checkpointing)

    # Compute: model FLOPs, plus one extra forward when checkpointing recomputes.
    model_flops = step_flops(cfg, shape, images, micro_batch) * grad_accum  # per GPU per optimizer step
    hw_flops = model_flops * (4 / 3 if ckpt else 1)
    peak = gpu.peak_flops[prec]
    compute = hw_flops / (peak * util)
    # Collectives (ring algorithms move (N-1)/N of the data per GPU per pass).
    bw = gpu.intra_node_bw if n <= per_node else gpu.inter_node_bw
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
    return Row(stage, off_opt, off_par, st, act, act_ck, buf, total, total_ck, fits, fits_ck, ckpt, step, tps, mfu, days)


def make_plan(cfg: Config, num_gpus: int | None = None, gpu: str = "h100-80gb", gpus_per_node: int | None = None,
              tokens: float | None = None, utilisation: float = 0.45, images_per_sample: int = 3,
              spec: str = "", model=None) -> Plan:
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; known: {', '.join(GPUS)}")
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
    rows = [_row(cfg, shape, hw, n, per_node, o, mb, ga, images_per_sample, utilisation, budget) for o in OPTIONS]
    ds = cfg.deepspeed
    plan = Plan(spec, gpu, n, per_node, cfg.train.precision, mb, ga, s, images_per_sample, utilisation, budget, shape,
                rows, (ds.stage, ds.offload_optimizer, ds.offload_param))
    plan.recommendation = recommend(cfg, shape, hw, n, per_node, images_per_sample, utilisation, budget)
    return plan


def recommend(cfg: Config, shape: ModelShape, hw: GPU, n: int, per_node: int, images: int, util: float,
              budget: float) -> dict[str, Any]:
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
            row = _row(cfg, shape, hw, n, per_node, option, mb, ga, images, util, budget)
            if row.fits or row.fits_ckpt:
                fitting.append((row, mb, ga))
    best = None
    if fitting:
        fastest = max(r.tokens_per_s for r, _, _ in fitting)
        near = [c for c in fitting if c[0].tokens_per_s >= 0.97 * fastest]
        best = min(near, key=lambda c: (c[0].offload_optimizer != "none", c[0].stage, -c[1]))
    if best is None:
        return {"fits": False, "reason": f"nothing fits on {n} x {hw.name}, even ZeRO-3 with NVMe offload and "
                                         "micro-batch 1: add GPUs, shorten data.max_seq_len or shrink the model"}
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
        "",
        "memory per GPU in GiB (act = activations; ckpt = activation checkpointing); host/NVMe per node in GiB; "
        "* = the spec's setting",
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
            f"{_g(r.states.cpu_per_node)} {_g(r.states.nvme_per_node)} {'on' if r.checkpointing else 'off':>4} "
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


def _tokens(text: str) -> float:
    """'2e10', '20B', '500M' -> tokens."""
    units = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens {text!r}: use a number like 2e10, 20B or 500M") from None


def run_plan(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.spec, args.set)
        plan = make_plan(cfg, args.gpus, args.gpu, args.gpus_per_node, args.tokens, args.utilisation,
                         args.images_per_sample, spec=str(args.spec))
    except ConfigError as err:
        print(f"cxrfm plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(plan), indent=2))
    else:
        print(format_plan(plan))
    return 0 if plan.recommendation.get("fits") else 1


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="ZeRO memory and time plan for a job spec on N GPUs",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=None, help="job YAML (default jobs/tiny.yaml)")
    p.add_argument("--gpus", type=int, default=None, help="total GPUs (default: the spec's train.num_workers)")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU kind")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default 8)")
    p.add_argument("--tokens", type=_tokens, default=None,
                   help="token budget for the days column, e.g. 20B (default: train.max_steps x tokens per step)")
    p.add_argument("--utilisation", type=float, default=0.45,
                   help="share of peak FLOP/s the GPUs sustain on executed FLOPs (default 0.45)")
    p.add_argument("--images-per-sample", type=int, default=3, choices=(1, 2, 3),
                   help="images encoded per sample: frontal, lateral, prior (default 3, the worst case)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)
    return p
