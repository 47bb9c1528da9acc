"""`cxrfm jobs --to kubernetes` through the kubernetes client, against a small fake API server on
127.0.0.1 that answers as kube-apiserver would (discovery 404 without the CRDs, 403/404 Status
objects, created objects echoed back with a uid). There is no real API server on test machines."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.test_jobs import REPO, run_cli


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
    assert set(posts) == {"/api/v1/namespaces/ml/configmaps", "/apis/ray.io/v1/namespaces/ml/rayjobs",
                          "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies"}
    assert posts["/apis/ray.io/v1/namespaces/ml/rayjobs"]["metadata"]["name"] == name
    patch = next(b for m, p, b in fake_cluster["calls"] if m == "PATCH")
    owner = {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name, "uid": f"uid-{name}"}
    assert patch["metadata"]["ownerReferences"][0] == owner
    # The job's NetworkPolicy is made after the RayJob, owned by it (deleted with it).
    policy = posts["/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies"]
    assert policy["metadata"]["ownerReferences"] == [owner]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"cxrfm.io/job": name}}

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
