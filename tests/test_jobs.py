"""`cxrfm jobs`: manifests and entrypoints. The kubernetes client at its HTTP boundary is in
test_kube.py, submission to a real local Ray head in test_jobs_ray.py.

There is no Kubernetes API server on test machines. The Kubernetes paths are checked by schema
validation of the manifests (KubeRay v1.7.0 CRDs, kubernetes-validate), `--dry-run` output, and the
fake API server of test_kube.py.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from cxrfm.config import load_config
from cxrfm.jobs import manifests
from cxrfm.jobs.cli import add_parser as add_jobs_parser

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "tests" / "helm" / "crds" / "v1.7.0"  # vendored KubeRay CRDs: see its README.md
SPECS = ["tiny.yaml", "pretrain-m4cxr.yaml", "finetune.yaml", "eval.yaml"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="cxrfm")
    add_jobs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- manifests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS)
def test_rayjob_manifests_validate(spec):
    import kubernetes_validate

    path = REPO / "jobs" / spec
    overrides = [] if spec == "eval.yaml" else ["train.max_steps=7"]  # `cxrfm eval` takes no spec
    cfg = load_config(path, overrides)
    configmap, rayjob, policy = manifests.rayjob_manifests(cfg, path, overrides, namespace="ml")
    assert manifests.validate_kuberay(rayjob, CRDS) == []
    kubernetes_validate.validate(configmap, "1.30.0", strict=True)
    kubernetes_validate.validate(policy, "1.30.0", strict=True)
    # The job runs the submitted spec from the ConfigMap, with the overrides on the entrypoint.
    assert configmap["data"][spec] == path.read_text()
    assert rayjob["spec"]["entrypoint"] == manifests.entrypoint(cfg, f"/etc/cxrfm/jobs/{spec}", overrides)
    assert len(rayjob["metadata"]["name"]) <= 46
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == cfg.job.num_nodes
    container = workers["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"] == limits  # a gang of whole nodes: requests = limits
    # Every spec states its resources, and the worker pods ask for exactly those.
    job = yaml.safe_load(path.read_text())["job"]
    assert {"image", "num_nodes", "gpus_per_node", "cpus_per_node", "memory_per_node"} <= set(job), spec
    assert container["image"] == job["image"]
    assert limits["cpu"] == str(job["cpus_per_node"]) and limits["memory"] == job["memory_per_node"]
    if cfg.train.use_gpu:
        assert int(limits["nvidia.com/gpu"]) == job["gpus_per_node"]
        assert job["gpus_per_node"] * job["num_nodes"] == cfg.train.num_workers
        assert workers["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    else:
        assert "nvidia.com/gpu" not in limits and job["gpus_per_node"] == 0


def test_pretrain_rayjob_requests_eight_nodes_of_eight_gpus(capsys, monkeypatch, tmp_path):
    """The M4CXR pretraining spec through `--dry-run`: 8 worker pods of 8 H100s each, the spec's image
    and memory, and a RayJob the KubeRay CRD schema accepts."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "pretrain-m4cxr.yaml"), "--to", "kubernetes",
                            "--dry-run"], capsys)
    assert rc == 0, err
    configmap, rayjob, _ = yaml.safe_load_all(out)
    assert manifests.validate_kuberay(rayjob, CRDS) == []
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 8
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    for key in ("requests", "limits"):
        assert worker["resources"][key] == {"nvidia.com/gpu": "8", "cpu": "66", "memory": "1280Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert worker["image"] == head["image"] == "ghcr.io/cxrfm/cxrfm:0.1.0"
    assert "nvidia.com/gpu" not in head["resources"]["limits"]  # the head schedules, it trains nothing
    # --image overrides the spec's image for every pod; --set job.* changes the resources.
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "pretrain-m4cxr.yaml"), "--to", "kubernetes",
                            "--dry-run", "--image", "registry.example/cxrfm:dev", "--set", "job.memory_per_node=1500Gi"],
                           capsys)
    assert rc == 0, err
    rayjob = list(yaml.safe_load_all(out))[1]
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["containers"][0]["image"] == "registry.example/cxrfm:dev"
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "1500Gi"


