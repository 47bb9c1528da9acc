"""`cxrfm jobs`: manifests, the kubernetes client at its HTTP boundary, and a real local Ray head.

There is no Kubernetes API server on test machines. The Kubernetes paths are checked by schema
validation of the manifests (KubeRay v1.7.0 CRDs, kubernetes-validate), `--dry-run` output, and the
kubernetes client talking to a small fake API server on 127.0.0.1 that answers as a real one would
(discovery 404 without the CRDs, 403/404 Status objects, created objects echoed back with a uid).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cxrfm import jobs as jobs_module
from cxrfm import kube
from cxrfm.config import load_config
from cxrfm.jobs import add_jobs_parser, logs_ray, status_ray, stop_ray, submit_ray

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO.parent / "shared" / "kuberay-crds" / "v1.7.0"
SPECS = ["tiny.yaml", "pretrain-m4cxr.yaml", "finetune.yaml", "eval.yaml"]
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS} (shared/ beside the clone)")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="cxrfm")
    add_jobs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---- manifests ------------------------------------------------------------------------------------

@needs_crds
@pytest.mark.parametrize("spec", SPECS)
def test_rayjob_manifests_validate(spec):
    import kubernetes_validate

    path = REPO / "jobs" / spec
    overrides = [] if spec == "eval.yaml" else ["train.max_steps=7"]  # `cxrfm eval` takes no spec
    cfg = load_config(path, overrides)
    configmap, rayjob = kube.rayjob_manifests(cfg, path, overrides, namespace="ml")
    assert kube.validate_kuberay(rayjob, CRDS) == []
    kubernetes_validate.validate(configmap, "1.30.0", strict=True)
    # The job runs the submitted spec from the ConfigMap, with the overrides on the entrypoint.
    assert configmap["data"][spec] == path.read_text()
    assert rayjob["spec"]["entrypoint"] == kube.entrypoint(cfg, f"/etc/cxrfm/jobs/{spec}", overrides)
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


@needs_crds
def test_pretrain_rayjob_requests_eight_nodes_of_eight_gpus(capsys, monkeypatch, tmp_path):
    """The M4CXR pretraining spec through `--dry-run`: 8 worker pods of 8 H100s each, the spec's image
    and memory, and a RayJob the KubeRay CRD schema accepts."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "pretrain-m4cxr.yaml"), "--to", "kubernetes",
                            "--dry-run"], capsys)
    assert rc == 0, err
    configmap, rayjob = yaml.safe_load_all(out)
    assert kube.validate_kuberay(rayjob, CRDS) == []
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
        kube.rayjob_manifests(cfg, REPO / "jobs" / "tiny.yaml")


def test_gpu_kinds_agree_across_config_kube_and_plan():
    from cxrfm.config import GPU_TYPES
    from cxrfm.plan import GPUS

    assert set(GPU_TYPES) == set(kube.GPU_PRODUCTS) == set(GPUS)


@needs_crds
def test_validator_rejects_bad_rayjob():
    path = REPO / "jobs" / "tiny.yaml"
    _, rayjob = kube.rayjob_manifests(load_config(path), path)
    rayjob["spec"]["backoffLimit"] = "twice"
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}  # typo of rayStartParams
    errors = kube.validate_kuberay(rayjob, CRDS)
    assert any("backoffLimit" in e and "integer" in e for e in errors)
    assert any("rayStartParam" in e for e in errors)


def test_dry_run_prints_manifests_and_needs_no_cluster(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "pretrain-m4cxr.yaml"), "--to", "kubernetes",
                            "--namespace", "research", "--dry-run", "--set", "train.max_steps=5"], capsys)
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
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
    assert kube.entrypoint(cfg, "jobs/x.yaml", overrides) == expected


def test_entrypoint_that_would_lose_overrides_is_refused():
    from cxrfm.config import ConfigError

    for command in ("cxrfm eval /export", "python run.py {spec}"):
        with pytest.raises(ConfigError, match="--set would be lost"):
            kube.entrypoint(load_config(None, [f"job.entrypoint={command}"]), "jobs/x.yaml", ["a=1"])


def test_missing_kubeconfig_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "kubernetes"], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "no kubeconfig" in err and "KUBECONFIG" in err


# ---- the kubernetes client against a fake API server ---------------------------------------------

