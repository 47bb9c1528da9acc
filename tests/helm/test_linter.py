"""A real Kubernetes security linter, Checkov (offline, its Kubernetes framework), over every manifest the
tests render: the chart with each value set, the cluster/ RayCluster specs and the RayJobs `cxrfm jobs`
makes for the job specs. KubeRay's pods are linted too: each pod template of a RayJob / RayService /
RayCluster is written out as the Pod the operator will create (Checkov does not know the CRDs).

Every finding must match tests/helm/linter_allowlist.yaml (one reason per entry), and every entry must
still match a finding. Checkov runs from its own virtual environment (tests/helm/linter-requirements.txt
says why), made on first use in the user cache, or the executable named by $CXRFM_CHECKOV."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

from cxrfm.config import load_config
from cxrfm.jobs import manifests as job_manifests
from tests.helm.render import REPO, VALUE_SETS, load_chart, pod_templates, render

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "linter-requirements.txt"
ALLOWLIST = HERE / "linter_allowlist.yaml"
NAMESPACE = "ml"  # helm install -n ml sets it on every object; Checkov flags objects without one


def _pinned_version() -> str:
    (line,) = [ln for ln in REQUIREMENTS.read_text().splitlines() if ln.startswith("checkov==")]
    return line.split("==")[1]


@pytest.fixture(scope="session")
def checkov() -> str:
    if os.environ.get("CXRFM_CHECKOV"):
        return os.environ["CXRFM_CHECKOV"]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxrfm-tools"
    env = cache / f"checkov-{_pinned_version()}"
    exe = env / "bin" / "checkov"
    if not exe.is_file():
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
        # The pinned Checkov from the package index, into its own environment (never the test venv).
        subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
                       check=True, stdout=sys.stderr)
    return str(exe)


def _with_namespace(obj: dict) -> dict:
    return {**obj, "metadata": {**obj["metadata"], "namespace": obj["metadata"].get("namespace", NAMESPACE)}}


def _kuberay_pods(obj: dict) -> list[dict]:
    """The Pods KubeRay makes from a RayJob / RayService / RayCluster, named <object>-<group>."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = ["head"] + [f"{g['groupName'].split('-')[0]}-workers" for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        groups.append("submitter")
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {**t.get("metadata", {}), "name": f"{obj['metadata']['name']}-{group}"},
             "spec": t["spec"]} for group, t in zip(groups, pod_templates(obj))]


def manifests() -> dict[str, list[dict]]:
    """{where it came from: objects}, everything the tests render."""
    out: dict[str, list[dict]] = {}
    chart = load_chart()
    try:
        for name, values in VALUE_SETS.items():
            # Each value set as its own release, so Checkov sees distinct resource names.
            out[f"chart-{name}"] = render(chart, values, name=name)
    finally:
        chart.close()
    for path in sorted((REPO / "cluster").glob("raycluster-*.yaml")):
        out[f"cluster-{path.stem}"] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for spec in ("tiny.yaml", "pretrain-m4cxr.yaml", "finetune.yaml", "eval.yaml"):
        path = REPO / "jobs" / spec
        out[f"jobs-{path.stem}"] = job_manifests.rayjob_manifests(load_config(path), path, namespace=NAMESPACE,
                                                          name=f"job-{path.stem}")
    return out


def run_checkov(exe: str, objects: dict[str, list[dict]], workdir: Path) -> list[dict]:
    for source, objs in objects.items():
        docs = []
        for obj in objs:
            docs.append(_with_namespace(obj))
            if obj["apiVersion"].startswith("ray.io/"):
                docs += [_with_namespace(p) for p in _kuberay_pods(obj)]
        (workdir / f"{source}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    proc = subprocess.run([exe, "--directory", str(workdir), "--framework", "kubernetes", "--output", "json",
                           "--quiet", "--compact", "--skip-download"], capture_output=True, text=True,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: findings, the test judges them
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    (report,) = [r for r in reports if r["check_type"] == "kubernetes"]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= sum(len(v) for v in objects.values())
    return report["results"]["failed_checks"]


def allowed_by(finding: dict, allowlist: list[dict]) -> dict | None:
    for entry in allowlist:
        if entry["check"] == finding["check_id"] and any(fnmatch.fnmatchcase(finding["resource"], g)
                                                         for g in entry["resources"]):
            return entry
    return None


def test_allowlist_is_short_and_justified():
    allowlist = yaml.safe_load(ALLOWLIST.read_text())
    assert len(allowlist) <= 12
    for entry in allowlist:
        assert set(entry) == {"check", "resources", "reason"} and len(entry["reason"]) > 40, entry


def test_checkov_passes_every_rendered_manifest_with_the_allowlist(checkov, tmp_path):
    allowlist = yaml.safe_load(ALLOWLIST.read_text())
    findings = run_checkov(checkov, manifests(), tmp_path)
    unexplained = sorted({f"{f['check_id']} {f['resource']}: {f['check_name']}" for f in findings
                          if not allowed_by(f, allowlist)})
    assert unexplained == [], "\n".join(unexplained)
    used = {id(allowed_by(f, allowlist)) for f in findings}
    stale = [e["check"] for e in allowlist if id(e) not in used]
    assert stale == [], f"allow-list entries that match no finding any more: {stale}"


def test_checkov_catches_what_the_allowlist_does_not_cover(checkov, tmp_path):
    """The linter really runs on these files: a privileged container with SYS_ADMIN and a hostPath is
    reported, and nothing in the allow-list excuses it."""
    objs = render_default()
    deployment = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-mlflow"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {**container["securityContext"], "privileged": True,
                                    "capabilities": {"add": ["SYS_ADMIN"]}}
    deployment["spec"]["template"]["spec"]["hostNetwork"] = True
    findings = run_checkov(checkov, {"bad": [deployment]}, tmp_path)
    allowlist = yaml.safe_load(ALLOWLIST.read_text())
    unexplained = {f["check_id"] for f in findings if not allowed_by(f, allowlist)}
    assert {"CKV_K8S_16", "CKV_K8S_39", "CKV_K8S_19"} <= unexplained  # privileged, SYS_ADMIN, hostNetwork


def render_default() -> list[dict]:
    chart = load_chart()
    try:
        return render(chart, {})
    finally:
        chart.close()
