"""`cxrfm jobs submit|status|logs|stop`: run a job spec on a Ray cluster or on Kubernetes (KubeRay).

    cxrfm jobs submit jobs/tiny.yaml --to ray http://127.0.0.1:8265 --set train.max_steps=10
    cxrfm jobs logs <job id> --to ray http://127.0.0.1:8265 --follow
    cxrfm jobs submit jobs/pretrain-m4cxr.yaml --to kubernetes --namespace cxrfm [--dry-run]
    cxrfm jobs status <rayjob name> --to kubernetes --namespace cxrfm

A spec is a cxrfm config whose `job` section names the entrypoint, the Ray runtime environment and
the resources (container image, nodes, GPUs per node and their kind, CPUs and memory per node). It is
validated here, before anything is submitted. The job runs the spec as
written plus the `--set` overrides, which are passed on the entrypoint so the dashboard shows them.

Ray: through the Ray Jobs API (`JobSubmissionClient`); the spec is uploaded as the job's working
directory, so a remote cluster needs cxrfm installed (the cluster/Dockerfile image) but not this
checkout. Kubernetes: see cxrfm/kube.py.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxrfm import kube
from cxrfm.config import DEFAULT_JOB, ConfigError, load_config

DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 90


class JobError(RuntimeError):
    """A submission problem the user can fix; one line."""


# ---- Ray Jobs API -------------------------------------------------------------------------------

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
    submission_id = submission_id or f"{kube.job_name(cfg)}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
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
                return client.submit_job(entrypoint=kube.entrypoint(cfg, spec_arg, overrides), runtime_env=runtime_env,
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


# ---- CLI ----------------------------------------------------------------------------------------

def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    to = args.to
    if to[0] not in ("ray", "kubernetes") or len(to) > 2 or (to[0] == "kubernetes" and len(to) > 1):
        raise JobError(f"--to {' '.join(to)}: use `--to ray [ADDRESS]` or `--to kubernetes` (put SPEC or JOB "
                       "before --to)")
    if to[0] == "ray":
        return "ray", to[1] if len(to) > 1 else os.environ.get("RAY_ADDRESS") or DEFAULT_RAY_ADDRESS
    return "kubernetes", None


def _kube_api(args: argparse.Namespace):
    return kube.api_client(args.kubeconfig, args.context)


def _submit(args: argparse.Namespace) -> int:
    backend, address = _target(args)
    spec = Path(args.spec or DEFAULT_JOB)
    if backend == "ray":
        if args.dry_run:
            raise JobError("--dry-run prints a Kubernetes manifest; use it with --to kubernetes")
        job_id = submit_ray(spec, address, args.set)
        print(f"submitted {job_id} to {address}")
        print(f"  cxrfm jobs logs {job_id} --to ray {address} --follow")
        if args.follow:
            return 0 if logs_ray(job_id, address, follow=True) == "SUCCEEDED" else 1
        return 0
    cfg = load_config(spec, args.set)
    pvc = None if args.pvc in ("", "none") else args.pvc
    manifests = kube.rayjob_manifests(cfg, spec, args.set, namespace=args.namespace, image=args.image, pvc=pvc)
    if args.dry_run:
        print(kube.dump_manifests(manifests), end="")
        return 0
    name = kube.create(_kube_api(args), manifests)
    print(f"submitted RayJob {name} to namespace {args.namespace}")
    print(f"  cxrfm jobs status {name} --to kubernetes --namespace {args.namespace}")
    return 0


def _status(args: argparse.Namespace) -> int:
    backend, address = _target(args)
    if backend == "ray":
        st = status_ray(args.job, address)
        print(f"{st['job_id']}: {st['status']}" + (f" - {st['message']}" if st["message"] else ""))
        return 0
    st = kube.status(_kube_api(args), args.job, args.namespace)
    print(f"{st['name']}: job {st['job_status']}, deployment {st['deployment_status']}"
          + (f", cluster {st['ray_cluster']}" if st["ray_cluster"] else "")
          + (f" - {st['message']}" if st["message"] else ""))
    return 0


def _logs(args: argparse.Namespace) -> int:
    backend, address = _target(args)
    if backend == "ray":
        final = logs_ray(args.job, address, follow=args.follow)
        if args.follow:
            print(f"[cxrfm] job {args.job} finished: {final}", file=sys.stderr)
            return 0 if final == "SUCCEEDED" else 1
        return 0
    api = _kube_api(args)
    for line in kube.logs(api, args.job, args.namespace, follow=args.follow):
        print(line, flush=True)
    if args.follow:
        final = kube.status(api, args.job, args.namespace)["job_status"]
        print(f"[cxrfm] RayJob {args.job} finished: {final}", file=sys.stderr)
        return 0 if final == "SUCCEEDED" else 1
    return 0


def _stop(args: argparse.Namespace) -> int:
    backend, address = _target(args)
    if backend == "ray":
        stopped = stop_ray(args.job, address)
        print(f"{args.job}: {'stop requested' if stopped else 'already finished'}")
        return 0
    kube.stop(_kube_api(args), args.job, args.namespace)
    print(f"deleted RayJob {args.job} in namespace {args.namespace} (its Ray cluster goes with it)")
    return 0


def _guard(handler):
    """Errors a user can cause end as one line on stderr and exit status 2, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        from requests.exceptions import RequestException

        try:
            return handler(args)
        except (JobError, kube.KubeError, ConfigError) as err:
            print(f"cxrfm jobs: {err}", file=sys.stderr)
            return 2
        except RequestException as err:  # the Ray dashboard went away mid-request
            print(f"cxrfm jobs: lost the connection to the Ray dashboard ({type(err).__name__}); retry, or check "
                  "the head with `ray status`", file=sys.stderr)
            return 2
    run.__name__ = handler.__name__
    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", nargs="+", required=True, metavar="BACKEND",
                   help="`ray [ADDRESS]` (default $RAY_ADDRESS or %s) or `kubernetes`" % DEFAULT_RAY_ADDRESS)
    p.add_argument("--namespace", "-n", default="default", help="Kubernetes namespace (default: default)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")


def add_jobs_parser(subparsers) -> argparse.ArgumentParser:
    jobs = subparsers.add_parser("jobs", help="submit and watch jobs on Ray or Kubernetes (KubeRay)",
                                 description=__doc__.split("\n\n")[0])
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="{submit,status,logs,stop}")

    p = sub.add_parser("submit", help="submit a job spec")
    p.add_argument("spec", nargs="?", default=None, help="job YAML (default jobs/tiny.yaml)")
    _common(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the Kubernetes manifests instead of creating them")
    p.add_argument("--follow", action="store_true", help="ray: stream the log until the job ends")
    p.add_argument("--image", default=None,
                   help="container image (default: the spec's job.image, %s)" % kube.DEFAULT_IMAGE)
    p.add_argument("--pvc", default="cxrfm-shared",
                   help=f"shared PersistentVolumeClaim mounted at {kube.SHARED_MOUNT} ('none': pod-local disk only)")
    p.set_defaults(func=_guard(_submit))

    for name, helptext, handler in (("status", "show a job's status", _status),
                                    ("logs", "print a job's log", _logs),
                                    ("stop", "stop a job (Kubernetes: delete the RayJob)", _stop)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("job", help="the id `submit` printed (Ray submission id or RayJob name)")
        _common(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(func=_guard(handler))
    return jobs
