"""Chart values a security review checks: what the schema and the template guards refuse, and what each
platform value (Kueue, priorities, pod extension points, RDMA/NCCL, GCS fault tolerance, TLS, body size,
Ray token auth, serving GPUs, generated secrets) puts into the rendered objects."""

from __future__ import annotations

import pytest
import yaml

from tests.helm.render import H100_WORKERS, TENANTS_YAML, VALUE_SETS, by_name, helm, load_chart, pod_templates, render
from tests.test_jobs import QUOTING_CASES, shell_words


@pytest.fixture(scope="module")
def chart():
    c = load_chart()
    yield c
    c.close()


@pytest.mark.parametrize("values,where", [
    ({"containerSecurityContext": {"privileged": True}}, "/containerSecurityContext/privileged"),
    ({"containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}},
     "/containerSecurityContext/capabilities/add"),
    ({"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}}, "/containerSecurityContext/capabilities/drop"),
    ({"containerSecurityContext": {"runAsUser": 0}}, "/containerSecurityContext/runAsUser"),
    ({"podSecurityContext": {"hostNetwork": True}}, "additional properties 'hostNetwork' not allowed"),
    ({"training": {"workers": {"resources": {"requests": {"cpu": -4, "memory": "1Gi"},
                                             "limits": {"cpu": 4, "memory": "1Gi"}}}}}, "/training/workers/resources/requests/cpu"),
    ({"serving": {"head": {"resources": {"requests": {"cpu": "-1", "memory": "1Gi"},
                                         "limits": {"cpu": "1", "memory": "1Gi"}}}}}, "/serving/head/resources/requests/cpu"),
    ({"image": {"tag": "latest"}}, "/image/tag"),
    ({"mlflow": {"backendStore": {"image": {"repository": "postgres", "tag": "latest"}}}}, "/mlflow/backendStore/image/tag"),
    ({"training": {"workers": {"gpuProduct": "NVIDIA H100 80GB"}}}, "/training/workers/gpuProduct"),
    ({"serving": {"workers": {"gpuProduct": "-NVIDIA-L4"}}}, "/serving/workers/gpuProduct"),
    ({"training": {"workers": {"gpuProduct": "N" * 64}}}, "/training/workers/gpuProduct"),
    ({"serving": {"serveConfig": {"applications": [{"name": "a", "import_path": "m:f", "deployments": [
        {"name": "TextGenerator", "autoscaling_config": {"min_replicas": -1, "max_replicas": 2}}]}]}}},
     "/serving/serveConfig/applications/0/deployments/0/autoscaling_config/min_replicas"),
    ({"serving": {"workers": {"gpusPerReplica": 0}}}, "/serving/workers/gpusPerReplica"),
    ({"training": {"workers": {"ncclEnv": {"LD_PRELOAD": "/tmp/x.so"}}}}, "/training/workers/ncclEnv"),
    ({"training": {"workers": {"pod": {"extraVolumes": [{"name": "host", "hostPath": {"path": "/"}}]}}}},
     "/training/workers/pod/extraVolumes/0"),
    ({"training": {"workers": {"pod": {"hostPID": True}}}}, "additional properties 'hostPID' not allowed"),
    ({"rayAuth": {"mode": "none"}}, "/rayAuth/mode"),
    ({"serving": {"gcsFaultTolerance": {"enabled": True, "redisAddress": "redis://x"}}}, "/serving/gcsFaultTolerance/redisAddress"),
    ({"training": {"kueueQueueName": "a queue"}}, "/training/kueueQueueName"),
    ({"training": {"preRunningDeadlineSeconds": -1}}, "/training/preRunningDeadlineSeconds"),
])
def test_schema_refuses(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(values, name="demo", namespace="ml")
    assert where in str(err.value)


@pytest.mark.parametrize("values,message", [
    ({"training": {"workers": {"resources": {"requests": {"cpu": "4", "memory": "8Gi"},
                                             "limits": {"cpu": "3500m", "memory": "8Gi"}}}}},
     "training.workers.resources: requests.cpu (4) is above limits.cpu (3500m)"),
    ({"mlflow": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2000Mi"}}}},
     "mlflow.resources: requests.memory (2Gi) is above limits.memory (2000Mi)"),
    ({"serving": {"serveConfig": {"applications": [{"name": "a", "import_path": "m:f", "deployments": [
        {"name": "TextGenerator", "autoscaling_config": {"min_replicas": 5, "max_replicas": 2}}]}]}}},
     "deployment TextGenerator has autoscaling_config.min_replicas (5) above max_replicas (2)"),
    ({"serving": {"workers": {"gpusPerWorker": 1, "gpusPerReplica": 2}}}, "gpusPerReplica (2) is more than a worker has"),
    ({"serving": {"gcsFaultTolerance": {"enabled": True}}}, "needs serving.gcsFaultTolerance.redisAddress"),
])
def test_guards_refuse(chart, values, message):
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render(values, name="demo", namespace="ml")
    assert message in str(err.value)


def test_requests_equal_to_limits_in_other_units_pass(chart):
    """The guard compares quantities, not strings: 1024Mi is 1Gi, 0.5 is 500m."""
    same = {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"cpu": "500m", "memory": "1Gi"}}
    assert render(chart, {"mlflow": {"resources": same}})


@pytest.mark.parametrize("override", QUOTING_CASES)
def test_rayjob_entrypoint_quotes_overrides(chart, override):
    """An override with `#`, `: `, `'`, `$` or `;` reaches the job as one word: the YAML keeps it whole and
    bash (KubeRay's submitter runs the entrypoint through it) splits it back exactly."""
    job = by_name(render(chart, {"training": {"overrides": ["train.max_steps=3", override]}}))[("RayJob", "demo-cxrfm-train")]
    assert shell_words(job["spec"]["entrypoint"]) == [
        "cxrfm", "train", "/app/jobs/tiny.yaml", "--set", "tracking.mlflow_uri=http://demo-cxrfm-mlflow.ml.svc:5000",
        "--set", "train.max_steps=3", "--set", override]


@pytest.mark.parametrize("gpus", [0, 4])
def test_gpu_workers_request_and_limit_gpus(chart, gpus):
    """Checked on the rendered objects alone (no schema file): GPU workers ask for the same nvidia.com/gpu
    count in requests and limits, and tolerate the GPU taint; CPU workers ask for none."""
    docs = by_name(render(chart, {"training": {"workers": {"gpusPerWorker": gpus}},
                                  "serving": {"workers": {"gpusPerWorker": gpus}}}))
    clusters = [docs[("RayJob", "demo-cxrfm-train")]["spec"]["rayClusterSpec"],
                docs[("RayService", "demo-cxrfm")]["spec"]["rayClusterConfig"]]
    for cluster in clusters:
        (group,) = cluster["workerGroupSpecs"]
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        if gpus:
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(gpus)
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert group["groupName"] == "gpu-workers"
        else:
            assert "nvidia.com/gpu" not in res["requests"] and "nvidia.com/gpu" not in res["limits"]
            assert "tolerations" not in pod
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head["limits"]


@pytest.mark.parametrize("gpus,per_replica", [(0, 1), (1, 1), (2, 0.5)])
def test_serving_gpus_reach_the_serve_config(chart, gpus, per_replica):
    """With GPU workers the model deployments ask Ray for GPUs and run on cuda in bfloat16; without, they
    run on the CPU and ask for none. The ingress and the limiter never take a GPU."""
    from ray.serve.schema import ServeDeploySchema

    from cxrfm.serving.app import AppArgs

    service = by_name(render(chart, {"serving": {"workers": {"gpusPerWorker": gpus, "gpusPerReplica": per_replica}}}))[
        ("RayService", "demo-cxrfm")]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Ingress", "TenantLimiter", "TextGenerator", "ImageGenerator"}
    for name in ("TextGenerator", "ImageGenerator"):
        options = deployments[name].get("ray_actor_options", {})
        assert options.get("num_gpus") == (per_replica if gpus else None), name
    assert "num_gpus" not in deployments["Ingress"].get("ray_actor_options", {})
    assert deployments["TenantLimiter"]["ray_actor_options"] == {"num_cpus": 0}
    args = AppArgs.model_validate(app["args"])  # the application accepts what the chart gives it
    if gpus:
        assert args.device == "cuda" and args.dtype == "bfloat16"
    else:
        assert app["args"]["device"] == "cpu" and "dtype" not in app["args"]


def test_platform_values_reach_the_pods(chart):
    docs = by_name(render(chart, VALUE_SETS["platform"]))
    job = docs[("RayJob", "demo-cxrfm-train")]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    head, (workers,) = cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"]
    pod, spec = workers["template"], workers["template"]["spec"]
    assert head["spec"]["priorityClassName"] == "training-head" and spec["priorityClassName"] == "training"
    assert job["spec"]["submitterPodTemplate"]["spec"]["priorityClassName"] == "training"
    assert pod["metadata"]["labels"]["team"] == "radiology"
    assert pod["metadata"]["annotations"] == {"example.org/cost": "gpu"}
    assert spec["nodeSelector"] == {"pool": "h100", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "dedicated", "value": "ml", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["runtimeClassName"] == "nvidia" and spec["affinity"]["nodeAffinity"]
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets"}} in spec["volumes"]
    worker = spec["containers"][0]
    assert {"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True} in worker["volumeMounts"]
    # RDMA: the device is requested and limited, IPC_LOCK (only) is added, NCCL sees its environment.
    assert worker["resources"]["limits"]["rdma/rdma_shared_device_a"] == "1"
    assert worker["resources"]["requests"]["rdma/rdma_shared_device_a"] == "1"
    assert worker["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_IB_GID_INDEX"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "add" not in head["spec"]["containers"][0]["securityContext"]["capabilities"]  # IPC_LOCK: RDMA workers only

    service = docs[("RayService", "demo-cxrfm")]["spec"]
    assert service["excludeHeadPodFromServeSvc"] is True
    config = service["rayClusterConfig"]
    assert config["authOptions"] == {"mode": "token"}
    assert config["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.ha.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}}
    assert config["headGroupSpec"]["template"]["spec"]["priorityClassName"] == "serving"
    assert config["headGroupSpec"]["template"]["metadata"]["annotations"] == {"example.org/owner": "ml"}

    ingress = docs[("Ingress", "demo-cxrfm")]
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["tls"] == [{"hosts": ["cxrfm.example.com"], "secretName": "demo-cxrfm-tls"}]


def test_defaults_free_gpus_and_stop_stuck_gangs(chart):
    """A finished job's cluster goes within a minute, a run ends within a day unless raised, a gang that
    cannot start within 20 minutes gives its GPUs back, and the submitter pod is PSA "restricted"."""
    docs = by_name(render(chart, {}))
    spec = docs[("RayJob", "demo-cxrfm-train")]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 60
    assert spec["activeDeadlineSeconds"] == 86400 and spec["preRunningDeadlineSeconds"] == 1200
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["securityContext"]["runAsNonRoot"] is True
    assert submitter["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "command" not in submitter["containers"][0]  # KubeRay fills in `ray job submit ... -- <entrypoint>`
    ingress = docs[("Ingress", "demo-cxrfm")]
    assert ingress["spec"]["tls"][0]["secretName"] == "demo-cxrfm-tls"  # TLS on by default


def _tenant_store(limit_mib: int) -> str:
    store = yaml.safe_load(TENANTS_YAML)
    for tenant in store["tenants"].values():
        tenant["max_upload_bytes"] = limit_mib * 2**20
    return yaml.safe_dump(store)


@pytest.mark.parametrize("values,body", [
    ({}, 20 * 2**20),  # no tenants yet: the default upload limit
    ({"serving": {"tenants": _tenant_store(50)}}, 50 * 2**20),
])
def test_ingress_body_size_follows_the_tenants_upload_limit(chart, values, body):
    """nginx must pass what the API accepts: the upload limit in base64 (4/3) plus 64 KiB of fields, the
    same cap serving/app.py puts on the body, so nginx never answers 413 first."""
    ingress = by_name(render(chart, values))[("Ingress", "demo-cxrfm")]
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("k")
    api_cap = int(body * 4 / 3) + 65536
    assert api_cap <= int(size[:-1]) * 1024 < api_cap + 2048
    explicit = by_name(render(chart, VALUE_SETS["external-stores"]))[("Ingress", "demo-cxrfm")]
    assert explicit["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "64m"


def _secret_values(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}


def test_generated_secrets_and_how_to_keep_them_stable(chart):
    """Offline rendering (helm template, GitOps) has no cluster to look the live Secret up in, so a
    generated password changes on every render: that is why existingSecret (or a given password) is the
    stable choice, and why the generated Secrets are kept on uninstall. With existingSecret the chart
    renders no Secret and every reference names the one you manage, identically on every render."""
    first, second = _secret_values(render(chart, {})), _secret_values(render(chart, {}))
    assert first["demo-cxrfm-postgresql"]["password"] != second["demo-cxrfm-postgresql"]["password"]
    kept = {"mlflow": {"backendStore": {"existingSecret": "mlflow-db"}, "artifactStore": {"existingSecret": "mlflow-s3"}}}
    a, b = render(chart, kept), render(chart, kept)
    assert a == b
    assert not {"demo-cxrfm-postgresql", "demo-cxrfm-s3"} & set(_secret_values(a))
    refs = {(ref["name"], ref["key"]) for d in a for t in pod_templates(d) for c in t["spec"].get("initContainers", []) +
            t["spec"]["containers"] for e in c.get("env", []) if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}
    assert {("mlflow-db", "username"), ("mlflow-db", "password"), ("mlflow-s3", "AWS_ACCESS_KEY_ID"),
            ("mlflow-s3", "AWS_SECRET_ACCESS_KEY")} <= refs
    given = {"mlflow": {"backendStore": {"password": "s3cret-from-vault"}}}
    assert _secret_values(render(chart, given))["demo-cxrfm-postgresql"] == \
        _secret_values(render(chart, given))["demo-cxrfm-postgresql"] == {"username": "mlflow", "password": "s3cret-from-vault"}
    generated = [d for d in render(chart, {}) if d["kind"] == "Secret" and d["metadata"]["name"] != "demo-cxrfm-tenants"]
    assert generated and all(d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for d in generated)


def test_secret_reuse_reads_the_live_secret():
    """The reuse path itself: `cxrfm.secretValue` looks the Secret up and decodes the stored key, checked on
    the template source since offline rendering cannot fake a cluster (helm lookup returns nothing)."""
    from tests.helm.render import CHART

    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    body = helpers[helpers.index('define "cxrfm.secretValue"'):]
    body = body[:body.index("{{- end -}}\n\n")]
    assert 'lookup "v1" "Secret" .ctx.Release.Namespace .secret' in body
    assert "index $live.data .key | b64dec" in body
    assert body.index("$live") < body.index(".value") < body.index("randAlphaNum")  # live first, then given, then new


def test_worker_extension_points_do_not_drop_gpu_scheduling(chart):
    """A user nodeSelector / toleration adds to the GPU ones, never replaces them."""
    workers = {**H100_WORKERS, "pod": {"nodeSelector": {"pool": "a"}, "tolerations": [{"key": "x", "operator": "Exists"}]}}
    job = by_name(render(chart, {"training": {"workers": workers}}))[("RayJob", "demo-cxrfm-train")]
    spec = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert spec["nodeSelector"] == {"pool": "a", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [t["key"] for t in spec["tolerations"]] == ["nvidia.com/gpu", "x"]
