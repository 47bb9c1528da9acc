"""cluster/Dockerfile cannot be built on test machines (no container runtime), so it is parsed and held
to the files it has to agree with: pyproject.toml (every runtime dependency pinned, each pin inside the
requirement), the Ray version and image tag that the Helm chart, cluster/ specs, job specs and
`cxrfm jobs` use, and the chart's securityContext (the image's user; every place the image writes is
a volume under a read-only root filesystem)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from cxrfm.config import load_config
from cxrfm.jobs import manifests

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "cluster" / "Dockerfile"
CHART = REPO / "helm" / "cxrfm"
CLUSTER_SPECS = sorted((REPO / "cluster").glob("raycluster-*.yaml"))
JOB_SPECS = ["tiny.yaml", "pretrain-m4cxr.yaml", "finetune.yaml", "eval.yaml"]
WRITABLE_ENV = ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR")


class Dockerfile:
    """The instructions of a Dockerfile with ARG defaults substituted (`${X}` / `$X`)."""

    def __init__(self, text: str):
        lines, buf = [], ""
        for raw in text.splitlines():
            if raw.lstrip().startswith("#") and not buf:
                continue
            if raw.rstrip().endswith("\\"):
                buf += raw.rstrip()[:-1] + " "
                continue
            if raw.lstrip().startswith("#"):  # a comment inside a continued instruction
                continue
            buf += raw
            if buf.strip():
                lines.append(buf.strip())
            buf = ""
        self.args: dict[str, str] = {}
        self.instructions: list[tuple[str, str]] = []
        for line in lines:
            op, _, rest = line.partition(" ")
            op = op.upper()
            if op == "ARG":
                name, eq, default = rest.strip().partition("=")
                if eq:
                    self.args[name] = self.sub(default)
                continue
            self.instructions.append((op, rest.strip()))

    def sub(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m[1] or m[2], m[0]), text)

    def all(self, op: str) -> list[str]:
        return [self.sub(rest) for o, rest in self.instructions if o == op]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out[key] = value
        return out

    def pins(self) -> dict[str, tuple[str, str]]:
        """{canonical name: (version, the requirement as written)} for every `pkg==version` installed."""
        out: dict[str, tuple[str, str]] = {}
        for run in self.all("RUN"):
            if "pip install" not in run:
                continue
            for word in shlex.split(run):
                if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]*(\[[A-Za-z0-9,_\-]+\])?==[A-Za-z0-9.+_\-]+", word):
                    req = Requirement(word)
                    name = canonicalize_name(req.name)
                    assert name not in out, f"{req.name} is pinned twice in the Dockerfile"
                    (spec,) = req.specifier
                    out[name] = (spec.version, word)
        return out


@pytest.fixture(scope="module")
def docker() -> Dockerfile:
    return Dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_parser_reads_continuations_args_and_pins():
    d = Dockerfile('ARG A=1\nARG B=x${A}\nFROM img:${B} AS s\n# note\nRUN pip install \\\n  # c\n  "p[e]==${A}.0" \\\n'
                   '  q==2 && echo\nENV K=v \\\n    L="w z"\n')
    assert d.all("FROM") == ["img:x1 AS s"]
    assert d.pins() == {"p": ("1.0", "p[e]==1.0"), "q": ("2", "q==2")}
    assert d.env() == {"K": "v", "L": "w z"}


def test_base_images_are_pinned_and_torch_matches_the_cuda(docker):
    froms = [f.split()[0] for f in docker.all("FROM")]
    assert len(froms) == 2
    for image in froms:
        assert "$" not in image, f"unresolved ARG in FROM {image}"
        name, _, tag = image.rpartition(":") if "@sha256:" not in image else (image, "", "digest")
        assert name and tag and tag != "latest", f"FROM {image}: pin a tag or a digest"
    cuda = docker.args["CUDA_VERSION"]
    assert froms[1] == f"nvidia/cuda:{cuda}-cudnn-devel-ubuntu22.04"
    major, minor = cuda.split(".")[:2]
    assert docker.args["TORCH_CUDA"] == f"cu{major}{minor}", "the torch wheel index must match the base image's CUDA"
    torch_pin, written = docker.pins()["torch"]
    assert torch_pin == f"{docker.args['TORCH_VERSION']}+cu{major}{minor}"
    assert any(f"download.pytorch.org/whl/cu{major}{minor}" in r for r in docker.all("RUN") if written in r)


def test_every_runtime_dependency_is_pinned_within_pyproject(docker, pyproject):
    pins = docker.pins()
    project = pyproject["project"]
    linux = {"platform_system": "Linux", "sys_platform": "linux"}
    for dep in project["dependencies"]:
        req = Requirement(dep)
        if req.marker and not req.marker.evaluate(linux):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject: {dep!r}) is not pinned in cluster/Dockerfile"
        version = Version(pins[name][0])
        assert req.specifier.contains(version, prereleases=True), \
            f"cluster/Dockerfile pins {pins[name][1]}, outside pyproject's {dep!r}"
        assert req.extras <= Requirement(pins[name][1]).extras, f"{pins[name][1]} lacks the extras of {dep!r}"
    python = docker.args["PYTHON_VERSION"]
    assert SpecifierSet(project["requires-python"]).contains(python), f"Python {python} vs {project['requires-python']}"
    assert Version(python).release[:2] == (3, 11), "the image's Python is the one the project is tested with (3.11)"


def test_torch_pin_is_the_one_the_readme_installs(docker):
    readme = (REPO / "README.md").read_text()
    installs = set(re.findall(r"pip install torch==([0-9][0-9.]*[0-9])", readme))
    assert installs == {docker.args["TORCH_VERSION"]}, f"README installs torch {installs}"


def test_versions_agree_with_chart_cluster_specs_and_jobs(docker, pyproject, values):
    ray, version = docker.args["RAY_VERSION"], docker.args["CXRFM_VERSION"]
    assert docker.pins()["ray"] == (ray, f"ray[data,train,serve]=={ray}")
    # The Ray version KubeRay is told must be the Ray inside the image.
    assert manifests.RAY_VERSION == ray
    assert str(values["rayVersion"]) == ray
    for path in CLUSTER_SPECS:
        clusters = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "RayCluster"]
        assert clusters and all(str(c["spec"]["rayVersion"]) == ray for c in clusters), path.name
    # The image installs this package version, and is tagged with it everywhere it is named.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert pyproject["project"]["version"] == version == str(chart["appVersion"]) == str(values["image"]["tag"])
    image = f"{values['image']['repository']}:{version}"
    assert manifests.DEFAULT_IMAGE == image
    assert f"-t {image} ." in DOCKERFILE.read_text()
    for path in CLUSTER_SPECS:
        named = set(re.findall(r"image:\s*(\S*cxrfm/cxrfm\S*)", path.read_text()))
        assert named == {image}, path.name
    for spec in JOB_SPECS:
        assert load_config(REPO / "jobs" / spec).job.image == image, spec


def _uid(docker: Dockerfile) -> tuple[int, int]:
    (user,) = docker.all("USER")
    uid, _, gid = user.partition(":")
    return int(uid), int(gid)


def test_image_user_is_the_charts_non_root_user(docker, values):
    uid, gid = _uid(docker)
    assert uid != 0 and gid != 0
    useradd = next(r for r in docker.all("RUN") if "useradd" in r)
    assert f"--uid {uid}" in useradd and f"--gid {gid}" in useradd and f"groupadd --gid {gid}" in useradd
    ctx = values["podSecurityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (uid, gid, True)
    assert values["containerSecurityContext"]["readOnlyRootFilesystem"] is True


def _image_pods(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(pod spec, container) for every container running the cxrfm image, in any object."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                found.extend((node, c) for c in node["containers"] + node.get("initContainers", [])
                             if "cxrfm/cxrfm" in c.get("image", ""))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(objs)
    return found


def _check_pods(docker: Dockerfile, objs: list[dict], where: str) -> int:
    """Each container of the image runs as its user with a read-only root, and every path the image's ENV
    points at for writing lies on a writable volume; env it sets agrees with the image's."""
    uid, _ = _uid(docker)
    env = docker.env()
    writable = {env[k] for k in WRITABLE_ENV}
    assert all(p.startswith("/tmp") for p in writable), env
    pods = _image_pods(objs)
    for pod, c in pods:
        name = f"{where}: {c['name']}"
        ctx = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert ctx.get("runAsUser", uid) == uid and ctx.get("runAsNonRoot") is True, name
        assert ctx.get("readOnlyRootFilesystem") is True, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
        assert "emptyDir" in mounts.get("/tmp", {}), f"{name}: no emptyDir at /tmp for {sorted(writable)}"
        for e in c.get("env", []):
            if e["name"] in WRITABLE_ENV:
                assert e.get("value") == env[e["name"]], f"{name}: {e['name']}={e.get('value')} vs image {env[e['name']]}"
    return len(pods)


def test_kube_rayjob_and_cluster_specs_fit_the_image(docker):
    for spec in JOB_SPECS:
        path = REPO / "jobs" / spec
        objs = manifests.rayjob_manifests(load_config(path), path)
        assert _check_pods(docker, objs, spec) == 3  # head, worker and the submitter
    for path in CLUSTER_SPECS:
        objs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert _check_pods(docker, objs, path.name) >= 2


def test_chart_pods_fit_the_image(docker):
    import helm_python as helm  # the test extra: helm-python-sdk

    chart = helm.Chart.load(str(CHART))
    try:
        out = chart.render({}, name="demo", namespace="ml")
    finally:
        chart.close()
    objs = [d for path, text in sorted(out.items()) if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    # RayJob head, worker and submitter; RayService head and workers; the MLflow server.
    assert _check_pods(docker, objs, "chart") >= 5
