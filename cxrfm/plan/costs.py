"""The planner's model side: GPU kinds, and the bytes and FLOPs of one training step of a spec.

Model-state bytes per ZeRO stage and offload choice (`model_states`) follow DeepSpeed's estimators;
activation bytes are counted per saved tensor of the ViT and Llama blocks (`activation_breakdown`)
and traced on the `meta` device for the diffusion decoder (`diffusion_profile`); `step_flops` is the
model FLOPs of one micro-batch. planner.py turns these into the per-stage table and recommendation.
tests/test_plan.py checks them against DeepSpeed and against what autograd really saves.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from cxrfm.config import Config, DiffusionConfig

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
# The fabric between nodes: "rdma" (InfiniBand / RoCE / EFA, one NIC per GPU; the GPU's inter_node_bw)
# or "tcp" (NCCL's socket transport over the node's one Ethernet NIC, shared by all its GPUs).
INTERCONNECTS = ("rdma", "tcp")
TCP_NODE_BW = 100e9 / 8 * 0.7  # bytes/s per node: a 100 Gb/s NIC at the ~70% NCCL sockets reach
# Host memory per node that model states may take: Ray's object store reserves 30% of the pod's memory
# by default, and each training process keeps a few GiB of its own (CUDA context, torch, data loader).
HOST_USABLE_SHARE = 0.7
HOST_PER_PROCESS = 4 * GiB


def inter_node_bw(gpu: GPU, interconnect: str, gpus_per_node: int) -> float:
    """Bytes/s per GPU for collectives that cross nodes (the ring's bottleneck link, per GPU)."""
    if interconnect not in INTERCONNECTS:
        raise ValueError(f"unknown interconnect {interconnect!r}; known: {', '.join(INTERCONNECTS)}")
    return gpu.inter_node_bw if interconnect == "rdma" else TCP_NODE_BW / gpus_per_node


def host_usable(memory_per_node: int, gpus_per_node: int) -> int:
    """Bytes of a node's memory the planner lets model states (offload, checkpoint loading) use."""
    return int(memory_per_node * HOST_USABLE_SHARE - gpus_per_node * HOST_PER_PROCESS)


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
        from cxrfm.model.build import build_model  # transformers: `cxrfm --help` imports this module

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

    from cxrfm.model.diffusion import DiffusionDecoder  # diffusers (see model_shape)

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
    from cxrfm.data.samples import LM_TASKS  # both load transformers (see model_shape)
    from cxrfm.model.build import default_vocab_size

    _needs_vit(cfg)
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


def _needs_vit(cfg: Config) -> None:
    if cfg.model.vision.kind != "vit":
        raise ValueError(f"the planner models a ViT vision encoder; this config has model.vision.kind="
                         f"{cfg.model.vision.kind!r} (a CPU-scale encoder). Plan a GPU spec with kind: vit")


def activation_bytes(cfg: Config, micro_batch: int, checkpointing: bool, images_per_sample: int = 3,
                     vocab_size: int | None = None) -> int:
    return sum(activation_breakdown(cfg, micro_batch, checkpointing, images_per_sample, vocab_size).values())


def step_flops(cfg: Config, shape: ModelShape, images_per_sample: int, micro_batch: int) -> float:
    """Model FLOPs to train on one micro-batch (forward + backward = 3x forward, no recompute)."""
    _needs_vit(cfg)
    lm, vis, s = cfg.model.language, cfg.model.vision, cfg.data.max_seq_len
    t = (vis.image_size // vis.patch_size) ** 2 + 1
    lm_flops = 6 * (shape.language - shape.embedding) * s + 6 * lm.num_layers * s * s * lm.hidden_size  # causal
    vit_flops = 6 * shape.vision * t + 12 * vis.num_layers * t * t * vis.hidden_size
    proj_flops = 6 * shape.projector * cfg.model.projector.num_tokens
    # The decoder trains on the expected share of `generate` rows, and on one blank row when there are none.
    share = cfg.data.tasks.get("generate", 0.0) / sum(cfg.data.tasks.values())
    diffusion = 3 * diffusion_profile(cfg)[1] * max(1.0, micro_batch * share) if shape.diffusion else 0.0
    return micro_batch * (lm_flops + images_per_sample * (vit_flops + proj_flops)) + diffusion
