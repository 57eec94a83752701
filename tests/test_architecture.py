"""The package's shape, checked from its source (docs/DESIGN.md, "Layout"): no import cycle, no private name taken
across modules, and data flowing one way (text -> statistics -> factors -> checkpoint -> engines -> reports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "a3_serve"

#: what each layer may import from the package (besides itself and the shared plumbing below)
SHARED = {"a3_serve.errors", "a3_serve.runtime", "a3_serve.progress", "a3_serve.folders", "a3_serve.provenance"}
ALLOWED = {
    "a3_serve.solvers": {"a3_serve.errors"},
    "a3_serve.modeling": set(),  # copied into every checkpoint: torch and transformers only
    "a3_serve.calibration": {"a3_serve.solvers"} | SHARED,
    # the export reads the quantization size rules (pure functions of config.json) to choose legal sizes
    "a3_serve.export": {"a3_serve.solvers", "a3_serve.calibration", "a3_serve.modeling", "a3_serve.eval",
                        "a3_serve.quantize.rules", "a3_serve.quantize.schemes"} | SHARED,
    "a3_serve.eval": {"a3_serve.calibration", "a3_serve.modeling"} | SHARED,
    "a3_serve.vllm_plugin": {"a3_serve.modeling"} | SHARED,
    "a3_serve.quantize": {"a3_serve.calibration", "a3_serve.modeling"} | SHARED,
    "a3_serve.bench": {"a3_serve.eval", "a3_serve.calibration", "a3_serve.modeling", "a3_serve.vllm_plugin"} | SHARED,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import statement, at any depth, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            out.append((node.lineno, mod, [a.name for a in node.names]))
    return out


def _sources(*folders: Path) -> list[Path]:
    return sorted(p for f in folders for p in f.rglob("*.py"))


MODULES = {_module_name(p): p for p in _sources(PACKAGE)}


def _resolve(mod: str, names: list[str]) -> list[str]:
    """The package modules an import statement loads (``from pkg import module`` names the submodule)."""
    hits = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
    return hits or ([mod] if mod in MODULES else [])


def test_no_private_names_across_modules():
    bad = []
    for path in _sources(PACKAGE, ROOT / "tests", ROOT / "benchmarks", ROOT / "scripts"):
        here = _module_name(path) if PACKAGE in path.parents else None
        for line, mod, names in _imports(path):
            if not mod.startswith("a3_serve") or mod == here:
                continue
            bad += [f"{path.relative_to(ROOT)}:{line}: from {mod} import {n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: sorted({t for _, mod, names in _imports(p) if mod.startswith("a3_serve")
                        for t in _resolve(mod, names)} - {m})
             for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    # a package's __init__ importing its own submodules is not a cycle of behaviour
    cycles = [c for c in cycles if not all(x == c.split(" -> ")[0] or x.startswith(c.split(" -> ")[0] + ".")
                                           for x in c.split(" -> "))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_data_flows_one_way(layer):
    allowed = ALLOWED[layer] | {layer}
    bad = []
    for mod_name, path in MODULES.items():
        if mod_name != layer and not mod_name.startswith(layer + "."):
            continue
        for line, mod, names in _imports(path):
            if mod == "a3_serve" and names:  # `import a3_serve` for the version / registration
                continue
            if mod.startswith("a3_serve.") and not any(mod == a or mod.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mod}")
    assert not bad, f"{layer} imports what it must not:\n" + "\n".join(bad)
