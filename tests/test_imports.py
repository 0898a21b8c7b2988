"""The house's floors, read from the source with `ast` (every import: top-level, in functions,
under `if`): `jaxllm.parallel.core` imports only jax, numpy and the standard library;
`kernels_pallas` imports no jaxllm; `shard_map` is called only in `jaxllm.parallel`; and the
packages import one another without a ring.

A node of the package graph is a subpackage of jaxllm (`jaxllm.ops`), a top-level module
(`jaxllm.config`) or the ground floor `jaxllm.parallel.core`, its own node below
`jaxllm.parallel` (the strategies)."""

from __future__ import annotations

import ast
import sys
from functools import cache
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "jaxllm.parallel.core"
# what the ground floor may import besides the standard library
CORE_ALLOWED = {"jax", "jaxlib", "numpy"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module of jaxllm and kernels_pallas by dotted name."""
    paths = [p for pkg in ("jaxllm", "kernels_pallas") for p in (ROOT / pkg).rglob("*.py")]
    return {_module_name(p): p for p in paths}


def _imports(name: str) -> list[tuple[str, int]]:
    """(imported module, line) of every import in module `name`; `from a import b` gives
    `a.b` where that is a module of the tree, else `a`."""
    path = _modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in _modules() else base, node.lineno))
    return found


def _node(module: str) -> str:
    """The graph node of a jaxllm module: the ground floor, a subpackage or a top module."""
    if module == CORE or module.startswith(CORE + "."):
        return CORE
    return ".".join(module.split(".")[:2])


def _jaxllm_modules() -> list[str]:
    return sorted(m for m in _modules() if m.split(".")[0] == "jaxllm")


def test_ground_floor_imports_only_jax_numpy_and_the_stdlib():
    bad = [
        f"{m}:{line} imports {target}"
        for m in _jaxllm_modules()
        if _node(m) == CORE
        for target, line in _imports(m)
        if target.split(".")[0] not in CORE_ALLOWED | set(sys.stdlib_module_names)
        and _node(target) != CORE
    ]
    assert not bad, "\n".join(bad)


def test_kernels_import_no_jaxllm():
    bad = [
        f"{m}:{line} imports {target}"
        for m in sorted(_modules())
        if m.split(".")[0] == "kernels_pallas"
        for target, line in _imports(m)
        if target.split(".")[0] == "jaxllm"
    ]
    assert not bad, "\n".join(bad)


def test_shard_map_only_in_parallel():
    """`shard_map` is called (`jax.shard_map(...)`, `shard_map(...)`) only in jaxllm.parallel."""
    bad = []
    for m in _jaxllm_modules():
        if m.startswith("jaxllm.parallel"):
            continue
        path = _modules()[m]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == "shard_map":
                    bad.append(f"{m}:{node.lineno}")
    assert not bad, "shard_map called outside jaxllm.parallel: " + ", ".join(bad)


def _graph() -> dict[str, dict[str, str]]:
    """node → {node it imports: the first import that makes the edge, as module:line}."""
    edges: dict[str, dict[str, str]] = {}
    for m in _jaxllm_modules():
        src = _node(m)
        out = edges.setdefault(src, {})
        for target, line in _imports(m):
            if target.split(".")[0] != "jaxllm" or target == "jaxllm":
                continue
            dst = _node(target)
            if dst != src:
                out.setdefault(dst, f"{m}:{line}")
    return edges


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one node."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            comps.append(set(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for comp in (c for c in comps if len(c) > 1):
        start = min(comp)
        path, seen = [start], {start}
        while True:  # walk inside the component until a node repeats
            nxt = min(w for w in edges[path[-1]] if w in comp)
            if nxt in seen:
                cycles.append([*path[path.index(nxt) :], nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def test_package_graph_is_acyclic():
    edges = _graph()
    cycles = _cycles(edges)
    text = [
        " → ".join(c) + "".join(f"\n    {a} → {b}: {edges[a][b]}" for a, b in pairwise(c))
        for c in cycles
    ]
    assert not cycles, "import rings:\n" + "\n".join(text)
