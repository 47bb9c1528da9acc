"""Head-node failure: Ray's GCS with fault tolerance backed by a real Redis (Debian's redis-server, on
loopback). The GCS server process is killed while a load runs: the running replicas keep answering through
the proxy, and once a GCS is back (restarted with the same command line, as a head pod restart does) the
application is still deployed and serving. Prints the error count during the outage."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest
import requests

from tests.serving.conftest import free_port, image_bytes

pytestmark = pytest.mark.slow
REDIS = shutil.which("redis-server")

DEPLOY = r'''
import sys, ray
from ray import serve
from cxrfm.serving.app import build_app
ray.init(address=sys.argv[1], namespace="serve")
small = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.2}}
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[4])})
serve.run(build_app({"tenants": sys.argv[2], "models": {"base": sys.argv[3]}, "tasks": ["vqa"],
                     "deployment_options": {"Ingress": small, "TextGenerator": small}}), name="ft", route_prefix="/")
'''
STATUS = r'''
import sys, ray
from ray import serve
ray.init(address=sys.argv[1], namespace="serve")
app = serve.status().applications.get("ft")
print(getattr(app.status, "value", app.status) if app else "MISSING")
'''


def _ours(temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster this test started: those naming its temp dir, and their children."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                procs += [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
    return list({p.pid: p for p in procs}.values())


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install -y redis-server; .ci/run does)")
def test_gcs_killed_under_load_then_restarted(tmp_path, tiny_export_for_ft):
    from cxrfm.serving.tenants import Tenant, add_tenant

    # Only this cluster's processes name it: found and stopped by it. Short: Ray's socket paths must fit 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="cxrfm-ft-")
    redis_port, gcs_port, http_port = free_port(), free_port(), free_port()
    redis = subprocess.Popen([REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    env = {**os.environ, "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_port}", "RAY_external_storage_namespace": "cxrfm-ft",
           "RAY_gcs_rpc_server_reconnect_timeout_s": "120", "RAY_AUTH_MODE": "disabled",  # a private loopback cluster
           "RAY_agent_register_timeout_ms": "180000", "RAY_raylet_start_wait_time_s": "120"}  # busy 2-core machines
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{gcs_port}"
    store = tmp_path / "tenants.yaml"
    key = add_tenant(store, Tenant(name="ft", tasks=["vqa"], rate_per_s=1000, burst=1000, max_concurrency=64))
    try:
        for cmd in ([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port", str(gcs_port),
                     "--temp-dir", temp_dir, "--num-cpus", "2", "--include-dashboard", "false",
                     "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
                    [sys.executable, "-c", DEPLOY, address, str(store), str(tiny_export_for_ft), str(http_port)]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        url = f"http://127.0.0.1:{http_port}"
        body = {"images": {"frontal": __import__("base64").b64encode(image_bytes()).decode()}, "question": "effusion?",
                "max_new_tokens": 1}
        events, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                try:
                    r = requests.post(url + "/v1/vqa", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
                    events.append((time.monotonic(), r.status_code))
                except requests.RequestException as e:
                    events.append((time.monotonic(), type(e).__name__))
                time.sleep(0.05)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(5)
        gcs = next(p for p in _ours(temp_dir) if p.name() == "gcs_server")
        cmdline, gcs_env = gcs.cmdline(), gcs.environ()
        killed = time.monotonic()
        gcs.send_signal(signal.SIGKILL)
        gcs.wait(timeout=30)
        time.sleep(15)  # the outage: the head's GCS is gone
        restarted = time.monotonic()
        subprocess.Popen(cmdline, env=gcs_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(15)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        outage = [s for t, s in events if killed <= t < restarted]
        after = [s for t, s in events if t >= restarted]
        errors = [s for s in outage if s != 200]
        print(f"\nGCS outage {restarted - killed:.0f} s: {len(outage)} requests, {len(errors)} errors {set(errors) or ''}; "
              f"after the restart: {len(after)} requests, {sum(s != 200 for s in after)} errors")
        assert outage.count(200) >= 10, outage  # the replicas kept answering without a GCS
        status = subprocess.run([sys.executable, "-c", STATUS, address], env=env, capture_output=True, text=True,
                                timeout=300)
        assert status.stdout.strip().splitlines()[-1] == "RUNNING", status.stdout + status.stderr[-2000:]
        r = requests.post(url + "/v1/vqa", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        for p in _ours(temp_dir):
            try:
                p.kill()
            except psutil.Error:
                pass
        redis.terminate()
        redis.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_export_for_ft(tmp_path_factory):
    from cxrfm.serving.cli import build_untrained_export

    return build_untrained_export(tmp_path_factory.mktemp("ft") / "export")