@pytest.mark.parametrize("spec", SPECS + ["tiny-learn.yaml"])
def test_rayjob_workers_request_the_specs_gpus(spec):
    """Needs no schema file, so it always runs: each worker pod requests and is limited to exactly the
    spec's GPUs per node (the GPU kind pinned by node selector and tolerated taint); the head has none;
    CPU-only specs ask for no GPU at all."""
    path = REPO / "jobs" / spec
    overrides = [] if spec == "eval.yaml" else ["train.max_steps=7"]
    _, rayjob, _ = manifests.rayjob_manifests(load_config(path, overrides), path, overrides, namespace="ml")
    job = yaml.safe_load(path.read_text())["job"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == job["num_nodes"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    want = {"cpu": str(job["cpus_per_node"]), "memory": job["memory_per_node"]}
    if job["gpus_per_node"]:
        want["nvidia.com/gpu"] = str(job["gpus_per_node"])
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": manifests.GPU_PRODUCTS[job["gpu_type"]]}
    else:
        assert "tolerations" not in pod and "nodeSelector" not in pod
    assert worker["resources"] == {"requests": want, "limits": want}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["requests"] and "nvidia.com/gpu" not in head["limits"]


@pytest.mark.parametrize("overrides,message", [
    (["job.gpus_per_node=4"], "job.num_nodes (8) x job.gpus_per_node (4) = 32 GPUs, but train.num_workers is 64"),
    (["job.gpus_per_node=null", "train.num_workers=60"], "train.num_workers (60) does not split evenly over job.num_nodes (8)"),
    (["job.memory_per_node=1.5T"], "job.memory_per_node '1.5T' is not a Kubernetes memory quantity"),
    (["job.cpus_per_node=32"], "job.cpus_per_node (32) is less than the 64 cores"),
    (["job.gpu_type=h100"], "config key 'job.gpu_type' = 'h100' is not allowed"),
    (["train.use_gpu=false", "train.precision=fp32", "job.gpu_type=null"], "job.gpus_per_node is 8 but train.use_gpu is false"),
])
def test_job_resources_are_validated(overrides, message, capsys, monkeypatch, tmp_path):
    """Bad or inconsistent job resources stop a submission with a clear error and no traceback."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "pretrain-m4cxr.yaml"), "--to", "kubernetes",
                            "--dry-run", *sum((["--set", o] for o in overrides), [])], capsys)
    assert rc == 2 and out == "" and message in err and "Traceback" not in err, err


def test_job_resources_do_not_block_local_runs():
    """The job section describes a cluster; a local override like use_gpu=true on the tiny spec loads,
    and only a Kubernetes submission of it is refused (its spec asks for 0 GPUs per node)."""
    from cxrfm.config import ConfigError

    cfg = load_config(REPO / "jobs" / "tiny.yaml", ["train.use_gpu=true", "train.precision=bf16"])
    with pytest.raises(ConfigError, match=re.escape("job.gpus_per_node (0) = 0 GPUs, but train.num_workers is 2")):
        manifests.rayjob_manifests(cfg, REPO / "jobs" / "tiny.yaml")


def test_gpu_kinds_agree_across_config_kube_and_plan():
    from cxrfm.config import GPU_TYPES
    from cxrfm.plan import GPUS

    assert set(GPU_TYPES) == set(manifests.GPU_PRODUCTS) == set(GPUS)


def test_validator_rejects_bad_rayjob():
    path = REPO / "jobs" / "tiny.yaml"
    _, rayjob, _ = manifests.rayjob_manifests(load_config(path), path)
    rayjob["spec"]["backoffLimit"] = "twice"
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}  # typo of rayStartParams
    errors = manifests.validate_kuberay(rayjob, CRDS)
    assert any("backoffLimit" in e and "integer" in e for e in errors)
    assert any("rayStartParam" in e for e in errors)


def test_dry_run_prints_manifests_and_needs_no_cluster(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "pretrain-m4cxr.yaml"), "--to", "kubernetes",
                            "--namespace", "research", "--dry-run", "--set", "train.max_steps=5"], capsys)
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob", "NetworkPolicy"]
    assert all(d["metadata"]["namespace"] == "research" for d in docs)
    assert docs[1]["spec"]["entrypoint"].endswith("--set train.max_steps=5")
    assert "&id" not in out  # no YAML anchors: plain manifests for kubectl and review
    assert yaml.safe_load(docs[1]["spec"]["runtimeEnvYAML"])["env_vars"]["NCCL_DEBUG"] == "WARN"


def test_bad_spec_and_bad_target_are_one_line(capsys, tmp_path):
    rc, _, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "kubernetes", "--dry-run",
                          "--set", "train.max_step=5"], capsys)
    assert rc == 2 and "train.max_step" in err and "Traceback" not in err
    rc, _, err = run_cli(["jobs", "status", "x", "--to", "slurm"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--to ray [ADDRESS]" in err


@pytest.mark.parametrize("command,overrides,expected", [
    ("cxrfm train", ["a.b=1"], "cxrfm train jobs/x.yaml --set a.b=1"),
    ("cxrfm train --no-progress", [], "cxrfm train --no-progress jobs/x.yaml"),
    ("cxrfm data build", ["data.num_studies=9"], "cxrfm data build jobs/x.yaml --set data.num_studies=9"),
    ("python run.py --config {spec} {overrides}", ["k=v w"], "python run.py --config jobs/x.yaml --set 'k=v w'"),
    ("cxrfm eval /mnt/cxrfm/runs/a/export --device cuda", [], "cxrfm eval /mnt/cxrfm/runs/a/export --device cuda"),
])
def test_entrypoint_rules(command, overrides, expected):
    cfg = load_config(None, [f"job.entrypoint={command}"])
    assert manifests.entrypoint(cfg, "jobs/x.yaml", overrides) == expected


def test_entrypoint_that_would_lose_overrides_is_refused():
    from cxrfm.config import ConfigError

    for command in ("cxrfm eval /export", "python run.py {spec}"):
        with pytest.raises(ConfigError, match="--set would be lost"):
            manifests.entrypoint(load_config(None, [f"job.entrypoint={command}"]), "jobs/x.yaml", ["a=1"])


def test_missing_kubeconfig_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "kubernetes"], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "no kubeconfig" in err and "KUBECONFIG" in err


# ---- entrypoint quoting and the submitter pod ----------------------------------------------------

QUOTING_CASES = ["tracking.run_name=a # b", "tracking.run_name=\"key: value\"", "tracking.run_name=it's",
                 "tracking.run_name=$HOME `id` \\ \"q\"",
                 "tracking.run_name=x;y|z&w"]


def shell_words(command: str) -> list[str]:
    """The words a real POSIX shell makes of `command` (as KubeRay's submitter's bash does)."""
    import subprocess

    out = subprocess.run(["bash", "-c", f'set -- {command}; printf "%s\\0" "$@"'], capture_output=True, check=True)
    return out.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("override", QUOTING_CASES)
def test_entrypoint_quotes_every_override(override, capsys, monkeypatch, tmp_path):
    """`#` is not cut, `: ` does not break the YAML, `'` does not escape the quoting, `$` is not expanded:
    the shell gives back exactly the override, through the printed manifest too."""
    cfg = load_config(REPO / "jobs" / "tiny.yaml", [override])
    command = manifests.entrypoint(cfg, "/etc/cxrfm/jobs/tiny.yaml", [override])
    assert shell_words(command) == ["cxrfm", "train", "/etc/cxrfm/jobs/tiny.yaml", "--set", override]
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "kubernetes", "--dry-run",
                            "--set", override], capsys)
    assert rc == 0, err
    rayjob = list(yaml.safe_load_all(out))[1]
    assert shell_words(rayjob["spec"]["entrypoint"])[-2:] == ["--set", override]


def test_submitter_pod_is_restricted_and_gpu_workers_ask_for_gpus():
    """KubeRay's default submitter has no securityContext (PSA "restricted" rejects it), so the RayJob
    brings its own; GPU workers request and limit the same nvidia.com/gpu count (no schema needed)."""
    path = REPO / "jobs" / "pretrain-m4cxr.yaml"
    _, rayjob, _ = manifests.rayjob_manifests(load_config(path), path)
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]
    assert submitter["securityContext"]["runAsNonRoot"] is True
    assert submitter["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = submitter["containers"]
    assert "command" not in container  # KubeRay fills in `ray job submit ... -- <entrypoint>`
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    assert rayjob["spec"]["preRunningDeadlineSeconds"] > 0 and rayjob["spec"]["ttlSecondsAfterFinished"] <= 600
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"


def test_job_network_policy_admits_the_job_and_the_operator_only():
    """Computed with the same NetworkPolicy evaluator as the chart's: the job's own pods reach each other on
    any port, the KubeRay operator reaches the dashboard only, other pods of the namespace nothing."""
    from tests.helm.test_networkpolicy import Pod, allowed

    path = REPO / "jobs" / "tiny.yaml"
    _, rayjob, policy = manifests.rayjob_manifests(load_config(path), path, namespace="ml", name="demo-1")
    labels = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    head = Pod("head", "ml", tuple(labels.items()))
    worker = Pod("worker", "ml", tuple(rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"].items()))
    submitter = Pod("submitter", "ml", tuple(rayjob["spec"]["submitterPodTemplate"]["metadata"]["labels"].items()))
    operator = Pod("operator", "kuberay-system", (("app.kubernetes.io/name", "kuberay-operator"),))
    stranger = Pod("stranger", "ml", (("app", "notebook"),))
    other_job = Pod("other", "ml", tuple({**labels, "cxrfm.io/job": "demo-2"}.items()))
    assert allowed([policy], worker, head, 6379) and allowed([policy], submitter, head, 8265)
    assert allowed([policy], operator, head, 8265) and not allowed([policy], operator, head, 6379)
    assert not allowed([policy], stranger, head, 8265) and not allowed([policy], other_job, worker, 6379)
