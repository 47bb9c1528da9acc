"""A real multi-node Ray cluster on this machine for tests: a head and worker nodes, each its own
`ray start --block` with its own temp dir, free ports and custom resources. Every process carries this
cluster's marker in its environment, so `stop()` ends exactly this cluster's processes (and those a node
left behind), never another Ray on the machine."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER_ENV = "CXRFM_TEST_RAY_CLUSTER"


def free_ports(n: int) -> list[int]:
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


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: str
    resources: dict
    lost: bool = False  # its raylet was killed on purpose (LocalCluster.lose); its processes stop at teardown

    def raylet_pid(self) -> int | None:
        import psutil

        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name() == "raylet":
                    return child.pid
        except psutil.Error:
            return None
        return None


@dataclass
class LocalCluster:
    root: Path
    marker: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(6)}")
    nodes: dict[str, Node] = field(default_factory=dict)
    gcs_address: str = ""
    dashboard: str = ""

    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)  # this interpreter's ray and cxrfm, venv activated or not
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), RAY_AUTH_MODE="disabled",
                   RAY_USAGE_STATS_ENABLED="0", **{MARKER_ENV: self.marker},
                   # a killed raylet is declared dead after ~5 failed 2 s checks; patient enough for a loaded
                   # 2-core machine, quick enough for a test
                   RAY_health_check_period_ms="2000", RAY_health_check_timeout_ms="10000",
                   RAY_health_check_failure_threshold="5", RAY_DASHBOARD_STARTUP_TIMEOUT_S="240")
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        return env

    def _start(self, name: str, args: list[str], num_cpus: float, resources: dict) -> Node:
        tmp = tempfile.mkdtemp(prefix=f"cxrfm-{name}-", dir="/tmp")  # short: Ray's socket paths are length-limited
        nm, om, metrics, agent, agent_grpc, runtime_env = free_ports(6)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args,
               "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
               "--node-manager-port", str(nm), "--object-manager-port", str(om), "--metrics-export-port", str(metrics),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env), "--min-worker-port", "0", "--max-worker-port", "0",
               "--object-store-memory", str(150 * 2**20), "--temp-dir", tmp, "--disable-usage-stats"]
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env(), start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        node = Node(name, proc, tmp, resources)
        self.nodes[name] = node
        return node

    def start_head(self, num_cpus: float = 2, resources: dict | None = None) -> None:
        gcs, dash, client = free_ports(3)
        self._start("head", ["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--ray-client-server-port", str(client), "--include-dashboard", "true"],
                    num_cpus, resources or {})
        self.gcs_address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"

    def add_node(self, name: str, num_cpus: float, resources: dict) -> Node:
        return self._start(name, ["--address", self.gcs_address], num_cpus, resources)

    def lose(self, name: str) -> None:
        """Kill the node's raylet (SIGKILL), as when a machine goes away; its worker processes exit when they
        notice. The node stays in `nodes` (stopped at teardown) but is never used or started again."""
        node = self.nodes[name]
        pid = node.raylet_pid()
        assert pid is not None, f"no raylet under {name}'s `ray start`: {self.log_tail(name)}"
        os.kill(pid, signal.SIGKILL)
        node.lost = True

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, timeout=20) if n.state == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 300) -> list:
        deadline = time.monotonic() + timeout
        while True:
            try:
                alive = self.alive_nodes()
                if len(alive) >= count:
                    return alive
            except Exception:  # noqa: BLE001 - the dashboard is not up yet
                pass
            for node in self.nodes.values():
                assert node.proc.poll() is None or node.lost, \
                    f"`ray start` of {node.name} exited: {self.log_tail(node.name)}"
            assert time.monotonic() < deadline, f"{count} Ray nodes not alive after {timeout} s: {self.log_tail('head')}"
            time.sleep(1)

    def node_id_of(self, name: str) -> str:
        """The node whose custom resources are this test node's own (each node has a resource named after it)."""
        [node] = [n.node_id for n in self.alive_nodes() if n.resources_total.get(name)]
        return node

    def log_tail(self, name: str) -> str:
        try:
            return (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def processes(self) -> list:
        import psutil

        found = {}
        for node in self.nodes.values():
            try:
                parent = psutil.Process(node.proc.pid)
                found[parent.pid] = parent
                found.update((c.pid, c) for c in parent.children(recursive=True))
            except psutil.Error:
                pass
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER_ENV) == self.marker:
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        """End this cluster's processes: SIGTERM, then SIGKILL what is left after 15 s; remove temp dirs."""
        import shutil

        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive + self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        for node in self.nodes.values():
            try:
                node.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            shutil.rmtree(node.temp_dir, ignore_errors=True)
