"""`cxrfm jobs submit|status|logs|stop`: run a job spec on a Ray cluster or on Kubernetes (KubeRay).

    cxrfm jobs submit jobs/tiny.yaml --to ray http://127.0.0.1:8265 --set train.max_steps=10
    cxrfm jobs logs <job id> --to ray http://127.0.0.1:8265 --follow
    cxrfm jobs submit jobs/pretrain-m4cxr.yaml --to kubernetes --namespace cxrfm [--dry-run]
    cxrfm jobs status <rayjob name> --to kubernetes --namespace cxrfm

A spec is a cxrfm config whose `job` section names the entrypoint, the Ray runtime environment and
the resources (container image, nodes, GPUs per node and their kind, CPUs and memory per node). It is
validated here, before anything is submitted. The job runs the spec as
written plus the `--set` overrides, which are passed on the entrypoint so the dashboard shows them.

The parts: manifests.py (a spec -> the entrypoint and the KubeRay RayJob, ConfigMap and NetworkPolicy),
ray_jobs.py (the Ray Jobs API client), kube.py (the Kubernetes API client), cli.py (the commands).
"""

from cxrfm.jobs.ray_jobs import JobError, logs_ray, status_ray, stop_ray, submit_ray

__all__ = ["JobError", "logs_ray", "status_ray", "stop_ray", "submit_ray"]