class FakeAPI(BaseHTTPRequestHandler):
    """Answers like kube-apiserver for the calls cxrfm makes; `state` sets what the cluster has."""

    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body, content_type: str = "application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str, kind: str | None = None):
        details = {"kind": kind} if kind else {}
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                          "reason": reason, "code": code, "details": details})

    def _route(self, method: str):
        st = self.state
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        st.setdefault("calls", []).append((method, self.path, body))
        path = self.path.split("?")[0]
        if path == "/apis/ray.io/v1":
            if not st.get("crds"):
                return self._send(404, b"404 page not found", "text/plain")
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "ray.io/v1",
                                    "resources": [{"name": n, "singularName": n[:-1], "namespaced": True, "kind": k,
                                                   "verbs": ["create", "delete", "get", "list", "patch", "watch"]}
                                                  for n, k in (("rayjobs", "RayJob"), ("rayclusters", "RayCluster"))]})
        ns = path.split("/")[4] if path.count("/") >= 4 else ""
        if ns == "forbidden":
            return self._status(403, "Forbidden", f'configmaps is forbidden: User "dev" cannot create resource '
                                                  f'"configmaps" in API group "" in the namespace "{ns}"', "configmaps")
        if ns == "absent":
            return self._status(404, "NotFound", f'namespaces "{ns}" not found', "namespaces")
        if method == "POST":
            obj = dict(body, metadata=dict(body["metadata"], uid="uid-" + body["metadata"]["name"]))
            st.setdefault("objects", {})[path + "/" + body["metadata"]["name"]] = obj
            return self._send(201, obj)
        if method == "PATCH":
            return self._send(200, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": body["metadata"]})
        if method == "DELETE":
            return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if path.endswith("/pods"):
            return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                {"metadata": {"name": "demo-sub", "namespace": ns, "creationTimestamp": "2026-01-01T00:00:00Z"}}]})
        if path.endswith("/log"):
            return self._send(200, b"Job submitted\nstep 10 loss 2.1\n", "text/plain")
        if "/rayjobs/" in path:
            return self._send(200, {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "demo"},
                                    "status": {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running",
                                               "rayClusterName": "demo-raycluster-abcde"}})
        return self._status(404, "NotFound", "the server could not find the requested resource")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PATCH(self):
        self._route("PATCH")

    def do_DELETE(self):
        self._route("DELETE")


@pytest.fixture
def fake_cluster(tmp_path, monkeypatch):
    FakeAPI.state = {"crds": True}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "dev", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "dev"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield FakeAPI.state
    server.shutdown()
    server.server_close()


def test_cluster_without_kuberay_crds(fake_cluster, capsys):
    fake_cluster["crds"] = False
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "kubernetes"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "no KubeRay CRDs" in err and "kuberay-operator" in err
    assert [c[0] for c in fake_cluster["calls"]] == ["GET"]  # nothing was created


@pytest.mark.parametrize("namespace,expected", [("forbidden", "forbidden to create configmaps in namespace 'forbidden'"),
                                                ("absent", "namespace 'absent' does not exist")])
def test_namespace_errors_are_one_line(fake_cluster, capsys, namespace, expected):
    rc, _, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "kubernetes",
                          "--namespace", namespace], capsys)
    assert rc == 2 and err.count("\n") == 1 and expected in err, err


def test_submit_status_logs_stop_through_the_client(fake_cluster, capsys):
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "kubernetes",
                            "--namespace", "ml", "--set", "train.max_steps=3"], capsys)
    assert rc == 0, err
    name = out.split()[2]
    posts = {p: b for m, p, b in fake_cluster["calls"] if m == "POST"}
    assert set(posts) == {"/api/v1/namespaces/ml/configmaps", "/apis/ray.io/v1/namespaces/ml/rayjobs"}
    assert posts["/apis/ray.io/v1/namespaces/ml/rayjobs"]["metadata"]["name"] == name
    patch = next(b for m, p, b in fake_cluster["calls"] if m == "PATCH")
    assert patch["metadata"]["ownerReferences"][0] == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name,
                                                       "uid": f"uid-{name}"}

    rc, out, _ = run_cli(["jobs", "status", name, "--to", "kubernetes", "-n", "ml"], capsys)
    assert rc == 0 and "job RUNNING, deployment Running, cluster demo-raycluster-abcde" in out
    rc, out, _ = run_cli(["jobs", "logs", name, "--to", "kubernetes", "-n", "ml"], capsys)
    assert rc == 0 and out.splitlines() == ["Job submitted", "step 10 loss 2.1"]
    assert any(p.startswith(f"/api/v1/namespaces/ml/pods?labelSelector=job-name%3D{name}")
               for m, p, _ in fake_cluster["calls"])
    rc, out, _ = run_cli(["jobs", "stop", name, "--to", "kubernetes", "-n", "ml"], capsys)
    assert rc == 0 and fake_cluster["calls"][-1][:2] == ("DELETE", f"/apis/ray.io/v1/namespaces/ml/rayjobs/{name}")


