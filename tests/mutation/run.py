"""Apply each mutation of mutations.py in a scratch copy of the repository and run the tests that must
catch it (see tests/mutation/__init__.py). Exit status 0 when every mutation is caught, 1 otherwise."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python tests/mutation/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.mutation.mutations import MUTATIONS, Mutation  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IGNORED = (".git", ".venv", "runs", "mlruns", "__pycache__", "*.egg-info", ".pytest_cache")
# pyproject maps these packages to top-level folders; the editable install's import hook points at the
# original checkout, so the copy gets links under cxrfm/ that the ordinary path search finds first.
MAPPED = {"cxrfm/kernels": "kernels", "cxrfm/serving": "serving"}


def make_copy(dest: Path) -> Path:
    copy = dest / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    for link, target in MAPPED.items():
        (copy / link).symlink_to(Path("..") / target, target_is_directory=True)
    return copy


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("RAY_ADDRESS", None)  # tests that start Ray start their own
    return env


def check_imports(copy: Path) -> None:
    """The copy's modules must be the ones imported, or every mutation would survive for nothing."""
    code = "import cxrfm, cxrfm.kernels, cxrfm.serving, tests; print(cxrfm.__file__, cxrfm.kernels.__file__, " \
           "cxrfm.serving.__file__, tests.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True)
    files = out.stdout.split()
    if out.returncode or len(files) != 4 or not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in files):
        raise SystemExit(f"the scratch copy's code is not what Python imports there: {out.stdout or out.stderr}")


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        out = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return out.returncode, (out.stdout + out.stderr)[-3000:]


def baseline(copy: Path, mutations: list[Mutation], timeout: float) -> set[str]:
    """Run every named test once, unmutated, in one pytest process; returns the node ids that fail.

    Without this a test broken for another reason (or a half-finished change elsewhere in the tree) would
    count as catching every mutation it is named for."""
    tests = sorted({t for m in mutations for t in m.tests})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", "-rfE", *tests]
    try:
        out = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout * 3)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"the unmutated tests did not finish within {timeout * 3:.0f} s") from None
    if out.returncode not in (0, 1):
        raise SystemExit(f"the unmutated tests could not run (pytest exit {out.returncode}):\n"
                         f"{(out.stdout + out.stderr)[-3000:]}")
    failed = {line.split()[1] for line in out.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))}
    if failed:
        print("these tests fail without any mutation:\n  " + "\n  ".join(sorted(failed)), file=sys.stderr)
    return failed


def apply(copy: Path, m: Mutation) -> str | None:
    """Mutate the file in the copy; returns its original text, or None when the snippet is stale."""
    path = copy / m.path
    text = path.read_text() if path.is_file() else ""
    if text.count(m.old) != 1:
        return None
    path.write_text(text.replace(m.old, m.new))
    return text


def verdict(rc: int) -> str:
    # pytest: 0 all passed, 1 some failed, 2 interrupted (e.g. an import error the mutation caused);
    # 4 usage error / node id not found, 5 nothing collected: the entry is wrong, not the code.
    return {0: "survived", 1: "caught", 2: "caught"}.get(rc, "error")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutation.run", description=__doc__)
    ap.add_argument("--only", help="run the mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the first run of all named tests unmutated (their failures would count as caught)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy and print where it is")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output for every mutation")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:<58} {m.path}")
        return 0
    canary = MUTATIONS[0]
    if canary not in chosen:
        chosen.insert(0, canary)
    scratch = Path(tempfile.mkdtemp(prefix="cxrfm-mutation-"))
    started = time.monotonic()
    rows: list[tuple[str, str, str, float]] = []
    try:
        copy = make_copy(scratch)
        check_imports(copy)
        t0 = time.monotonic()
        broken = set() if args.no_baseline else baseline(copy, chosen, args.timeout)
        if not args.no_baseline:
            print(f"baseline  {time.monotonic() - t0:6.1f} s  every named test unmutated", file=sys.stderr, flush=True)
        for m in chosen:
            t0 = time.monotonic()
            original = apply(copy, m)
            unsure = sorted(f for f in broken if any(f == t or f.startswith(t + "::") or f.startswith(t + "[")
                                                     for t in m.tests))
            if unsure:
                result, out = "error", "its tests fail without the mutation: " + ", ".join(unsure)
                if original is not None:
                    (copy / m.path).write_text(original)
            elif original is None:
                result, out = "stale", f"{m.path}: the snippet does not occur exactly once:\n{m.old}"
            else:
                try:
                    rc, out = run_tests(copy, m.tests, args.timeout)
                finally:
                    (copy / m.path).write_text(original)
                result = verdict(rc)
            seconds = time.monotonic() - t0
            rows.append((m.name, ", ".join(t.split("::")[-1] if "::" in t else t for t in m.tests), result, seconds))
            print(f"{result:<9} {seconds:6.1f} s  {m.name}", file=sys.stderr, flush=True)
            if args.verbose or result in ("survived", "error", "stale"):
                print(out, file=sys.stderr)
            if m is canary and result != "caught":
                raise SystemExit("the canary mutation was not caught: the tests are not running the copy's code")
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':<{width}}  {'result':<9} {'seconds':>7}  tests")
    for name, tests, result, seconds in rows:
        print(f"{name:<{width}}  {result:<9} {seconds:7.1f}  {tests}")
    caught = sum(r[2] == "caught" for r in rows)
    print(f"\n{caught}/{len(rows)} caught in {time.monotonic() - started:.0f} s")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
