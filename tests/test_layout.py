"""The package's layering, read from its imports: every import runs downwards, none is circular or private."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "krrst"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS = {
    "infra": "krrst.infra.*",
    "losses": "krrst.losses",
    "ground": "augment models data distilled formats features results parameterize",
    "stages": "teacher baselines evaluate distill mkdt",
    "top": "pipeline report cli krrst",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS.values()):
        for member in members.split():
            name = member if member.startswith("krrst") else f"krrst.{member}"
            if module == name or (name.endswith(".*") and (module + ".").startswith(name[:-1])):
                return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def imports() -> dict[str, list[tuple[str, str]]]:
    """Each module's krrst imports as (module imported, name imported), at any depth of its code."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, str]]] = {}
    for module, path in modules.items():
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "krrst":
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    edges.append((target, "") if target in modules else (node.module, alias.name))
            elif isinstance(node, ast.Import):
                edges += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "krrst"]
        found[module] = [(target, name) for target, name in edges if target != module]
    return found


def upward(edges: dict[str, list[tuple[str, str]]]) -> list[str]:
    return [f"{module} ({list(LAYERS)[layer_of(module)]}) imports {target} ({list(LAYERS)[layer_of(target)]})"
            for module, targets in edges.items() for target, _ in targets
            if target != "krrst" and layer_of(target) > layer_of(module)]


def cycles(edges: dict[str, list[tuple[str, str]]]) -> list[str]:
    graph = {module: {target for target, _ in targets if target != "krrst"} for module, targets in edges.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    return sorted(module for module in graph if reaches(module, module, set()))


def test_every_module_has_a_layer_and_imports_run_downwards():
    assert not upward(imports()), upward(imports())


def test_the_top_layer_runs_cli_over_pipeline_over_report():
    edges = {module: {target for target, _ in targets} for module, targets in imports().items()}
    assert "krrst.cli" not in edges["krrst.pipeline"] | edges["krrst.report"]
    assert "krrst.pipeline" not in edges["krrst.report"], "the report takes the preset's config from its caller"


def test_no_import_cycle():
    assert not cycles(imports()), cycles(imports())


def test_no_module_imports_another_modules_private_names():
    private = [f"{module} imports {target}.{name}" for module, edges in imports().items()
               for target, name in edges if name.startswith("_") and name != "__version__"]
    assert not private, private


def test_the_checks_see_a_violation():
    """Added to the real imports, an upward edge and a cycle are caught (so the passing checks mean something)."""
    edges = imports()
    edges["krrst.infra.io"] = [*edges["krrst.infra.io"], ("krrst.distill", "")]  # the plumbing knowing a stage
    assert upward(edges) == ["krrst.infra.io (infra) imports krrst.distill (stages)"]
    assert {"krrst.infra.io", "krrst.distill"} <= set(cycles(edges))  # distill imports io: now a cycle
    assert layer_of("krrst.infra.run_state") == layer_of("krrst.infra") < layer_of("krrst.losses")
