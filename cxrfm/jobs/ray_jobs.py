"""`cxrfm jobs --to ray`: submit a job spec through the Ray Jobs API (`JobSubmissionClient`), read its
status and logs, stop it. The spec is uploaded as the job's working directory, so a remote cluster needs
cxrfm installed (the cluster/Dockerfile image) but not this checkout."""

from __future__ import annotations

import asyncio
import copy
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxrfm.config import load_config
from cxrfm.jobs import manifests

DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 90


class JobError(RuntimeError):
    """A submission problem the user can fix; one line."""


def _ray_client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        # Ray clusters started where a token exists (~/.ray/auth_token) require it on every request.
        raise JobError(f"the Ray cluster at {address} requires an auth token: set RAY_AUTH_MODE=token and "
                       "RAY_AUTH_TOKEN (or put the cluster's token in ~/.ray/auth_token)") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise JobError(f"cannot reach a Ray dashboard at {address} ({str(err).splitlines()[0]}); start one with "
                       "`ray start --head` or pass the cluster's dashboard address (port 8265)") from None


def submit_ray(spec: str | Path, address: str, overrides: list[str] | tuple[str, ...] = (),
               submission_id: str | None = None) -> str:
    """Submit `spec` (+ overrides) to the Ray cluster at `address`; returns the submission id."""
    from requests.exceptions import RequestException

    spec = Path(spec)
    cfg = load_config(spec, list(overrides))
    runtime_env: dict[str, Any] = copy.deepcopy(cfg.job.runtime_env)
    submission_id = submission_id or f"{manifests.job_name(cfg)}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    client = _ray_client(address)
    with tempfile.TemporaryDirectory(prefix="cxrfm-job-") as tmp:
        if "working_dir" in runtime_env:
            # The user ships a directory of their own: the spec must be inside it to travel along.
            root = Path(runtime_env["working_dir"]).resolve()
            try:
                spec_arg = str(spec.resolve().relative_to(root))
            except ValueError:
                raise JobError(f"{spec} is outside job.runtime_env.working_dir ({root}); move it there or drop "
                               "working_dir so cxrfm uploads the spec itself") from None
        else:
            # Upload only the spec: the working directory becomes the job's cwd on the cluster.
            (Path(tmp) / "jobs").mkdir()
            shutil.copy(spec, Path(tmp) / "jobs" / spec.name)
            runtime_env["working_dir"] = tmp
            spec_arg = f"jobs/{spec.name}"
        deadline, retried = time.monotonic() + AGENT_WAIT_S, False
        while True:
            try:
                return client.submit_job(entrypoint=manifests.entrypoint(cfg, spec_arg, overrides), runtime_env=runtime_env,
                                         submission_id=submission_id,
                                         metadata={"cxrfm_spec": spec.name, "cxrfm_job": cfg.job.name})
            except (RuntimeError, RequestException) as err:
                text = str(err).splitlines()[0] if str(err) else type(err).__name__
                # The submission id makes a retry safe: a first attempt that did land shows up as a clash.
                if retried and "already exists" in text:
                    return submission_id
                # A head that just started (or is overloaded) answers before its job agent is ready,
                # or drops the connection: try again for a while.
                transient = isinstance(err, RequestException) or "No available agent" in text
                if transient and time.monotonic() < deadline:
                    retried = True
                    time.sleep(2)
                    continue
                raise JobError(f"Ray at {address} did not take the job: {text}") from None


def status_ray(job_id: str, address: str) -> dict[str, Any]:
    client = _ray_client(address)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as err:
        raise JobError(f"no job {job_id!r} on the Ray cluster at {address} ({str(err).splitlines()[0]})") from None
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message or "", "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time}


def logs_ray(job_id: str, address: str, follow: bool = False, out=None) -> str:
    """Print the job's log (to the end with `follow`); returns the final status."""
    out = out or sys.stdout
    client = _ray_client(address)
    status_ray(job_id, address)  # a clear error for an unknown id before streaming
    if not follow:
        out.write(client.get_job_logs(job_id))
        out.flush()
        return status_ray(job_id, address)["status"]

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    # The stream closes when the job ends (its final status can lag by a moment), or early when the
    # dashboard drops it; either way, follow means waiting for the end.
    waited = 0.0
    while (st := status_ray(job_id, address)["status"]) not in TERMINAL:
        if waited == 10.0:
            print(f"[cxrfm] the log stream of {job_id} closed early; waiting for the job to end "
                  f"(cxrfm jobs logs {job_id} --to ray {address} shows the rest)", file=sys.stderr)
        time.sleep(0.5)
        waited += 0.5
    return st


def stop_ray(job_id: str, address: str) -> bool:
    client = _ray_client(address)
    status_ray(job_id, address)
    return client.stop_job(job_id)
