"""The Kubernetes API side of `cxrfm jobs`: create, watch, read logs of and stop the RayJob manifests.py
builds, with the kubernetes Python client.

Every failure a user can hit (no kubeconfig, unreachable server, no KubeRay CRDs, missing or forbidden
namespace, name clash) becomes a `KubeError` with one line saying what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxrfm.jobs.manifests import GROUP, KIND, KUBERAY_HINT, PLURAL, VERSION


class KubeError(RuntimeError):
    """A Kubernetes problem the user can fix; the message is one line saying how."""


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A client for the cluster in `kubeconfig` (or $KUBECONFIG, ~/.kube/config, or the in-cluster
    service account), or one clear KubeError."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or str(Path.home() / ".kube" / "config")
    if Path(path).is_file():
        try:
            return config.new_client_from_config(config_file=path, context=context)
        except ConfigException as err:
            raise KubeError(f"kubeconfig {path} is unusable ({err}); fix it or pass --kubeconfig") from None
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config()
        except ConfigException as err:
            raise KubeError(f"inside a cluster but its service account is unusable ({err}); pass --kubeconfig") from None
        return client.ApiClient()
    raise KubeError(f"no kubeconfig at {path} and not running inside a cluster; set KUBECONFIG or pass "
                    "--kubeconfig pointing at your cluster's config (or use --dry-run to print the manifest)")


def _server(api) -> str:
    return api.configuration.host


def _explain(err, api, action: str, namespace: str) -> KubeError:
    """One line for an ApiException, naming the server, the action and the fix."""
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or (err.reason or "").strip() or str(err.status)
    kind = (body.get("details") or {}).get("kind")
    if err.status == 401:
        return KubeError(f"{_server(api)} rejected the credentials in your kubeconfig (401); refresh them and retry")
    if err.status == 403:
        return KubeError(f"forbidden to {action} in namespace {namespace!r} on {_server(api)}: {message}; "
                         "ask for a Role allowing it there, or pick another --namespace")
    if err.status == 404 and (kind == "namespaces" or "namespaces" in message):
        return KubeError(f"namespace {namespace!r} does not exist on {_server(api)}; create it "
                         f"(kubectl create namespace {namespace}) or pass --namespace")
    if err.status == 409:
        return KubeError(f"cannot {action}: {message}")
    return KubeError(f"cannot {action} on {_server(api)} ({err.status}): {message}")


def _call(api, action: str, namespace: str, fn, *args, missing_ok: bool = False, **kwargs):
    """Run one API call; ApiException and connection failures become one-line KubeErrors.
    With `missing_ok`, a 404 returns None instead."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as err:
        if missing_ok and err.status == 404:
            return None
        raise _explain(err, api, action, namespace) from None
    except HTTPError as err:
        reason = getattr(err, "reason", None) or err
        raise KubeError(f"cannot reach the Kubernetes API server at {_server(api)} ({reason}); "
                        "check the cluster is up and your kubeconfig context") from None


def require_kuberay(api) -> None:
    """Discovery says whether ray.io/v1 serves rayjobs; without the CRDs a create would only 404."""
    from kubernetes import client

    found = _call(api, "discover ray.io/v1", "(cluster)", client.CustomObjectsApi(api).get_api_resources,
                  GROUP, VERSION, missing_ok=True)
    if found is None or PLURAL not in {r.name for r in found.resources or []}:
        raise KubeError(f"the cluster at {_server(api)} has no KubeRay CRDs ({KIND} {GROUP}/{VERSION}); {KUBERAY_HINT}")


def create(api, manifests: list[dict[str, Any]]) -> str:
    """Create the spec ConfigMap, the RayJob and its NetworkPolicy; the ConfigMap and the policy are then
    owned by the RayJob."""
    from kubernetes import client

    configmap, rayjob, policy = manifests
    ns, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
    require_kuberay(api)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    _call(api, "create configmaps", ns, core.create_namespaced_config_map, ns, configmap)
    try:
        created = _call(api, "create rayjobs.ray.io", ns, custom.create_namespaced_custom_object,
                        GROUP, VERSION, ns, PLURAL, rayjob)
    except KubeError:
        _call(api, "delete configmaps", ns, core.delete_namespaced_config_map, configmap["metadata"]["name"], ns)
        raise
    owner = {"metadata": {"ownerReferences": [
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name, "uid": created["metadata"]["uid"]}]}}
    _call(api, "patch configmaps", ns, core.patch_namespaced_config_map, configmap["metadata"]["name"], ns, owner)
    _call(api, "create networkpolicies", ns, client.NetworkingV1Api(api).create_namespaced_network_policy, ns,
          {**policy, "metadata": {**policy["metadata"], **owner["metadata"]}})
    return name


def status(api, name: str, namespace: str) -> dict[str, Any]:
    from kubernetes import client

    obj = _call(api, f"get rayjob {name}", namespace, client.CustomObjectsApi(api).get_namespaced_custom_object,
                GROUP, VERSION, namespace, PLURAL, name)
    st = obj.get("status") or {}
    return {"name": name, "namespace": namespace, "job_status": st.get("jobStatus", "PENDING"),
            "deployment_status": st.get("jobDeploymentStatus", "New"), "message": st.get("message", ""),
            "ray_cluster": st.get("rayClusterName", ""), "dashboard": st.get("dashboardURL", ""),
            "start_time": st.get("startTime", ""), "end_time": st.get("endTime", "")}


def logs(api, name: str, namespace: str, follow: bool = False) -> Iterator[str]:
    """The submitter pod's log: it runs `ray job submit` and then tails the job's own log."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    pods = _call(api, "list pods", namespace, core.list_namespaced_pod, namespace,
                 label_selector=f"job-name={name}").items
    if not pods:
        st = status(api, name, namespace)
        raise KubeError(f"RayJob {name} has no submitter pod yet (deployment status {st['deployment_status']}); "
                        "retry once the Ray cluster is up")
    # A retried submitter leaves older pods behind; the newest one is the live attempt.
    pod = max(pods, key=lambda p: str(p.metadata.creation_timestamp or "")).metadata.name
    resp = _call(api, f"read the log of pod {pod}", namespace, core.read_namespaced_pod_log, pod, namespace,
                 follow=follow, _preload_content=False)
    try:
        for chunk in resp.stream(4096):
            yield from chunk.decode(errors="replace").splitlines()
    finally:
        resp.release_conn()


def stop(api, name: str, namespace: str) -> None:
    """Delete the RayJob; KubeRay removes its RayCluster and pods, the owned ConfigMap goes too."""
    from kubernetes import client

    _call(api, f"delete rayjob {name}", namespace, client.CustomObjectsApi(api).delete_namespaced_custom_object,
          GROUP, VERSION, namespace, PLURAL, name, body={"propagationPolicy": "Foreground"})
