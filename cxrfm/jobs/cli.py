"""`cxrfm jobs submit|status|logs|stop`: run a job spec on a Ray cluster or on Kubernetes (KubeRay)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cxrfm.config import DEFAULT_JOB, ConfigError, load_config
from cxrfm.jobs import kube, manifests
from cxrfm.jobs.ray_jobs import (DEFAULT_RAY_ADDRESS, JobError, logs_ray, status_ray, stop_ray,
                                 submit_ray)


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
    objs = manifests.rayjob_manifests(cfg, spec, args.set, namespace=args.namespace, image=args.image, pvc=pvc)
    if args.dry_run:
        print(manifests.dump_manifests(objs), end="")
        return 0
    name = kube.create(_kube_api(args), objs)
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


def add_parser(subparsers) -> argparse.ArgumentParser:
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
                   help="container image (default: the spec's job.image, %s)" % manifests.DEFAULT_IMAGE)
    p.add_argument("--pvc", default="cxrfm-shared",
                   help=f"shared PersistentVolumeClaim mounted at {manifests.SHARED_MOUNT} ('none': pod-local disk only)")
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
