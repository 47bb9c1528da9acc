"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk, Helm v4 in-process),
for the default values and several value sets. Every rendered object is validated: core objects with
kubernetes-validate (Kubernetes 1.30 schemas, strict), KubeRay objects against the KubeRay v1.7.0 CRD
schemas vendored in tests/helm/crds (unknown fields are errors). The cluster/ RayCluster specs are
checked the same way. Value checks are in test_values.py, reachability in test_networkpolicy.py and the
security linter in test_linter.py."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from cxrfm.jobs.manifests import validate_kuberay
from tests.helm.render import (CHART, CRDS, K8S_VERSION, REPO, TENANT_KEY, TENANTS_YAML, VALUE_SETS, helm, load_chart,
                               pod_specs, render)


@pytest.fixture(scope="module")
def chart():
    c = load_chart()
    yield c
    c.close()


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(name):
    report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, namespace="ml", kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_validates(chart, name):
    docs = render(chart, VALUE_SETS[name])
    assert docs
    for obj in docs:
        if obj["apiVersion"].startswith("ray.io/"):
            assert validate_kuberay(obj, CRDS) == [], obj["kind"]
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        for pod in pod_specs(obj):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["automountServiceAccountToken"] in (True, False)
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and c["resources"]["limits"], c["name"]
                ctx = c["securityContext"]
                assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
                assert ctx["capabilities"]["drop"] == ["ALL"] and ctx.get("privileged") is not True
                # Only RDMA workers add a capability: IPC_LOCK, which verbs need to pin memory.
                assert ctx["capabilities"].get("add", []) in ([], ["IPC_LOCK"]), c["name"]
        if obj["kind"] == "Service":
            assert obj["spec"]["type"] == "ClusterIP"  # the Ingress is the only way in


def test_default_release_objects(chart):
    docs = render(chart, {})
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    for expected in ("RayJob/demo-cxrfm-train", "RayService/demo-cxrfm", "Deployment/demo-cxrfm-mlflow",
                     "StatefulSet/demo-cxrfm-postgresql", "Deployment/demo-cxrfm-objectstore", "Ingress/demo-cxrfm",
                     "PodDisruptionBudget/demo-cxrfm-serving", "Role/demo-cxrfm-autoscaler", "Secret/demo-cxrfm-tenants",
                     "Secret/demo-cxrfm-postgresql", "Secret/demo-cxrfm-s3", "NetworkPolicy/demo-cxrfm-default-deny",
                     "PersistentVolumeClaim/demo-cxrfm-shared", "ServiceAccount/demo-cxrfm"):
        assert expected in kinds
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    # Training runs the spec in the image and logs to the release's MLflow.
    rayjob = by[("RayJob", "demo-cxrfm-train")]
    assert rayjob["spec"]["entrypoint"] == \
        "cxrfm train /app/jobs/tiny.yaml --set tracking.mlflow_uri=http://demo-cxrfm-mlflow.ml.svc:5000"
    # Serving runs the serve config from values, on CPUs (no GPU workers by default).
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    service = by[("RayService", "demo-cxrfm")]
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    values["serving"]["serveConfig"]["applications"][0]["args"]["device"] = "cpu"
    assert serve == values["serving"]["serveConfig"]
    assert serve["applications"][0]["import_path"] == "cxrfm.serving.app:build_app"
    # Task deployments and the ingress autoscale; the limiter holds the buckets and stays one replica.
    for d in serve["applications"][0]["deployments"]:
        assert ("autoscaling_config" in d) == (d["name"] != "TenantLimiter"), d["name"]
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    ingress = by[("Ingress", "demo-cxrfm")]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == \
        service["spec"]["serveService"]["metadata"]["name"]

    # Least privilege: only the serving head (autoscaler) mounts a token; its Role creates nothing.
    with_token = [p for d in docs for p in pod_specs(d) if p["automountServiceAccountToken"]]
    assert with_token == [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]]
    rules = by[("Role", "demo-cxrfm-autoscaler")]["rules"]
    assert all("*" not in r["verbs"] + r["resources"] and not {"create", "delete"} & set(r["verbs"]) for r in rules)
    # What Ray's KubeRay node provider calls, no more: it never patches a pod.
    assert {(g, res, v) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]} == \
        {("", "pods", "get"), ("", "pods", "list"), ("ray.io", "rayclusters", "get"), ("ray.io", "rayclusters", "patch")}

    # The PDB covers exactly the serving worker pods.
    pdb = by[("PodDisruptionBudget", "demo-cxrfm-serving")]["spec"]["selector"]["matchLabels"]
    worker_labels = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    head_labels = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert pdb.items() <= worker_labels.items() and not pdb.items() <= head_labels.items()


def test_gpu_values(chart):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(chart, VALUE_SETS["pretrain-h100"])}
    job = docs[("RayJob", "demo-cxrfm-train")]["spec"]
    assert job["entrypoint"].endswith("--set train.max_steps=100") and job["activeDeadlineSeconds"] == 604800
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 8
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert docs[("Ingress", "demo-cxrfm")]["spec"]["tls"] == [{"hosts": ["cxr.example.org"], "secretName": "cxr-tls"}]



def test_tenant_store_secret_holds_hashes_and_authenticates(chart, tmp_path):
    from cxrfm.serving.tenants import Authenticator, split_key

    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(chart, VALUE_SETS["pretrain-h100"])}
    store = docs[("Secret", "demo-cxrfm-tenants")]["stringData"]["tenants.yaml"]
    assert TENANT_KEY not in store and split_key(TENANT_KEY)[1] not in store  # hashes only
    # The mounted file is the store `cxrfm tenants add` wrote: the key printed then works against it.
    (tmp_path / "tenants.yaml").write_text(store)
    assert Authenticator(tmp_path / "tenants.yaml").authenticate(TENANT_KEY).name == "acme"
    # With no tenants given, the store is empty (every request 401) rather than holding a made-up key.
    empty = {(d["kind"], d["metadata"]["name"]): d for d in render(chart, {})}
    assert yaml.safe_load(empty[("Secret", "demo-cxrfm-tenants")]["stringData"]["tenants.yaml"]) == \
        {"tenants": {}, "keys": []}


