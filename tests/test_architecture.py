"""The import rules of docs/architecture.md, checked on every module's imports: at the top and inside
functions, parsed with ast (nothing is imported to find them)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as (pyproject.toml package-dir).
ROOTS = {"cxrfm": "cxrfm", "kernels": "cxrfm.kernels", "serving": "cxrfm.serving"}

# Unit -> what it may import of cxrfm besides itself (a name allows that module and everything under it).
# The table "Packages and what each may import" of docs/architecture.md, row by row.
BASE = ("cxrfm.config", "cxrfm.data", "cxrfm.text", "cxrfm.model", "cxrfm.attention")
ALLOWED = {
    "cxrfm": (),  # cxrfm/__init__.py
    "cxrfm.cli": ("cxrfm",),
    "cxrfm.bench": BASE + ("cxrfm.kernels", "cxrfm.train", "cxrfm.eval", "cxrfm.serving", "cxrfm.plan",
                           "cxrfm.jobs", "cxrfm.registry"),
    "cxrfm.train": BASE + ("cxrfm.registry",),
    "cxrfm.eval": BASE + ("cxrfm.registry",),
    "cxrfm.serving": BASE,
    "cxrfm.plan": BASE,
    "cxrfm.jobs": ("cxrfm.config",),
    "cxrfm.registry": ("cxrfm.config",),
    "cxrfm.model": ("cxrfm.config", "cxrfm.data", "cxrfm.text", "cxrfm.attention", "cxrfm.kernels"),
    "cxrfm.data": ("cxrfm.config", "cxrfm.text"),
    "cxrfm.text": ("cxrfm.data.store",),
    "cxrfm.config": ("cxrfm.data.schema", "cxrfm.data.sources", "cxrfm.attention"),
    "cxrfm.attention": ("cxrfm.kernels",),
    "cxrfm.kernels": ("cxrfm.attention",),
}
# Import cycles the document names; the first module imports the second only inside functions.
CYCLES = {("cxrfm.attention", "cxrfm.kernels"), ("cxrfm.model.multitask", "cxrfm.model.build")}
# What building the `cxrfm` parser must not load (each command imports its engine when it runs).
HEAVY = ("ray", "deepspeed", "mlflow", "transformers", "diffusers", "triton", "kubernetes", "scipy", "webdataset")


@cache
def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the installed packages."""
    out = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def _canonical(name: str) -> str:
    # `serving.x` and `kernels.x` are the same modules as cxrfm.serving.x and cxrfm.kernels.x
    for folder, package in ROOTS.items():
        if name == folder or name.startswith(folder + "."):
            return package + name[len(folder):]
    return name


@cache
def imports(name: str) -> tuple[tuple[str, int, bool], ...]:
    """(imported cxrfm module, line, inside a function) for every import statement of module `name`."""
    path = modules()[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((_canonical(a.name), child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = _canonical(child.module)
                for a in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{module}.{a.name}"
                    found.append((sub if sub in modules() else module, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return tuple((m, line, f) for m, line, f in found if m == "cxrfm" or m.startswith("cxrfm."))


def _unit(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2])


def _within(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


def test_every_module_imports_only_what_its_package_may():
    problems = []
    for name, path in sorted(modules().items()):
        unit = _unit(name)
        assert unit in ALLOWED, f"{path.relative_to(REPO)}: package {unit} has no row in docs/architecture.md"
        for target, line, _ in imports(name):
            if _unit(target) != unit and not _within(target, ALLOWED[unit]):
                problems.append(f"{path.relative_to(REPO)}:{line} imports {target}; {unit} may import only "
                                f"{', '.join(ALLOWED[unit])}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles_but_the_documented_ones():
    graph = {name: {t for t, _, _ in imports(name) if t in modules() and t != name} for name in modules()}
    cycles = []
    for start in sorted(graph):  # a path back to `start` through at least one other module
        seen, stack = set(), [(start, (start,))]
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start and len(trail) > 1:
                    cycles.append(trail)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + (nxt,)))
    documented = {m for pair in CYCLES for m in pair}
    undocumented = [c for c in cycles if not set(c) <= documented | {"cxrfm.kernels._autotune",
                                                                      "cxrfm.kernels.flash_attention",
                                                                      "cxrfm.kernels.cross_entropy",
                                                                      "cxrfm.kernels.rmsnorm",
                                                                      "cxrfm.kernels._flash_attention_bwd"}]
    assert not undocumented, "import cycles:\n" + "\n".join(" -> ".join(c + (c[0],)) for c in undocumented)
    for lazy, other in CYCLES:  # the way back is taken only inside functions, so importing either one works
        edges = [(line, f) for t, line, f in imports(lazy) if _within(t, (other,))]
        assert edges and all(f for _, f in edges), f"{lazy} must import {other} only inside functions: {edges}"


def test_building_the_cli_parser_loads_no_heavy_dependency():
    code = ("import sys, cxrfm.cli; cxrfm.cli.build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`cxrfm --help` loads {out.stdout.strip()}; import it inside the command"


def test_pyproject_lists_every_package():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert set(setuptools["packages"]) == packages, (
        f"pyproject.toml [tool.setuptools] packages: missing {sorted(packages - set(setuptools['packages']))}, "
        f"not a package {sorted(set(setuptools['packages']) - packages)}")
    assert setuptools["package-dir"] == {package: folder for folder, package in ROOTS.items()}
