"""The package's import graph, function-level imports included, has no cycle; function-level imports are kept for
what must load late: optional or heavy third-party packages, and the package's own modules only in the modules that
run before ``distributed.initialize`` (``main``, the package ``__init__``, ``config_lib`` which config files import):
JAX must not be imported there before the multi-process set-up."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "matpac_jax"
# Modules imported before jax.distributed.initialize (matpac_jax.main's flag parsing loads config files).
LATE_OWN_IMPORTS_ALLOWED = {"matpac_jax", "matpac_jax.main", "matpac_jax.config_lib"}
# Optional extras (torch, export, hear) and packages too heavy to load for every command.
LATE_THIRD_PARTY_ALLOWED = {
    "torch", "onnx", "onnxruntime", "jax2onnx", "tensorflow", "tensorflow_datasets", "hearvalidator",
    "matplotlib", "tensorboardX", "jax", "orbax", "grain", "array_record", "sklearn", "librosa", "scipy",
}  # fmt: skip
# Version shims: the one of two spellings that exists is imported where it is used.
LATE_SHIMS_ALLOWED = {"numpy._core.multiarray", "numpy.core.multiarray"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: pathlib.Path, known: set[str]):
    """(target module, line, function-level?) for every import statement of the file."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.append((full if full in known else base, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return out


def own_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in imports(path, known):
            while target and target not in known and target.startswith("matpac_jax"):
                target = target.rpartition(".")[0]  # `import matpac_jax.x.y` where y is a name
            if target in known and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    found = cycles(own_graph())
    assert not found, "import cycles (function-level imports included): " + "; ".join(" <-> ".join(c) for c in found)


def test_function_level_imports_only_where_they_must_load_late():
    mods = modules()
    bad = []
    for m, path in sorted(mods.items()):
        for target, line, nested in imports(path, set(mods)):
            if not nested:
                continue
            top = target.split(".")[0]
            own_ok = top == "matpac_jax" and m in LATE_OWN_IMPORTS_ALLOWED
            third_ok = top != "matpac_jax" and (top in LATE_THIRD_PARTY_ALLOWED or target in LATE_SHIMS_ALLOWED)
            if not (own_ok or third_ok):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not bad, "function-level imports to move to the top of their module:\n" + "\n".join(bad)


METHODS = ("matpac_jax.matpac", "matpac_jax.distill", "matpac_jax.finetune")
ABOVE_THE_METHODS = {"matpac_jax.tasks", "matpac_jax.main"}  # they pick a method and hand it down


def package_of(module: str) -> str:
    """The package-level unit of a module: matpac_jax.<first part>."""
    return ".".join(module.split(".")[:2])


def test_generic_layers_import_no_method():
    """train/, config_lib, parallel, load, checkpoint, inference, models/, data/, ... import no method package:
    ``tasks`` (or ``main``) builds the task and passes it down; a method imports the generic layers, never the
    reverse, and no method imports another."""
    bad = []
    for m, targets in sorted(own_graph().items()):
        if m in ABOVE_THE_METHODS:
            continue
        mine = package_of(m) if m.startswith(METHODS) else None
        for t in sorted(targets):
            if t in ABOVE_THE_METHODS or (t.startswith(METHODS) and package_of(t) != mine):
                bad.append(f"{m} imports {t}")
    assert not bad, "imports that reach up into a method:\n" + "\n".join(bad)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for m, targets in own_graph().items():
        graph.setdefault(package_of(m), set()).update(package_of(t) for t in targets if package_of(t) != package_of(m))
    for targets in list(graph.values()):
        for t in targets:
            graph.setdefault(t, set())
    found = cycles(graph)
    assert not found, "package-level import cycles: " + "; ".join(" <-> ".join(c) for c in found)
