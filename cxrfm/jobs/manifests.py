"""Manifests of `cxrfm jobs --to kubernetes`: a job spec becomes a KubeRay `RayJob` (ray.io/v1) plus the
ConfigMap that carries the spec and a NetworkPolicy that closes the job's Ray cluster to everything but
itself and the KubeRay operator (kube.py creates and watches them with the kubernetes Python client).

The spec travels in a ConfigMap (mounted on the Ray head where the entrypoint runs) rather than being
read from the image, so the job runs exactly the YAML that was submitted, not whatever copy the image
was built with. The ConfigMap and the NetworkPolicy are owned by the RayJob, so deleting the job deletes
them. The Ray cluster runs with Ray token authentication (KubeRay authOptions).
"""

from __future__ import annotations

import functools
import re
import secrets
import shlex
from pathlib import Path
from typing import Any

import yaml

from cxrfm.config import DEFAULT_IMAGE, Config, ConfigError  # noqa: F401 (DEFAULT_IMAGE re-exported)

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayjobs", "RayJob"
RAY_VERSION = "2.60.0"  # the Ray in cluster/Dockerfile; KubeRay uses it to pick head/worker commands
SPEC_DIR = "/etc/cxrfm/jobs"  # where the spec ConfigMap is mounted on the head
SHARED_MOUNT = "/mnt/cxrfm"  # the shared volume for shards and checkpoints (cluster/README.md)
KUBERAY_HINT = ("install the KubeRay operator first: helm install kuberay-operator kuberay/kuberay-operator "
                "--version 1.7.0 (https://docs.ray.io/en/latest/cluster/kubernetes/getting-started.html)")
# GPU feature discovery labels nodes with the product name; job.gpu_type (cxrfm.config.GPU_TYPES, the
# names `cxrfm plan` takes) maps onto them.
GPU_PRODUCTS = {
    "h100-80gb": "NVIDIA-H100-80GB-HBM3", "h200-141gb": "NVIDIA-H200",
    "a100-80gb": "NVIDIA-A100-SXM4-80GB", "a100-40gb": "NVIDIA-A100-SXM4-40GB", "l4-24gb": "NVIDIA-L4",
}
# Writable places for a read-only root filesystem: Ray's session dir, compiler and kernel caches.
RAY_ENV = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
    {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
    {"name": "TORCH_EXTENSIONS_DIR", "value": "/tmp/torch_extensions"},
]


def job_name(cfg: Config) -> str:
    """DNS-1123 name, unique per submission. KubeRay derives longer names (cluster, head service) from
    it, so it stays at 46 characters or fewer."""
    slug = re.sub(r"[^a-z0-9-]+", "-", cfg.job.name.lower()).strip("-")[:40].strip("-") or "cxrfm"
    return f"{slug}-{secrets.token_hex(3)[:5]}"


# Commands that read a job spec: the spec's path and the --set overrides are appended to them.
SPEC_COMMANDS = ("cxrfm train", "cxrfm data build")