def test_unreachable_api_server_is_one_line(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}], "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    rc, _, err = run_cli(["jobs", "status", "demo", "--to", "kubernetes", "--kubeconfig", str(kubeconfig)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "cannot reach the Kubernetes API server" in err


# ---- a real Ray head on this machine --------------------------------------------------------------

def _free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports free right now (all held open until every one is picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


HEAD_ATTEMPTS = 3        # a fresh head (new ports, new temp dir) after a failed start
HEAD_DEADLINE_S = 480    # for all attempts together: generous for a loaded 2-core machine, but bounded


def _head_processes(marker: str, root: int) -> list:
    """This head's processes only: descendants of its `ray start`, plus any process (job entrypoints
    that left their session, workers re-parented after a crash) whose environment carries this head's
    own marker. Another Ray on the machine never has the marker."""
    import psutil

    found = {}
    try:
        parent = psutil.Process(root)
        found[root] = parent
        found.update((c.pid, c) for c in parent.children(recursive=True))
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("CXRFM_TEST_RAY_HEAD") == marker:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_head(proc: subprocess.Popen, marker: str) -> None:
    """`ray stop` for this head alone: SIGTERM its processes, SIGKILL what is left after 15 s."""
    import psutil

    procs = _head_processes(marker, proc.pid)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive + _head_processes(marker, proc.pid):
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _head_log_tail(tmp: str) -> str:
    """The end of `ray start`'s output and of the head's own logs, for a failure message."""
    parts = []
    sessions = [d for d in sorted(Path(tmp).glob("session_*")) if not d.is_symlink()]  # not session_latest
    for path in [Path(tmp) / "ray-start.log",
                 *(d / "logs" / name for d in sessions for name in ("raylet.out", "gcs_server.out", "dashboard.log"))]:
        try:
            text = path.read_text(errors="replace")[-1500:]
        except OSError:
            continue
        parts.append(f"--- {path.name} (last 1500 characters)\n{text}")
    return "\n".join(parts) or "(no logs were written)"


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head for this module: `ray start --head --block` with this interpreter's Ray, the
    dashboard on loopback, every port picked free, and token authentication explicitly off (Ray turns
    it on by itself when ~/.ray/auth_token exists, while this process reads its auth mode once, at
    import, and would be refused; the dashboard listens on loopback only, for the module's duration).
    A start that fails or does not answer in time (Ray gives its raylet a fixed 30 s to register, which
    a loaded machine can miss) is stopped and retried on new ports; the test fails with the head's logs
    once all attempts or the overall deadline are used up. Teardown stops this head's processes and no
    others."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    marker = f"{os.getpid()}-{secrets.token_hex(8)}"
    # This interpreter's Ray and its scripts (`cxrfm` for the jobs), even when its venv is not activated.
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), CXRFM_TEST_RAY_HEAD=marker,
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               # Shared 2-core CI machines stall processes for seconds: a head that declares its own
               # raylet dead under load takes the dashboard with it, so health checks are patient.
               RAY_health_check_period_ms="10000", RAY_health_check_timeout_ms="60000",
               RAY_health_check_failure_threshold="10", RAY_gcs_rpc_server_reconnect_timeout_s="300",
               RAY_gcs_server_port_wait_time_s="120", RAY_DASHBOARD_STARTUP_TIMEOUT_S="240")
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # never someone else's cluster or token
        env.pop(name, None)
    # The head's job agent registers late on a loaded machine: let submissions wait for it longer.
    agent_wait, jobs_module.AGENT_WAIT_S = jobs_module.AGENT_WAIT_S, 300
    deadline = time.monotonic() + HEAD_DEADLINE_S
    proc, tmp, failures = None, None, []
    try:
        for attempt in range(1, HEAD_ATTEMPTS + 1):
            tmp = tempfile.mkdtemp(prefix="cxrfm-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
            gcs, dash, agent, client = _free_ports(4)
            # The defaults (6379, 8265, 10001, the agent's 52365, workers on 10002-19999) may belong to
            # another Ray on a shared machine, and an agent that cannot bind leaves the head unable to run
            # any job; workers (0/0) bind random ports.
            cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                   "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
                   "--min-worker-port", "0", "--max-worker-port", "0",
                   "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", tmp, "--disable-usage-stats"]
            with open(Path(tmp) / "ray-start.log", "w") as log:
                proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            address = f"http://127.0.0.1:{dash}"
            started = time.monotonic()
            attempt_deadline = min(deadline, started + 240)
            error = None
            while error is None:
                try:
                    JobSubmissionClient(address).list_jobs()
                    break
                except AuthenticationError as err:  # up, but refusing us: waiting will not help
                    error = f"the dashboard at {address} refused the request: {str(err).splitlines()[0][:300]}"
                except Exception as err:  # not up yet
                    if proc.poll() is not None:
                        error = f"`ray start` exited with status {proc.returncode}"
                    elif time.monotonic() > attempt_deadline:
                        error = (f"no answer from the dashboard at {address} within "
                                 f"{time.monotonic() - started:.0f} s ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:300] if str(err) else ''})")
                    else:
                        time.sleep(1)
            if error is None:
                break
            failures.append(f"attempt {attempt}: {error} (load average {os.getloadavg()[0]:.1f})\n"
                            + _head_log_tail(tmp))
            # Visible in pytest's warnings summary even when a later attempt succeeds.
            warnings.warn(f"local Ray head, attempt {attempt} of {HEAD_ATTEMPTS}: {error} (load average "
                          f"{os.getloadavg()[0]:.1f}); retrying on new ports", stacklevel=1)
            _stop_head(proc, marker)
            shutil.rmtree(tmp, ignore_errors=True)
            proc, tmp = None, None
            if time.monotonic() > deadline - 60:
                break
        if proc is None:
            pytest.fail(f"the local Ray head did not come up in {len(failures)} attempt(s) within "
                        f"{HEAD_DEADLINE_S} s:\n" + "\n".join(failures), pytrace=False)
        yield address
    finally:
        jobs_module.AGENT_WAIT_S = agent_wait
        if proc is not None:
            _stop_head(proc, marker)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _spec(tmp_path: Path, entrypoint: str) -> Path:
    spec = tmp_path / "probe.yaml"
    spec.write_text(yaml.safe_dump({"job": {"name": "probe", "entrypoint": entrypoint,
                                            "runtime_env": {"env_vars": {"CXRFM_PROBE": "on"}}}}))
    return spec


