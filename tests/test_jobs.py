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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    if cfg.train.use_gpu:
        assert int(limits["nvidia.com/gpu"]) * cfg.job.num_nodes == cfg.train.num_workers
        assert workers["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    else:
        assert "nvidia.com/gpu" not in limits


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

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own process group; the dashboard listens on loopback only.
    Token auth with a fresh token, so the test neither depends on nor touches ~/.ray."""
    token = secrets.token_hex(16)
    # This interpreter's Ray and its scripts (`cxrfm` for the jobs), even when its venv is not activated.
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               # Shared 2-core CI machines stall processes for seconds: a head that declares its own
               # raylet dead under load takes the dashboard with it, so health checks are patient.
               RAY_health_check_period_ms="10000", RAY_health_check_timeout_ms="60000",
               RAY_health_check_failure_threshold="10", RAY_gcs_rpc_server_reconnect_timeout_s="300",
               RAY_DASHBOARD_STARTUP_TIMEOUT_S="240")
    tmp = tempfile.mkdtemp(prefix="cxrfm-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = _free_port()
    # Every port picked free: the defaults (6379, 8265, 10001, the agent's 52365) may belong to another
    # Ray on a shared machine, and an agent that cannot bind leaves the head unable to run any job.
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", str(_free_port()), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(_free_port()),
         "--ray-client-server-port", str(_free_port()), "--include-dashboard", "true", "--num-cpus", "2",
         "--temp-dir", tmp, "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=open(Path(tmp) / "ray-start.log", "w"), stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # The head's job agent registers late on a loaded machine: let submissions wait for it longer.
    agent_wait, jobs_module.AGENT_WAIT_S = jobs_module.AGENT_WAIT_S, 300
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 300
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("ray head did not come up:\n" + (Path(tmp) / "ray-start.log").read_text()[-2000:])
                time.sleep(1)
        yield address
    finally:
        jobs_module.AGENT_WAIT_S = agent_wait
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        # Only the processes this fixture started: its own process group.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
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