def _ray_pods(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("name", ["default", "external-stores"])
def test_serve_config_is_what_the_application_builds(chart, name):
    """The RayService's serveConfigV2 is accepted by Serve's schema and by the real build_app, names exactly
    the deployments build_app makes (the same set serving/tiny.yaml configures), and its tenants path is
    the Secret every Ray pod mounts."""
    from ray.serve._private.build_app import build_app as serve_build  # what `serve run`/`deploy` call
    from ray.serve.schema import ServeDeploySchema

    from cxrfm.serving.app import AppArgs, build_app
    from cxrfm.serving.cli import IMPORT_PATH

    docs = render(chart, VALUE_SETS[name])
    service = next(d for d in docs if d["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = [a for a in config["applications"] if a["import_path"] == IMPORT_PATH]
    args = AppArgs.model_validate(app["args"])
    built = {d.name for d in serve_build(build_app(app["args"]), name=app["name"]).deployments}
    configured = [d["name"] for d in app["deployments"]]
    assert sorted(configured) == sorted(built)
    tiny = yaml.safe_load((REPO / "serving" / "tiny.yaml").read_text())["applications"][0]
    assert {d["name"] for d in tiny["deployments"]} == built
    limiter = next(d for d in app["deployments"] if d["name"] == "TenantLimiter")
    assert limiter["num_replicas"] == 1

    secret = "tenant-store" if name == "external-stores" else "demo-cxrfm-tenants"
    assert args.tenants == "/etc/cxrfm/secrets/tenants.yaml" and args.model_dir.startswith("/mnt/cxrfm/")
    for pod in _ray_pods(service):
        volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret)
        assert volume["secret"]["items"] == [{"key": "tenants.yaml", "path": "tenants.yaml"}]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
        assert f"{mount['mountPath']}/tenants.yaml" == args.tenants and mount["readOnly"] is True


def test_external_stores_render_no_internal_servers(chart):
    docs = render(chart, VALUE_SETS["external-stores"])
    names = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    assert not {"StatefulSet/demo-cxrfm-postgresql", "Deployment/demo-cxrfm-objectstore",
                "Secret/demo-cxrfm-postgresql", "Secret/demo-cxrfm-s3", "Secret/demo-cxrfm-tenants",
                "PersistentVolumeClaim/demo-cxrfm-shared"} & names
    mlflow = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    # The password reaches libpq through PGPASSWORD, never the command line.
    assert "--backend-store-uri=postgresql://pg.db.svc:5432/mlflow" in mlflow["command"]
    assert not any("PASSWORD" in arg or "$(" in arg for arg in mlflow["command"])
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://s3.example.org"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "password"}
    assert env["PGUSER"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "username"}


@pytest.mark.parametrize("values,where", [
    ({"training": {"workers": {"replicas": -1}}}, "/training/workers/replicas"),
    ({"serving": {"workers": {"minReplicas": -2}}}, "/serving/workers/minReplicas"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"image": {"tag": None}}, "missing property 'tag'"),
    ({"mlflow": {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": None}}}, "missing property 'limits'"),
    ({"training": {"spec": "../../etc/passwd"}}, "/training/spec"),
    ({"serving": {"apiKeys": {"acme": "a" * 32}}}, "additional properties 'apiKeys' not allowed"),  # no plaintext keys
    ({"serving": {"tenants": {"acme": {}}}}, "/serving/tenants"),
    ({"mlflow": {"backendStore": {"internal": False}}}, "/mlflow/backendStore"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
])
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name="demo", namespace="ml")
    assert where in str(err.value)


@pytest.mark.parametrize("values,message", [
    ({"serving": {"workers": {"minReplicas": 5, "maxReplicas": 4}}}, "must not exceed serving.workers.maxReplicas"),
    ({"serving": {"podDisruptionBudget": {"minAvailable": 2}}}, "or every node drain blocks"),
    ({"mlflow": {"artifactStore": {"internal": False}}}, "an external store needs accessKeyId"),
    ({"serving": {"tenants": TENANTS_YAML + f"# {TENANT_KEY}\n"}}, "holds a plaintext API key"),
    ({"serving": {"tenants": "acme: " + "a" * 32}}, "is not a tenants YAML"),
    ({"serving": {"tenants": "tenants: {acme: {}}\nkeys: [{key_id: abc, tenant: acme, key: secret}]"}},
     "keys[0] needs key_id, tenant, salt and hash"),
])
def test_template_guards(chart, values, message):
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render(values, name="demo", namespace="ml")
    assert message in str(err.value)


@pytest.mark.parametrize("path", sorted((REPO / "cluster").glob("raycluster-*.yaml")), ids=lambda p: p.name)
def test_cluster_specs_validate(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    clusters = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(clusters) == 1 and clusters[0]["spec"]["enableInTreeAutoscaling"] is True
    for obj in docs:
        if obj["kind"] == "RayCluster":
            assert validate_kuberay(obj, CRDS) == []
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    head = clusters[0]["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # a CPU head that runs no work
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    for group in clusters[0]["spec"]["workerGroupSpecs"]:
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/mnt/cxrfm" in mounts  # shared storage for shards and checkpoints
    if "h100" in path.name:
        gpu = [g for g in clusters[0]["spec"]["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu and gpu[0]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
