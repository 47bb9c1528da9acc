"""Rendering the chart offline with the real Helm engine (helm-python-sdk, Helm v4 in-process), the value
sets the chart tests share, and the pods a rendered object makes (KubeRay's included)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import helm_python as helm  # the test extra: helm-python-sdk
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "cxrfm"
KUBERAY_VERSION = "v1.7.0"
CRDS = REPO / "tests" / "helm" / "crds" / KUBERAY_VERSION  # vendored: see its README.md
K8S_VERSION = "1.30.0"


def _tenant_store() -> tuple[str, str]:
    """(the tenants YAML `cxrfm tenants add` writes, the plaintext key it printed)."""
    from cxrfm.serving.tenants import Tenant, add_tenant

    with tempfile.TemporaryDirectory() as d:
        key = add_tenant(Path(d) / "tenants.yaml", Tenant(name="acme", models=["base"]))
        return (Path(d) / "tenants.yaml").read_text(), key


TENANTS_YAML, TENANT_KEY = _tenant_store()
H100_WORKERS = {"replicas": 8, "gpusPerWorker": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3", "shmSize": "64Gi",
                "resources": {"requests": {"cpu": "96", "memory": "1200Gi"}, "limits": {"cpu": "96", "memory": "1200Gi"}}}
VALUE_SETS = {
    "default": {},
    "pretrain-h100": {
        "training": {"spec": "pretrain-m4cxr.yaml", "overrides": ["train.max_steps=100"], "workers": H100_WORKERS,
                     "runtimeEnv": {"env_vars": {"NCCL_DEBUG": "WARN"}}, "activeDeadlineSeconds": 604800},
        "serving": {"workers": {"gpusPerWorker": 1, "gpuProduct": "NVIDIA-L4"}, "tenants": TENANTS_YAML,
                    "ingress": {"host": "cxr.example.org", "tls": {"enabled": True, "secretName": "cxr-tls"}}},
        "imagePullSecrets": [{"name": "registry"}],
    },
    # Every option a platform team would turn on: RDMA, Kueue, priorities, GCS fault tolerance, cert-manager,
    # pod extension points on every group.
    "platform": {
        "training": {"spec": "pretrain-m4cxr.yaml", "kueueQueueName": "gpu-team", "priorityClassName": "training",
                     "workers": {**H100_WORKERS, "rdma": {"resourceName": "rdma/rdma_shared_device_a", "perWorker": 1},
                                 "ncclEnv": {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_GID_INDEX": 3},
                                 "pod": {"labels": {"team": "radiology"}, "annotations": {"example.org/cost": "gpu"},
                                         "tolerations": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}],
                                         "nodeSelector": {"pool": "h100"}, "runtimeClassName": "nvidia",
                                         "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                                                        "whenUnsatisfiable": "ScheduleAnyway",
                                                                        "labelSelector": {"matchLabels": {"team": "radiology"}}}],
                                         "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                                             "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In",
                                                                                          "values": ["h100"]}]}]}}},
                                         "extraVolumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets"}}],
                                         "extraVolumeMounts": [{"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True}],
                                         "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}]}},
                     "head": {"pod": {"priorityClassName": "training-head"}},
                     "submitter": {"pod": {"labels": {"team": "radiology"}}}},
        "serving": {"priorityClassName": "serving",
                    "gcsFaultTolerance": {"enabled": True, "redisAddress": "redis.ha.svc:6379",
                                          "passwordSecret": {"name": "redis-auth", "key": "password"}},
                    "workers": {"gpusPerWorker": 2, "gpusPerReplica": 0.5, "gpuProduct": "NVIDIA-L4",
                                "pod": {"labels": {"team": "radiology"}}},
                    "head": {"pod": {"annotations": {"example.org/owner": "ml"}}},
                    "tenants": TENANTS_YAML,
                    "ingress": {"tls": {"enabled": True, "clusterIssuer": "letsencrypt"}}},
        "mlflow": {"clientNamespaces": ["notebooks"], "pod": {"labels": {"team": "radiology"}}},
        "networkPolicy": {"extraRayEgress": [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                                              "ports": [{"port": 443, "protocol": "TCP"}]}]},
    },
    "external-stores": {
        "mlflow": {"backendStore": {"internal": False, "host": "pg.db.svc", "existingSecret": "mlflow-db"},
                   "artifactStore": {"internal": False, "endpointUrl": "https://s3.example.org", "existingSecret": "mlflow-s3"}},
        "sharedStorage": {"existingClaim": "team-nfs"},
        "serving": {"existingTenantsSecret": "tenant-store", "ingress": {"maxBodySize": "64m"}},
    },
    "serving-only": {"training": {"enabled": False}, "mlflow": {"enabled": False},
                     "serving": {"ingress": {"enabled": False}, "podDisruptionBudget": {"enabled": False}}},
}


def load_chart():
    return helm.Chart.load(str(CHART))


def render(chart, values, name: str = "demo", namespace: str = "ml") -> list[dict]:
    out = chart.render(values, name=name, namespace=namespace)
    return [d for path, text in sorted(out.items()) if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def pod_templates(obj: dict) -> list[dict]:
    """Every pod template (metadata + spec) an object will create, KubeRay's included."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [spec["template"]]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or (spec if obj["kind"] == "RayCluster" else None)
    if cluster is None:
        return []
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"])
    return pods


def pod_specs(obj: dict) -> list[dict]:
    return [t["spec"] for t in pod_templates(obj)]
