"""The package layout: imports run one way only, data <- pretrain (the shared core and the objectives) <- finetune,
with no cycles between modules, counting the imports inside functions too (a lazy import hides a cycle, it does
not remove it)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "pretrain", "finetune")
# what each package may import from the others
ALLOWED = {"data": set(), "pretrain": {"data"}, "finetune": {"data", "pretrain"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (module level or inside functions)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "pretrain.models.clip.load_clip" -> "pretrain.models.clip"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def test_imports_run_one_way_data_then_pretrain_then_finetune():
    graph = import_graph()
    assert "pretrain.engine" in graph and "finetune.classify" in graph  # the scan sees the project
    wrong = []
    for module, imports in graph.items():
        package = module.split(".")[0]
        for target in imports:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the direction data <- pretrain <- finetune:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_itself_back():
    edges = import_graph()
    cycles = []

    def visit(module: str, path: list[str], done: set[str]) -> None:
        for target in sorted(edges.get(module, ())):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target], done)
        done.add(module)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module], done)
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


@pytest.mark.parametrize("source, expected", [
    ("from finetune.classify import evaluate", {"finetune.classify"}),
    ("def f():\n    from finetune import linear_probe", {"finetune", "finetune.linear_probe"}),
    ("import finetune.detection as detection", {"finetune.detection"}),
])
def test_the_scan_sees_module_level_lazy_and_aliased_imports(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = set(project_modules())
    assert imported_modules("pretrain.probe", path, known) == expected
