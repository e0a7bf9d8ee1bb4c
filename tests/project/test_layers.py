"""The package layers of app/, checked statically (every import, lazy ones inside functions too):
imports point only down the order below, and no module imports itself back through others."""

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
# bottom -> top; a package may import its own modules and any package before it
LAYERS = ["core", "config", "data", "models", "plan", "inference", "evaluation", "training", "serve", "cli", "webui"]


def _imports() -> dict[str, set[str]]:
    """module ('app.x.y') -> the app modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in APP.rglob("*.py"):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "app":
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from app.training import dist`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "app")
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_every_module_is_in_a_layer():
    flat = sorted(
        m for m in _imports() if m.count(".") == 1 and m.split(".")[1] not in LAYERS and m not in ("app.__main__",)
    )
    assert not flat, f"modules outside the layer packages: {flat}; put each in one of {LAYERS}"
    assert {p.name for p in APP.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)


def test_imports_point_only_down():
    up = []
    for mod, deps in _imports().items():
        if mod.count(".") < 2:
            continue  # app, app.__main__ and the packages' __init__ (app.cli)
        layer = LAYERS.index(mod.split(".")[1])
        up += [
            f"{mod} -> {d}"
            for d in deps
            if d.count(".") and d.split(".")[1] in LAYERS and LAYERS.index(d.split(".")[1]) > layer
        ]
    assert not up, "imports that point up a layer: " + "; ".join(sorted(up))


def test_no_import_cycle():
    graph, state, cycles = _imports(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d) :] + [m, d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(cycles)
