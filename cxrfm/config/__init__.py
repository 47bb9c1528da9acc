"""One typed config tree for every part of cxrfm.

Each component reads its own small section (data, model.vision, model.projector, model.language,
train, deepspeed, tracking, job). A YAML file in `jobs/` fills it; `--set a.b=c` overrides any leaf.
Unknown keys and bad values fail here, before any work starts, naming the key and what is allowed.
The model's sections live in `cxrfm/config/model.py`; all are importable from `cxrfm.config`.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cxrfm.data.schema import TASKS
from cxrfm.data.sources import check_source_name

from .base import ConfigError, _Section  # noqa: F401 - re-exported
from .model import DiffusionConfig, LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig  # noqa: F401 - re-exported


class SourceMix(_Section):
    """One entry of data.sources: built shards of one source and how often training draws from them."""

    name: str
    weight: float = Field(gt=0, description="relative sampling weight; weights need not sum to 1")
    shards: str = Field(description="shard directory built by `cxrfm data build --source NAME`")

    @model_validator(mode="after")
    def _known(self) -> "SourceMix":
        check_source_name(self.name)
        return self


class DataConfig(_Section):
    source: str = Field("synthetic", description="converter name, see cxrfm.data.sources.SOURCES")
    root: str | None = None  # raw data root for real sources (needed by `cxrfm data build`, not by training)
    num_workers: int | None = Field(None, ge=0, description="processes loading shards in `cxrfm data build`; "
                                    "default min(4, CPUs); 0 or 1 builds in this process")
    # A mixture of built sources for training; empty means the one directory in data.shards.
    sources: list[SourceMix] = Field(default_factory=list)
    shards: str = "runs/tiny/shards"  # where shards are written / read
    num_studies: int = Field(600, ge=1)
    image_size: int = Field(128, ge=32, description="stored image side in pixels")
    shard_size: int = Field(100, ge=1, description="studies per shard")
    seed: int = 0
    max_seq_len: int = Field(192, ge=16, description="tokens per sample, prompt + answer")
    max_turns: int = Field(1, ge=1, description="VQA / grounding: up to this many of a study's (question, answer) "
                           "pairs per example, as a multi-turn conversation about the same images")
    # How often each task is drawn for a study. Tasks the data cannot serve are skipped and counted.
    tasks: dict[str, float] = Field(default_factory=lambda: {"report": 0.5, "vqa": 0.3, "grounding": 0.2})
    verify_shards: bool = Field(True, description="check shard sha256 against the manifest before training")
    shuffle: bool = Field(True, description="training reads shards in a random order; false: the stream order is "
                          "fixed (preserve_order), so two runs from the same seed see the same batches")
    vocab_size: int = Field(2000, ge=300, description="BPE vocabulary before special/location tokens")
    prefetch_batches: int = Field(1, ge=0, description="micro-batches each training worker fetches ahead of its "
                                  "step (Ray Data iter_batches); `cxrfm bench data` measures the effect")

    @model_validator(mode="after")
    def _known_tasks(self) -> "DataConfig":
        check_source_name(self.source)
        names = [m.name for m in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names each source once, got {names}; merge the duplicates")
        bad = set(self.tasks) - set(TASKS)
        if bad:
            raise ValueError(f"unknown task(s) {sorted(bad)} in data.tasks; allowed: {list(TASKS)}")
        if not self.tasks or any(w < 0 for w in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise ValueError("data.tasks needs at least one task with a positive weight")
        return self


class TrainConfig(_Section):
    max_steps: int = Field(300, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    # Share of the steps after warmup over which the lr decays (cosine, to min_lr_ratio * lr); before that it
    # holds at lr. 1.0 is plain warmup + cosine; e.g. 0.2 is warmup-stable-decay (WSD, as in MiniCPM and
    # torchtitan's decay_ratio), which keeps the peak lr for 80% of the run and anneals in the last 20%.
    decay_fraction: float = Field(1.0, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    clip_grad: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    # Custom Ray resources each Ray Train worker asks for besides train.cpus_per_worker CPUs (and a GPU with
    # use_gpu), e.g. {trainer_slot: 1} to place one worker on each node that offers one slot.
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # Times the workers may fail to start (no capacity after a node is lost: each wait is Ray Train's
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default) before the run stops and says how to resume.
    capacity_retries: int = Field(5, ge=0)
    output_dir: str = "runs/tiny"
    # Extra environment of every Ray Train worker (NCCL_* settings, TRITON_INTERPRET=1 for CPU tests, ...).
    worker_env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _custom_resources(self) -> "TrainConfig":
        builtin = {"CPU", "GPU", "memory"} & set(self.resources_per_worker)
        if builtin:
            raise ValueError(f"train.resources_per_worker names {sorted(builtin)}: set CPUs with train.cpus_per_worker "
                             "and GPUs with train.use_gpu; list only custom resources there")
        if any(v <= 0 for v in self.resources_per_worker.values()):
            raise ValueError(f"train.resources_per_worker {self.resources_per_worker}: every amount must be positive")
        return self


class DeepSpeedConfig(_Section):
    stage: Literal[1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(50_000_000, ge=1)


class TrackingConfig(_Section):
    # None: a SQLite store inside train.output_dir (mlflow.db)
    mlflow_uri: str | None = None
    experiment: str = "cxrfm"
    run_name: str | None = None
    # Register the run's export as a new version of this MLflow registered model (cxrfm models ...)
    register_as: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# GPU kinds a job can ask for: `cxrfm plan --gpu` takes the same names, and on Kubernetes each maps to
# the node label GPU feature discovery sets (cxrfm/jobs/manifests.py GPU_PRODUCTS).
GPU_TYPES = ("h100-80gb", "h200-141gb", "a100-80gb", "a100-40gb", "l4-24gb")
# The image cluster/Dockerfile builds; its tag is the package version.
DEFAULT_IMAGE = "ghcr.io/cxrfm/cxrfm:0.1.0"
_QUANTITY = re.compile(r"[1-9][0-9]*(Ki|Mi|Gi|Ti)")


class JobConfig(_Section):
    """What a job needs from a cluster beyond the training config (`cxrfm jobs`, `cxrfm plan`).

    On Kubernetes the job gets one worker pod per node, each holding `gpus_per_node` GPUs of
    `gpu_type`, `cpus_per_node` cores and `memory_per_node` memory; Ray Train runs
    `train.num_workers` workers, one per GPU. Unset resources follow from the train section
    (`Config.job_resources`)."""

    name: str = "cxrfm-tiny"
    entrypoint: str = "cxrfm train"
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    image: str = Field(DEFAULT_IMAGE, min_length=1, description="container image every pod runs (cluster/Dockerfile)")
    num_nodes: int = Field(1, ge=1)
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per worker pod; default train.num_workers / "
                                      "num_nodes with train.use_gpu, else 0")
    gpu_type: Literal[GPU_TYPES] | None = None
    cpus_per_node: int | None = Field(None, ge=1, description="CPU cores per worker pod; default "
                                      "train.cpus_per_worker x workers per node + 2 for Ray Data")
    memory_per_node: str | None = Field(None, description="memory per worker pod as a Kubernetes quantity "
                                        "(e.g. 1280Gi); default 160Gi per GPU, or 4Gi per CPU worker")

    @model_validator(mode="after")
    def _quantity(self) -> "JobConfig":
        if self.memory_per_node is not None and not _QUANTITY.fullmatch(self.memory_per_node):
            raise ValueError(f"job.memory_per_node {self.memory_per_node!r} is not a Kubernetes memory quantity; "
                             "write a whole number with Ki, Mi, Gi or Ti, e.g. 1280Gi")
        return self


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    job: JobConfig = Field(default_factory=JobConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        ds = self.deepspeed
        if ds.stage != 3 and ds.offload_param != "none":
            raise ValueError("deepspeed.offload_param needs deepspeed.stage=3; set stage 3 or offload_param none")
        if "nvme" in (ds.offload_optimizer, ds.offload_param) and not ds.nvme_path:
            raise ValueError("NVMe offload needs deepspeed.nvme_path (a fast local disk directory)")
        if ds.stage == 3 and self.model.language.tie_word_embeddings and ds.offload_param == "nvme":
            raise ValueError("ZeRO-3 NVMe parameter offload does not support tied embeddings; set model.language.tie_word_embeddings=false")
        if not self.train.use_gpu and (ds.offload_optimizer, ds.offload_param) != ("none", "none"):
            raise ValueError("deepspeed offload needs train.use_gpu=true (on CPU the states already live in host memory); set deepspeed.offload_optimizer=none and deepspeed.offload_param=none")
        p = self.model.projector.num_tokens
        if int(p ** 0.5) ** 2 != p:
            raise ValueError(f"model.projector.num_tokens ({p}) must be a square number (the projector pools to a square grid)")
        need = 2 + 3 * (p + 1) + 16
        if self.data.max_seq_len < need:
            raise ValueError(f"data.max_seq_len ({self.data.max_seq_len}) is too short for 3 images of {p} visual tokens; use at least {need}")
        m = self.model
        if self.data.tasks.get("generate", 0) > 0 and not m.diffusion.enabled:
            raise ValueError("data.tasks has 'generate' but model.diffusion.enabled is false; enable the decoder or drop the task")
        if (m.fused_rmsnorm or m.fused_cross_entropy) and not self.train.use_gpu and not self._triton_interpreter():
            raise ValueError("model.fused_rmsnorm / model.fused_cross_entropy are Triton GPU kernels: set train.use_gpu=true, "
                             "or set them to false on CPU")
        if self.train.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("train.precision=fp16 needs a GPU (train.use_gpu=true); use fp32 or bf16 on CPU")
        return self

    def _triton_interpreter(self) -> bool:
        """Triton kernels run on the CPU here or in the workers (TRITON_INTERPRET=1 in this process or in
        train.worker_env)."""
        # Imported here: cxrfm.attention loads torch, which the config (read by every command) does not
        # need unless fused kernels are asked for on the CPU.
        from cxrfm.attention import triton_interpreter

        return triton_interpreter() or self.train.worker_env.get("TRITON_INTERPRET") == "1"

    def job_resources(self) -> dict[str, Any]:
        """The resources one worker pod (one node) asks for: image, nodes, GPUs (count and kind), CPUs
        and memory; the job section's values, or what the train section implies where they are unset.

        Checked where the job section is used (`cxrfm jobs submit --to kubernetes`), not at load time:
        a local run such as `cxrfm train --set train.use_gpu=true` ignores the job section. Raises a
        one-line ConfigError when the job and train sections disagree."""
        try:
            return self._job_resources()
        except ValueError as err:
            raise ConfigError(f"job resources: {err}") from None

    def _job_resources(self) -> dict[str, Any]:
        job, t = self.job, self.train
        per_node = math.ceil(t.num_workers / job.num_nodes)  # Ray Train workers on each node
        if t.use_gpu:
            if job.gpus_per_node is None and t.num_workers % job.num_nodes:
                raise ValueError(f"train.num_workers ({t.num_workers}) does not split evenly over job.num_nodes "
                                 f"({job.num_nodes}) (one Ray Train worker per GPU, the same GPUs on every node); "
                                 "change one of them")
            gpus = job.gpus_per_node if job.gpus_per_node is not None else t.num_workers // job.num_nodes
            if gpus * job.num_nodes != t.num_workers:
                raise ValueError(f"job.num_nodes ({job.num_nodes}) x job.gpus_per_node ({gpus}) = "
                                 f"{gpus * job.num_nodes} GPUs, but train.num_workers is {t.num_workers} (one Ray "
                                 "Train worker per GPU); make them equal")
        else:
            gpus = job.gpus_per_node or 0
            if gpus:
                raise ValueError(f"job.gpus_per_node is {gpus} but train.use_gpu is false; set train.use_gpu=true "
                                 "or job.gpus_per_node=0")
            if job.gpu_type:
                raise ValueError(f"job.gpu_type is {job.gpu_type!r} but train.use_gpu is false; set "
                                 "train.use_gpu=true or drop job.gpu_type")
        need = math.ceil(t.cpus_per_worker * per_node)
        cpus = job.cpus_per_node if job.cpus_per_node is not None else need + 2
        if cpus < need:
            raise ValueError(f"job.cpus_per_node ({cpus}) is less than the {need} cores the node's {per_node} Ray "
                             f"Train worker(s) reserve (train.cpus_per_worker={t.cpus_per_worker}); raise it or "
                             "lower train.cpus_per_worker")
        memory = job.memory_per_node or (f"{160 * gpus}Gi" if gpus else f"{4 * per_node}Gi")
        return {"image": job.image, "num_nodes": job.num_nodes, "workers_per_node": per_node, "gpus_per_node": gpus,
                "gpu_type": job.gpu_type, "cpus_per_node": cpus, "memory_per_node": memory}

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


DEFAULT_JOB = Path(__file__).resolve().parents[2] / "jobs" / "tiny.yaml"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def _apply(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}': remove it or check the spelling")
        elif e["type"] == "literal_error":
            lines.append(f"config key '{key}' = {e['input']!r} is not allowed; {e['msg'].lower()}")
        elif isinstance(e.get("input"), dict):  # a cross-field rule: its message names the keys
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"config key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a job YAML (default: jobs/tiny.yaml), apply `a.b=c` overrides, validate."""
    path = Path(path) if path else DEFAULT_JOB
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML from jobs/, e.g. jobs/tiny.yaml")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train, ...)")
    try:
        return with_overrides(tree, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The job YAML and --set overrides, as every command that reads a config takes them."""
    p.add_argument("config", nargs="?", default=None, help="job YAML (default: jobs/tiny.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")


def with_overrides(tree: dict[str, Any], overrides: list[str] | None) -> Config:
    """Apply `a.b=c` overrides (values parsed as YAML) to a config tree and validate it."""
    for item in overrides or []:
        keys, value = _parse_override(item)
        _apply(tree, keys, value)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None
