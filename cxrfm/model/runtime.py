"""What the model runs on in THIS process: device, dtype, attention backend, fused kernels, memory.

Every hardware decision is made here, in the process that runs the model (a Ray Train worker, a Serve
replica, the CLI), never on the driver: a KubeRay head pod has no GPU while its workers do, and
transformers' attention registry is per process. `cxrfm.model.build` calls `resolve_runtime` and
stamps the result on the model (`model.runtime`), which training logs per rank and serving reports
per replica.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cxrfm.attention import AttentionBackendError, backend_name, resolve_backend, triton_runs_on
from cxrfm.config import ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


class DeviceError(RuntimeError):
    """The device asked for does not exist in this process."""


class ModelTooLarge(RuntimeError):
    """The weights do not fit the memory this process was given."""


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu", "cuda:0", "meta"
    dtype: str  # the weights' dtype here ("float32", "bfloat16"); "deepspeed" when DeepSpeed casts them
    attention: str  # the backend that runs, as config names it ("triton", "sdpa", ...)
    attn_implementation: str  # the name transformers knows it by ("cxrfm_triton", "sdpa", ...)
    attention_reason: str
    fused_rmsnorm: bool
    fused_cross_entropy: bool

    def as_dict(self) -> dict[str, str | bool]:
        return asdict(self)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto": this process's CUDA device when it sees one, else the CPU. An explicit CUDA device that
    this process cannot see is an error that says how to give it one."""
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(f"device {str(device)!r} was asked for but this process sees no CUDA GPU "
                          f"(CUDA_VISIBLE_DEVICES={visible!r}); on Ray give the worker or replica a GPU "
                          "(train.use_gpu=true, or ray_actor_options.num_gpus in the serve config), or use device 'cpu'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{torch.cuda.current_device()}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """"auto": bf16 on a GPU that has it, else fp32. None: leave the weights as built (DeepSpeed casts)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def head_dims(cfg: ModelConfig) -> tuple[int, ...]:
    """Head dims of every attention our backends would serve: the ViT's (if any) and the LM's."""
    dims = [cfg.language.hidden_size // cfg.language.num_heads]
    if cfg.vision.kind == "vit":
        dims.append(cfg.vision.hidden_size // cfg.vision.num_heads)
    return tuple(dims)


_LOGGED: set[tuple] = set()


def resolve_runtime(cfg: ModelConfig, device: torch.device, dtype: torch.dtype | None,
                    attention: str | None = None, fallback: bool = False) -> Runtime:
    """Decide attention and fused kernels for `cfg` on `device` (this process).

    attention: None uses cfg.attention. fallback=True (loading an export trained elsewhere): a backend or
    fused kernel the config names but this process cannot run falls back to what can run (auto / unfused;
    the weights are the same), with the reason logged. fallback=False: it is an error, as in training.
    """
    requested = attention or cfg.attention
    if device.type == "meta":  # shapes only: nothing will run, nothing to decide
        return Runtime("meta", str(dtype or torch.float32).removeprefix("torch."), requested, "sdpa",
                       "meta device: no attention runs", cfg.fused_rmsnorm, cfg.fused_cross_entropy)
    dims = head_dims(cfg)
    try:
        impl, reason = resolve_backend(requested, str(device), dims)
    except AttentionBackendError as e:
        if not fallback or attention is not None:
            raise
        impl, auto_reason = resolve_backend("auto", str(device), dims)
        reason = f"the export's model.attention={requested!r} cannot run here ({e}); {auto_reason}"
    fused = {}
    for name in ("fused_rmsnorm", "fused_cross_entropy"):
        wanted = getattr(cfg, name)
        why_not = triton_runs_on(str(device))
        if wanted and why_not is not None:
            if not fallback:
                raise AttentionBackendError(f"model.{name}=true is a Triton kernel and cannot run here: {why_not}; "
                                            f"set model.{name}=false")
            logger.warning("model.%s: the export asks for it but %s; using the unfused PyTorch path (same weights)",
                           name, why_not)
            wanted = False
        fused[name] = wanted
    runtime = Runtime(str(device), "deepspeed" if dtype is None else str(dtype).removeprefix("torch."), backend_name(impl), impl,
                      reason, fused["fused_rmsnorm"], fused["fused_cross_entropy"])
    key = (runtime.device, runtime.attention, runtime.attention_reason)
    if key not in _LOGGED:  # once per process (rank or replica), not once per model load
        _LOGGED.add(key)
        logger.warning("cxrfm runtime (pid %d): attention %s (%s); fused rmsnorm %s, fused cross-entropy %s; %s %s",
                       os.getpid(), runtime.attention, runtime.attention_reason, runtime.fused_rmsnorm,
                       runtime.fused_cross_entropy, runtime.device, runtime.dtype)
    return runtime


# dense bf16 tensor-core peak, TFLOP/s (datasheet, without sparsity); matched against the device name in order
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)


def gpu_peak_tflops(name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


# ---------------------------------------------------------------------------------------------------------
# Memory: refuse with one line before an out-of-memory crash


def weight_bytes(weights: str | Path, dtype: torch.dtype) -> int:
    """Bytes the weights of a safetensors file take once cast to `dtype` (reads the header only)."""
    from safetensors import safe_open

    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for s in shape:
                n *= s
            total += n * size
    return total


def memory_budget(device: torch.device) -> tuple[int, str]:
    """Bytes this process may use on `device`, and how that was found (for the error message)."""
    assigned = _ray_assigned()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        share = assigned.get("GPU")
        if share and share < 1:  # a fractional Ray GPU: the replica was given that share of the card
            budget = min(free, int(total * share))
            return budget, f"{budget / 2**30:.1f} GiB ({share:g} of a {total / 2**30:.0f} GiB GPU, {free / 2**30:.1f} GiB free)"
        return free, f"{free / 2**30:.1f} GiB free of {total / 2**30:.0f} GiB on {device}"
    import psutil

    avail = psutil.virtual_memory().available
    if assigned.get("memory"):
        budget = min(avail, int(assigned["memory"]))
        return budget, f"{budget / 2**30:.1f} GiB (ray_actor_options.memory)"
    return avail, f"{avail / 2**30:.1f} GiB of available host memory"


def _ray_assigned() -> dict[str, float]:
    try:
        import ray

        if ray.is_initialized():
            return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # noqa: BLE001 - outside a Ray worker there is nothing assigned
        pass
    return {}


def check_fits(weights: str | Path, device: torch.device, dtype: torch.dtype, what: str = "model",
               budget: int | None = None) -> int:
    """Raise ModelTooLarge (one line: model size and memory) when the weights cannot fit. Returns the bytes."""
    need = weight_bytes(weights, dtype)
    if budget is None:
        budget, where = memory_budget(device)
    else:
        where = f"{budget / 2**30:.1f} GiB (given)"
    if need > budget:
        raise ModelTooLarge(f"{what}: its weights need {need / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')} "
                            f"but this process has {where} on {device}; give it more memory (more GPUs per replica, "
                            "ray_actor_options.num_gpus) or use a smaller dtype")
    return need
