"""`cxrfm jobs --to ray` against a real Ray head started on this machine (loopback, auth off, free
ports): submit, follow, status, stop, and the tiny training job run through the Jobs API."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import yaml

from cxrfm.jobs import logs_ray, status_ray, stop_ray, submit_ray
from cxrfm.jobs import ray_jobs as jobs_module

from tests.test_jobs import REPO, run_cli


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



def test_kuberay_submitter_line_keeps_quoted_overrides(ray_head):
    """KubeRay's default submitter runs `ray job submit --address ... --submission-id ... -- <entrypoint>`
    in bash; Ray's CLI re-joins bash's words (shlex.join) and the head's shell runs the result. Against a
    real head, the entrypoint `cxrfm jobs` builds brings every quoting case to the job unchanged."""
    import json
    import shlex

    from cxrfm.config import load_config
    from cxrfm.jobs import manifests
    from tests.test_jobs import QUOTING_CASES

    probe = "python -c \"import json, sys; print('ARGV=' + json.dumps(sys.argv[1:]))\" {overrides}"
    command = manifests.entrypoint(load_config(None, [f"job.entrypoint={probe}"]), "jobs/x.yaml", QUOTING_CASES)
    submission = f"rayjob-quoting-{secrets.token_hex(3)}"
    bindir = str(Path(sys.executable).parent)
    line = (f"{shlex.quote(sys.executable)} -m ray.scripts.scripts job submit --address {ray_head} "
            f"--submission-id {submission} -- {command}")
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled",
                                   PATH=bindir + os.pathsep + os.environ.get("PATH", "")))
    argv = [json.loads(out[5:]) for out in done.stdout.splitlines() if out.startswith("ARGV=")]
    assert argv == [sum((["--set", o] for o in QUOTING_CASES), [])], (done.stdout + done.stderr)[-3000:]
    assert status_ray(submission, ray_head)["status"] == "SUCCEEDED"
