"""House rules: imports flow one way (base → data → model → checkpoint → infer → serve → eval → train → drivers →
cli), no two files import each other (directly or round a longer loop), no module reaches for another module's
`_private` names, and no function is longer than 80 lines.

Every `import recurchat…` in the package, at module level or inside a function, may only reach its own layer or one
below it. Run: `pytest tests/test_layers.py`.
"""

import ast
from pathlib import Path

import recurchat

PACKAGE = Path(recurchat.__file__).parent
# Lowest first. A module belongs to the first entry its dotted name starts with.
LAYERS = [
    ("base", ("recurchat.errors", "recurchat.config", "recurchat.files", "recurchat.__init__")),
    ("data", ("recurchat.data",)),
    ("model", ("recurchat.model",)),
    ("checkpoint", ("recurchat.checkpoint",)),
    ("infer", ("recurchat.infer",)),
    ("serve", ("recurchat.serve",)),
    ("eval", ("recurchat.eval",)),
    ("train", ("recurchat.train",)),
    ("drivers", ("recurchat.speedrun", "recurchat.bench", "recurchat.sweep",
                 "recurchat.interop")),
    ("cli", ("recurchat.cli", "recurchat.__main__")),
]


def layer_of(module: str) -> int:
    if module == "recurchat":
        return 0
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported(tree: ast.AST, module: str) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module == "recurchat"}
    return {n for n in names if n == "recurchat" or n.startswith("recurchat.")}


def test_every_import_goes_down_or_sideways():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        mine = layer_of(module)
        for target in imported(ast.parse(path.read_text(), str(path)), module):
            if layer_of(target) > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that flow upward:\n" + "\n".join(upward)


def test_serving_never_imports_training():
    for path in [*(PACKAGE / "infer").rglob("*.py"), *(PACKAGE / "serve").rglob("*.py")]:
        targets = imported(ast.parse(path.read_text()), module_name(path))
        assert not [t for t in targets if t.startswith("recurchat.train")], path


def test_no_function_over_80_lines():
    """A function fits on one screen: the house rule that keeps setup, loops and handlers readable."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert not long, "\n".join(long)


def file_imports(path: Path) -> set[str]:
    """The package's modules this file imports when it runs (imports under `if TYPE_CHECKING:` are for annotations
    only and left out), each resolved to a module that exists: `from recurchat.x import y` names recurchat.x.y
    where y is a module, else recurchat.x."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and
                   getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                   for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("recurchat")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recurchat"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in MODULES else node.module)
    return {m for m in out if m in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def cycles_in(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the loop it closes (a → b → a)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" → ".join(trail[trail.index(t):] + [t]))
            elif t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_the_cycle_finder_finds_a_planted_loop():
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a → b → c → a"]


def test_no_import_cycle_between_files():
    graph = {m: file_imports(p) - {m} for m, p in MODULES.items()}
    # a package's __init__ is imported on the way to its modules: that edge is Python's, not a design dependency
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert "recurchat.infer.batcher" in graph["recurchat.infer.engine"]  # the graph is real
    cycles = cycles_in(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_calls_another_modules_private_names():
    """`obj._name` where obj is not self/cls (or this module's own class), and `from recurchat.x import _name`:
    what one module needs of another is public, so it can be found, tested and kept."""
    found = []
    # Tensor._version: the in-place version counter a weight cache keys on; nn.Module._modules/_parameters: the dicts
    # behind a module's attributes, read directly where a per-step check cannot afford __getattr__
    torch_internals = {"_version", "_modules", "_parameters"}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        external = {a.asname or a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for a in node.names if not a.name.startswith("recurchat")}
        external |= {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module and not node.module.startswith("recurchat") for a in node.names}
        own = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recurchat"):
                found += [f"{module_name(path)} imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_")]
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in torch_internals
                    and node.value.id not in {"self", "cls", *own, *external}):
                found.append(f"{module_name(path)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_infer_holds_no_http_and_no_command_line():
    """The engine core is a library: HTTP lives in serve/, argparse in cli/."""
    banned = ("argparse", "fastapi", "starlette", "uvicorn", "httpx")
    for path in (PACKAGE / "infer").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & set(banned), f"{path.name} imports {sorted(names & set(banned))}"
