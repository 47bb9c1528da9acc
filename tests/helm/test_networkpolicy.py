"""Who can reach what, computed from the rendered NetworkPolicies (Kubernetes semantics: a pod selected
by any policy of a direction admits only what some such policy allows, in each direction; both the
sender's egress and the receiver's ingress must allow a connection). The pods are the ones the release
really makes (every pod template, KubeRay's included) plus pods outside it: the ingress controller, the
KubeRay operator, another pod of the release's namespace and a pod of another namespace.

The expected table is the README's "Security model"."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.helm.render import VALUE_SETS, load_chart, pod_templates, render

NS = "ml"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ports: tuple[tuple[str, int], ...] = ()  # named container ports

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


def matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist); {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": not (key in labels and labels[key] in values),
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # pod traffic is judged by the pod and namespace selectors
    ns_labels = {"kubernetes.io/metadata.name": pod.namespace}
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], ns_labels):
            return False
    elif pod.namespace != policy_ns:
        return False
    return matches(peer.get("podSelector"), pod.label_dict()) if "podSelector" in peer else True


def port_matches(rule: dict, target: Pod, port: int) -> bool:
    if "ports" not in rule:
        return True
    named = dict(target.ports)
    for p in rule["ports"]:
        if p.get("protocol", "TCP") != "TCP":
            continue
        want = p.get("port")
        if want is None or want == port or (isinstance(want, str) and named.get(want) == port):
            return True
    return False


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int) -> bool:
    def direction(kind: str, subject: Pod, other: Pod, key: str, peers_key: str) -> bool:
        selecting = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
                     and kind in p["spec"].get("policyTypes", ["Ingress"])
                     and matches(p["spec"]["podSelector"], subject.label_dict())]
        if not selecting:
            return True
        for p in selecting:
            for rule in p["spec"].get(key) or []:
                peers = rule.get(peers_key)
                if (peers is None or any(peer_matches(peer, p["metadata"]["namespace"], other) for peer in peers)) \
                        and port_matches(rule, dst, port):
                    return True
        return False

    return direction("Egress", src, dst, "egress", "to") and direction("Ingress", dst, src, "ingress", "from")


def release_pods(docs: list[dict]) -> dict[str, Pod]:
    """One pod per pod template, named by what it is."""
    pods: dict[str, Pod] = {}
    for d in docs:
        for t in pod_templates(d):
            labels = t["metadata"]["labels"]
            node = labels.get("cxrfm.io/ray-node")
            name = labels["app.kubernetes.io/component"] + (f"-{node}" if node else "")
            ports = tuple((p["name"], p["containerPort"]) for c in t["spec"]["containers"] for p in c.get("ports", [])
                          if "name" in p)
            pods[name] = Pod(name, NS, tuple(sorted(labels.items())), ports)
    return pods


OUTSIDE = {
    "ingress-controller": Pod("ingress-controller", "ingress-nginx", (("app.kubernetes.io/name", "ingress-nginx"),)),
    "kuberay-operator": Pod("kuberay-operator", "kuberay-system", (("app.kubernetes.io/name", "kuberay-operator"),)),
    "other-pod-same-namespace": Pod("other-pod-same-namespace", NS, (("app", "notebook"),)),
    "pod-in-other-namespace": Pod("pod-in-other-namespace", "notebooks", (("app", "notebook"),)),
    "other-pod-in-operator-namespace": Pod("other-pod-in-operator-namespace", "kuberay-system", (("app", "x"),)),
}


def who_reaches(values: dict) -> tuple[dict[tuple[str, int], set[str]], dict[str, Pod]]:
    chart = load_chart()
    try:
        docs = render(chart, values, namespace=NS)
    finally:
        chart.close()
    policies = [{**d, "metadata": {**d["metadata"], "namespace": NS}} for d in docs if d["kind"] == "NetworkPolicy"]
    pods = release_pods(docs)
    everyone = {**pods, **OUTSIDE}
    targets = {("training-head", 8265), ("serving-head", 8265), ("mlflow", 5000), ("postgresql", 5432),
               ("objectstore", 9000), ("serving-worker", 8000), ("serving-head", 6379)}
    table = {(t, port): {n for n, src in everyone.items() if n != t and allowed(policies, src, pods[t], port)}
             for t, port in targets if t in pods}
    return table, pods


def test_who_reaches_the_dashboards_mlflow_and_the_database():
    table, pods = who_reaches({})
    assert {"training-head", "training-worker", "training-submitter", "serving-head", "serving-worker", "mlflow",
            "postgresql", "objectstore"} == set(pods)
    # Ray dashboard / Jobs API: the operator, the job's own submitter, the cluster's own Ray pods.
    assert table[("training-head", 8265)] == {"kuberay-operator", "training-submitter", "training-worker"}
    assert table[("serving-head", 8265)] == {"kuberay-operator", "serving-worker"}
    # The serving GCS is not reachable from the training cluster or anything else.
    assert table[("serving-head", 6379)] == {"serving-worker"}
    # MLflow (no auth of its own): the release's Ray pods only.
    assert table[("mlflow", 5000)] == {"training-head", "training-worker", "serving-head", "serving-worker"}
    # The database and the object store: MLflow only.
    assert table[("postgresql", 5432)] == {"mlflow"}
    assert table[("objectstore", 9000)] == {"mlflow"}
    # Serve traffic from outside comes through the ingress controller only.
    assert table[("serving-worker", 8000)] == {"ingress-controller", "serving-head"}


def test_mlflow_client_namespaces_open_mlflow_and_nothing_else():
    table, _ = who_reaches(VALUE_SETS["platform"])
    assert table[("mlflow", 5000)] == {"training-head", "training-worker", "serving-head", "serving-worker",
                                       "pod-in-other-namespace"}
    assert table[("postgresql", 5432)] == {"mlflow"}
    assert "pod-in-other-namespace" not in table[("training-head", 8265)] | table[("serving-head", 8265)]


@pytest.mark.parametrize("name", ["default", "platform", "external-stores"])
def test_release_pods_cannot_reach_unlisted_ports_of_each_other(name):
    """Default deny holds for ports no policy names: MLflow cannot open a Ray head's dashboard, serving
    pods cannot reach PostgreSQL, the submitter reaches the training head's Jobs API and nothing else."""
    chart = load_chart()
    try:
        docs = render(chart, VALUE_SETS[name], namespace=NS)
    finally:
        chart.close()
    policies = [{**d, "metadata": {**d["metadata"], "namespace": NS}} for d in docs if d["kind"] == "NetworkPolicy"]
    pods = release_pods(docs)
    if "mlflow" in pods and "training-head" in pods:
        assert not allowed(policies, pods["mlflow"], pods["training-head"], 8265)
    if "postgresql" in pods:
        assert not allowed(policies, pods["serving-worker"], pods["postgresql"], 5432)
    if "training-submitter" in pods:
        reach = {(t, port) for t in pods for port in (8265, 6379, 5000, 8000) if t != "training-submitter"
                 and allowed(policies, pods["training-submitter"], pods[t], port)}
        assert reach == {("training-head", 8265)}
    # No release pod is left without a policy in either direction.
    for pod in pods.values():
        for kind in ("Ingress", "Egress"):
            assert any(kind in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], pod.label_dict())
                       for p in policies), (pod.name, kind)


@pytest.mark.parametrize("endpoint,port", [("https://s3.example.org", 443), ("http://minio.storage:9000", 9000),
                                           ("http://s3.local", 80), ("", 443)])
def test_mlflow_egress_to_an_external_object_store_uses_its_port(endpoint, port):
    values = {"mlflow": {"artifactStore": {"internal": False, "endpointUrl": endpoint, "existingSecret": "s3"}}}
    chart = load_chart()
    try:
        docs = render(chart, values, namespace=NS)
    finally:
        chart.close()
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "demo-cxrfm-mlflow"]
    open_ports = [p["port"] for rule in policy["spec"]["egress"] if "to" not in rule for p in rule["ports"]]
    assert open_ports == [port]  # the internal database is reached by pod selector, not by port alone
