"""House rules: imports flow one way (base → data → model → checkpoint → infer → eval → train → drivers → cli), and
no function is longer than 80 lines.

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
    ("eval", ("recurchat.eval",)),
    ("train", ("recurchat.train",)),
    ("drivers", ("recurchat.speedrun", "recurchat.bench", "recurchat.sweep", "recurchat.export",
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
    for path in (PACKAGE / "infer").rglob("*.py"):
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