def entrypoint(cfg: Config, spec_path: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The shell command the job runs.

    `job.entrypoint` may be a template with `{spec}` (the spec's path where the job runs) and
    `{overrides}` (the `--set` items); a bare `cxrfm train` / `cxrfm data build` gets both appended;
    any other command runs as written (e.g. `cxrfm eval <export>`), so overrides would be lost."""
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    command = cfg.job.entrypoint.strip()
    if "{spec}" in command or "{overrides}" in command:
        if overrides and "{overrides}" not in command:
            raise ConfigError(f"job.entrypoint {command!r} has no {{overrides}} slot, so --set would be lost; "
                              "add it or put the values in the spec")
        return command.replace("{spec}", shlex.quote(spec_path)).replace("{overrides}", sets).strip()
    words = command.split()
    if any(words[:len(c.split())] == c.split() for c in SPEC_COMMANDS):
        return " ".join(filter(None, [command, shlex.quote(spec_path), sets]))
    if overrides:
        raise ConfigError(f"job.entrypoint {command!r} does not read the spec, so --set would be lost; "
                          "write the values into the entrypoint or use {spec}/{overrides} in it")
    return command


def _security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def _pod(role: str, image: str, resources: dict[str, Any], volumes: list[dict], mounts: list[dict],
         gpu_type: str | None, labels: dict[str, str], service_account: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        # A fixed-size job cluster has no autoscaler: no pod calls the API server.
        "automountServiceAccountToken": service_account,
        "containers": [{
            "name": f"ray-{role}", "image": image, "imagePullPolicy": "IfNotPresent",
            "env": RAY_ENV, "resources": resources, "volumeMounts": mounts,
            "securityContext": _security_context(),
        }],
        "volumes": volumes,
    }
    if "nvidia.com/gpu" in resources.get("limits", {}):
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if gpu_type in GPU_PRODUCTS:
            spec["nodeSelector"] = {"nvidia.com/gpu.product": GPU_PRODUCTS[gpu_type]}
    return {"metadata": {"labels": labels}, "spec": spec}


def _submitter(image: str, labels: dict[str, str]) -> dict[str, Any]:
    """The pod that runs `ray job submit`: KubeRay fills in its command (bash running `ray job submit ...
    -- <entrypoint>`; Ray's CLI re-joins the words with shlex.join, so the shell quoting holds)."""
    limits = {"cpu": "1", "memory": "1Gi"}
    return {"metadata": {"labels": labels}, "spec": {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "ray-job-submitter", "image": image, "imagePullPolicy": "IfNotPresent",
                        "env": [{"name": "HOME", "value": "/tmp"}],
                        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": limits},
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        "securityContext": _security_context()}],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }}


def rayjob_manifests(cfg: Config, spec_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                     namespace: str = "default", image: str | None = None, pvc: str | None = "cxrfm-shared",
                     name: str | None = None) -> list[dict[str, Any]]:
    """[ConfigMap with the spec, RayJob] for `cfg` (already validated from `spec_path` + `overrides`).

    The worker pods ask for the spec's job resources (`Config.job_resources`): job.gpus_per_node GPUs of
    job.gpu_type, job.cpus_per_node cores and job.memory_per_node memory each, on job.num_nodes nodes,
    running job.image (or `image`)."""
    spec_path = Path(spec_path)
    name = name or job_name(cfg)
    t, job = cfg.train, cfg.job
    res = cfg.job_resources()
    image = image or res["image"]
    labels = {"app.kubernetes.io/name": "cxrfm", "app.kubernetes.io/component": "training",
              "app.kubernetes.io/managed-by": "cxrfm-jobs", "cxrfm.io/job": name}
    worker_limits: dict[str, Any] = {"cpu": str(res["cpus_per_node"]), "memory": res["memory_per_node"]}
    if res["gpus_per_node"]:
        worker_limits["nvidia.com/gpu"] = str(res["gpus_per_node"])
    head_limits = {"cpu": "4", "memory": "16Gi"}

    volumes = [{"name": "tmp", "emptyDir": {}},
               # NCCL and the DataLoader share tensors through /dev/shm; the 64 MiB default is far too small.
               {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi" if t.use_gpu else "2Gi"}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if pvc:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": pvc}})
        mounts.append({"name": "shared", "mountPath": SHARED_MOUNT})
    head_volumes = volumes + [{"name": "spec", "configMap": {"name": f"{name}-spec"}}]
    head_mounts = mounts + [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]

    group = "gpu-workers" if t.use_gpu else "cpu-workers"
    rayjob = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "entrypoint": entrypoint(cfg, f"{SPEC_DIR}/{spec_path.name}", overrides),
            "submissionMode": "K8sJobMode",
            # Ray Train restarts failed workers itself (train.max_failures); a second submission would
            # start over on a fresh cluster, so the submitter is not retried.
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            # The Ray cluster (and its GPUs) goes a minute after the job ends (logs are in MLflow and the
            # submitter pod); a gang that cannot start within 10 minutes gives back what it got.
            "ttlSecondsAfterFinished": 60,
            "preRunningDeadlineSeconds": 600,
            # KubeRay's default submitter has no securityContext: PSA "restricted" namespaces reject it.
            "submitterPodTemplate": _submitter(image, labels),
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    # The head schedules; it runs no training work (and has no GPU).
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": _pod("head", image, {"requests": head_limits, "limits": head_limits},
                                     head_volumes, head_mounts, None, labels, False),
                },
                "workerGroupSpecs": [{
                    # A training gang has a fixed size: min = max = replicas.
                    "groupName": group, "replicas": job.num_nodes,
                    "minReplicas": job.num_nodes, "maxReplicas": job.num_nodes,
                    "rayStartParams": {},
                    "template": _pod("worker", image, {"requests": worker_limits, "limits": worker_limits},
                                     volumes, mounts, res["gpu_type"], labels, False),
                }],
            },
        },
    }
    if job.runtime_env:
        rayjob["spec"]["runtimeEnvYAML"] = yaml.safe_dump(job.runtime_env, sort_keys=True)
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "namespace": namespace, "labels": labels},
        "data": {spec_path.name: spec_path.read_text()},
    }
    return [configmap, rayjob, network_policy(name, namespace, labels)]


def network_policy(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    """Ingress to the job's pods from the job's own pods (Ray's many ports, NCCL, the submitter) and from
    the KubeRay operator on the dashboard port only. Egress stays open: MLflow and object stores are
    wherever the spec points."""
    own = {"podSelector": {"matchLabels": {"cxrfm.io/job": name}}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "namespace": namespace, "labels": labels},
        "spec": {"podSelector": {"matchLabels": {"cxrfm.io/job": name}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [own]}, {"from": [operator], "ports": [{"protocol": "TCP", "port": 8265}]}]},
    }


class _Dumper(yaml.SafeDumper):
    """Plain YAML for kubectl and review: no &anchors for shared sub-trees, multi-line text as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def dump_manifests(objs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False) for o in objs)


def validate_kuberay(obj: dict[str, Any], crd_dir: str | Path) -> list[str]:
    """Check a RayJob / RayCluster / RayService against the KubeRay CRD's openAPIV3Schema (offline).

    Unknown fields are errors here, as the API server's strict field validation would make them,
    except under `x-kubernetes-preserve-unknown-fields`. Returns the error messages, empty when valid."""
    kind = obj.get("kind", "")
    version = obj.get("apiVersion", "").split("/")[-1]
    path = Path(crd_dir) / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        return [f"no CRD for kind {kind!r} in {crd_dir}"]
    validator = _crd_validator(str(path.resolve()), version)
    if isinstance(validator, str):
        return [validator]
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


@functools.lru_cache(maxsize=16)
def _crd_validator(path: str, version: str):
    """Parsing a KubeRay CRD (tens of thousands of YAML lines) is slow: once per file and version."""
    import jsonschema

    crd = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        return f"{crd['spec']['names']['kind']} has no served version {version!r} (has {sorted(versions)})"
    return jsonschema.Draft7Validator(_strict(versions[version]["schema"]["openAPIV3Schema"]))


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema
