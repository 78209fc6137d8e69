"""The package layout: stages import each other without cycles, decoding depends on neither
analysis nor evaluation, models on no later stage, and every module reads in one sitting."""

import ast
import os

from hf_fixtures import REPO

PACKAGE = os.path.join(REPO, "jaxrast")
MAX_LINES = 400


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def imports(path: str, name: str, known: set[str]) -> set[str]:
    """The package modules `path` imports, at module level or inside functions."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "jaxrast":
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_stages_depend_only_on_earlier_stages():
    edges = graph()
    rules = {  # a package's modules may not import these packages
        "jaxrast.rast": ("jaxrast.analysis", "jaxrast.eval", "jaxrast.commands", "jaxrast.grpo", "jaxrast.serve"),
        "jaxrast.models": ("jaxrast.rast", "jaxrast.analysis", "jaxrast.eval", "jaxrast.grpo", "jaxrast.commands",
                           "jaxrast.serve"),
        "jaxrast.runtime": ("jaxrast.models", "jaxrast.rast", "jaxrast.analysis", "jaxrast.eval", "jaxrast.grpo",
                            "jaxrast.commands", "jaxrast.serve"),
        "jaxrast.data": ("jaxrast.rast", "jaxrast.analysis", "jaxrast.grpo", "jaxrast.commands", "jaxrast.serve"),
        "jaxrast.eval": ("jaxrast.models", "jaxrast.rast", "jaxrast.analysis", "jaxrast.grpo", "jaxrast.commands"),
    }
    bad = [f"{mod} imports {dep}" for mod, deps in edges.items() for dep in deps
           for pkg, banned in rules.items() if mod.startswith(pkg + ".") or mod == pkg
           if any(dep == b or dep.startswith(b + ".") for b in banned)]
    assert not bad, "\n".join(bad)


def test_every_module_reads_in_one_sitting():
    long = {name: n for name, path in modules().items()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_checker_finds_a_cycle(tmp_path):
    """The graph walk itself: a two-module cycle written to disk is found."""
    (tmp_path / "a.py").write_text("from jaxrast.b import x\n")
    (tmp_path / "b.py").write_text("import jaxrast.a\n")
    known = {"jaxrast.a", "jaxrast.b"}
    assert imports(str(tmp_path / "a.py"), "jaxrast.a", known) == {"jaxrast.b"}
    assert imports(str(tmp_path / "b.py"), "jaxrast.b", known) == {"jaxrast.a"}
