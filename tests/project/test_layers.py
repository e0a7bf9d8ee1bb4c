"""The package layers of app/, checked statically (every import, lazy ones inside functions too):
imports point only down the order below, no module imports itself back through others, and no module
reaches into another package's private (_x) names."""

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
# bottom -> top; a package may import its own modules and any package before it
LAYERS = ["core", "config", "data", "models", "plan", "inference", "evaluation", "training", "serve", "cli", "webui"]


def _modules(root: Path) -> dict[str, ast.Module]:
    """module ('app.x.y', named from ``root``, the top package's folder) -> its parsed source."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports() -> dict[str, set[str]]:
    """module ('app.x.y') -> the app modules it imports."""
    graph: dict[str, set[str]] = {}
    for name, tree in _modules(APP).items():
        deps = graph.setdefault(name, set())
        for node in ast.walk(tree):
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


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(root: Path) -> list[str]:
    """Where a module of the package at ``root`` uses another package's private name: ``from app.x.y import _z``,
    or ``app.x.y._z`` / ``y._z`` through a module it imported (``import app.x.y``, ``from app.x import y``).
    Within one package (app.data -> app.data) a private name is fair; across packages what is shared is public."""
    mods, top = _modules(root), root.name

    def package(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    found = set()
    for mod, tree in mods.items():
        bound: dict[str, str] = {}  # a local name -> the module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == top:
                for a in node.names:
                    if f"{node.module}.{a.name}" in mods:
                        bound[a.asname or a.name] = f"{node.module}.{a.name}"
                    elif _private(a.name) and package(node.module) != package(mod):
                        found.add(f"{mod}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                bound.update(
                    (a.asname or top, a.name if a.asname else top) for a in node.names if a.name.split(".")[0] == top
                )
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            target = ".".join([bound[value.id], *chain]) if isinstance(value, ast.Name) and value.id in bound else ""
            if target in mods and package(target) != package(mod):
                found.add(f"{mod}: {target}.{node.attr}")
    return sorted(found)


def test_no_package_uses_another_packages_private_names():
    found = private_uses(APP)
    assert not found, "private names used across packages (make them public, with a docstring): " + "; ".join(found)


def test_the_private_name_check_catches_each_form(tmp_path):
    root = tmp_path / "app"
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/mod.py": "_SECRET = 1\nPUBLIC = 2\n\ndef _helper():\n    return _SECRET\n",
        "low/peer.py": "from app.low.mod import _helper\nimport app.low.mod\n\nX = app.low.mod._SECRET\n",
        "high/__init__.py": "",
        "high/direct.py": "def f():\n    from app.low.mod import PUBLIC, _helper\n    return _helper()\n",
        "high/dotted.py": "import app.low.mod\n\nY = app.low.mod._SECRET + app.low.mod.PUBLIC\n",
        "high/aliased.py": "import app.low.mod as m\nfrom app.low import mod\n\n"
        "Z = m._helper, mod._SECRET, mod.__name__\n",
        "high/renamed.py": "from app.low.mod import PUBLIC as _public\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    assert private_uses(root) == [
        "app.high.aliased: app.low.mod._SECRET",
        "app.high.aliased: app.low.mod._helper",
        "app.high.direct: from app.low.mod import _helper",
        "app.high.dotted: app.low.mod._SECRET",
    ]