def test_ray_jobs_submit_follow_status(ray_head, tmp_path, capsys):
    """The spec travels as the job's working dir; overrides and runtime env reach the entrypoint."""
    show = "python -c \"import os, sys; print(open(sys.argv[1]).read()); print(sys.argv[2:], os.environ['CXRFM_PROBE'])\" {spec} {overrides}"
    job_id = submit_ray(_spec(tmp_path, show), ray_head, ["train.max_steps=3"])
    assert logs_ray(job_id, ray_head, follow=True) == "SUCCEEDED"
    out = capsys.readouterr().out
    assert "name: probe" in out and "['--set', 'train.max_steps=3'] on" in out
    assert status_ray(job_id, ray_head)["status"] == "SUCCEEDED"


def test_ray_jobs_stop_and_unknown_id(ray_head, tmp_path, capsys):
    job_id = submit_ray(_spec(tmp_path, "python -c 'import time; time.sleep(300)'"), ray_head)
    assert stop_ray(job_id, ray_head) is True
    deadline = time.time() + 60
    while status_ray(job_id, ray_head)["status"] != "STOPPED" and time.time() < deadline:
        time.sleep(0.5)
    assert status_ray(job_id, ray_head)["status"] == "STOPPED"
    rc, _, err = run_cli(["jobs", "status", "no-such-job", "--to", "ray", ray_head], capsys)
    assert rc == 2 and "no job 'no-such-job'" in err and err.count("\n") == 1


@pytest.mark.slow
def test_ray_jobs_runs_the_tiny_training_job(ray_head, tmp_path, capsys):
    """`cxrfm train jobs/tiny.yaml` submitted through the Jobs API trains to completion."""
    if not (Path(sys.executable).parent / "cxrfm").exists() and not shutil.which("cxrfm"):
        pytest.skip("the `cxrfm` command is not installed (pip install -e .)")
    overrides = ["train.max_steps=10", "data.num_studies=60", f"train.output_dir={tmp_path / 'run'}",
                 f"data.shards={tmp_path / 'shards'}", "train.checkpoint_every=10"]
    rc, out, err = run_cli(["jobs", "submit", str(REPO / "jobs" / "tiny.yaml"), "--to", "ray", ray_head,
                            *sum((["--set", o] for o in overrides), []), "--follow"], capsys)
    assert rc == 0, (out + err)[-4000:]
    job_id = out.split()[1]
    assert status_ray(job_id, ray_head)["status"] == "SUCCEEDED"
    assert list((tmp_path / "run").glob("*/run.json"))  # the run's record, written by `cxrfm train`
