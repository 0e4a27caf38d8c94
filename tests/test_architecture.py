"""The package's layers point one way: no import cycles, and nothing in dense_ops depends on the
test reference (dense_ops.reference), which depends on the package."""
import ast
import importlib.machinery
from pathlib import Path

import pytest
import torch

import dense_ops

PACKAGE_DIR = Path(dense_ops.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path | None]:
    """Every module of the package: its Python sources, and its compiled extension (no source to read)."""
    modules = {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        modules.update({f"dense_ops.{path.name[:-len(suffix)]}": None for path in PACKAGE_DIR.glob(f"*{suffix}")})
    return modules


def _imported(node: ast.AST, importer: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The dense_ops modules an import statement loads (a package when it imports names from its __init__)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base not in modules:
        return []
    submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    return submodules if len(submodules) == len(node.names) else [base, *submodules]


def import_graph() -> dict[str, set[str]]:
    """module -> the dense_ops modules it imports, anywhere in its code (function-level imports too)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        if path is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {target for node in ast.walk(tree)
                       for target in _imported(node, name, is_package, modules) if target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state = {}  # module -> "visiting" | "done"

    def visit(module, path):
        state[module] = "visiting"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "visiting":
                return path[path.index(target):] + [module, target] if target in path else [module, target]
            if target not in state:
                cycle = visit(target, path + [module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            if cycle:
                return cycle
    return None


def test_import_graph_is_read_from_the_sources():
    graph = import_graph()
    assert {"dense_ops.ops", "dense_ops._common"} <= graph["dense_ops.functional"]
    assert graph["dense_ops.ops"] == {"dense_ops._C"}
    assert "dense_ops.nn.unfused" in graph["dense_ops.nn.dense"]
    assert "dense_ops.condense" in graph["dense_ops.reference"]


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    # The package's __init__ imports every module to expose it; the modules import their siblings,
    # never the package's __init__ (checked here too: that edge would close a cycle through it).
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_only_the_package_facade_imports_the_reference():
    importers = {module for module, targets in import_graph().items() if "dense_ops.reference" in targets}
    assert importers == {"dense_ops"}


def test_python_recompute_levels_are_the_ops():
    """functional.RECOMPUTE_LEVELS names the levels the C++ op parses (Recompute in csrc/dense_block.h)."""
    block = dense_ops.DenseBlock(2, 4, 2, 4).double()
    params = [t for layer in block.values() for t in dense_ops.nn.dense._layer_params(layer)]
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)

    def run(level):
        return torch.ops.dense_ops.dense_block_forward(x, params, None, True, True, level, 1e-5, None)

    for level in dense_ops.functional.RECOMPUTE_LEVELS:
        run(level)
    with pytest.raises(RuntimeError, match="recompute"):
        run("everything")
