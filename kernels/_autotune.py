"""Shared helpers for the Triton kernels: interpreter detection and autotune config lists."""

import os

import triton

# The one reader of TRITON_INTERPRET is cxrfm.attention.triton_interpreter(); it imports no kernel at its
# top (only inside the functions that run one), so importing it here makes no cycle. The variable must be
# set before triton is imported (tests/kernels/conftest.py does it on CPU-only machines) and Triton fixes
# it when the kernels are decorated, so it is taken once here and every kernel module agrees on it.
from cxrfm.attention import triton_interpreter

INTERPRET = triton_interpreter()


def configs(gpu_configs, interpret_config, fp32_config=None):
    """Autotune candidates for this process.

    Under the interpreter every program runs in numpy, so benchmarking candidates is pointless and slow:
    use a single small config (a single config makes the autotuner skip benchmarking altogether).
    fp32_config, if given, is appended last; `prune_by_dtype` keeps it alone for 4-byte inputs (the half
    precision tiles would overflow shared memory, e.g. 256 KB for head dim 128) and drops it otherwise.
    """
    if INTERPRET:
        meta, num_warps = interpret_config
        return [triton.Config(meta, num_warps=num_warps, num_stages=1)]
    if os.environ.get("CXRFM_AUTOTUNE", "1") == "0":
        # first candidate only: skips tuning and most compiles (quick GPU test runs); list the best default first
        gpu_configs = gpu_configs[:1]
    out = [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in gpu_configs]
    if fp32_config is not None:
        meta, w, s = fp32_config
        fp32 = triton.Config(meta, num_warps=w, num_stages=s)
        # marked on the object: a registry of id()s went wrong once a freed config's id was reused
        setattr(fp32, _FP32_ONLY, True)
        out.append(fp32)
    return out


_FP32_ONLY = "_cxrfm_fp32_only"  # attribute set on the config reserved for fp32 inputs


def prune_by_dtype(tensor_arg: str):
    """early_config_prune hook: the fp32-only config for fp32 `tensor_arg`, every other config otherwise."""

    def prune(configs, named_args, **kwargs):
        fp32 = named_args[tensor_arg].element_size() == 4
        keep = [c for c in configs if getattr(c, _FP32_ONLY, False) == fp32]
        return keep or configs

    return prune


def check_device(*tensors, what: str) -> None:
    """Raise a clear error when a Triton kernel cannot run on the tensors' device."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"{what}: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and INTERPRET:
        return
    raise RuntimeError(
        f"{what} is a Triton kernel: it needs CUDA tensors (got {dev.type}); "
        "for CPU testing set TRITON_INTERPRET=1 before importing triton"
    )


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two, so varlen batches do not retune every step."""
    return max(64, triton.next_power_of_2(int(n)))
