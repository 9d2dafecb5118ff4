"""Imports go one way: each module of the service imports only modules on lower layers.

The layers read as a request's journey: the command line starts the server; the server wires the
listeners (ext_proc handlers, the access-log receiver, the admin API and page, health checks,
discovery) to the director; the director runs the lifecycle over the policy, the parser and the
pool; the tree and the pool's parts know nothing above them. ``dev`` (the fake worker and the local
stack) is never imported by the service.
"""

import ast
from pathlib import Path

import extproc

PACKAGE = Path(extproc.__file__).parent

LAYERS = [
    {"__main__"},
    {"cli"},
    {"processes"},
    {"server"},
    {"handlers", "als", "adminapi", "admin", "sync"},
    {"health", "discovery", "status"},
    {"director"},
    {"config"},
    {"sessions"},
    {"policy", "feedback", "payload", "pool", "metrics", "replicas"},
    {"tree", "upstream", "inflight", "addresses", "logs", "syncwire", "usage", "newprefixes"},
    {"api"},  # generated admin API messages
]


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise AssertionError(f"extproc.{module} is on no layer: add it to LAYERS")


def imports(path: Path) -> set[str]:
    """The extproc modules a file imports at run time (``if TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("extproc."):
            out.add(node.module.split(".")[1])
    return out


def service_modules() -> list[Path]:
    return [p for p in PACKAGE.glob("*.py") if p.stem != "__init__"]


def test_every_import_points_down():
    wrong = []
    for path in service_modules():
        mine = layer_of(path.stem)
        for target in imports(path):
            if layer_of(target) <= mine and target != path.stem:
                wrong.append(f"{path.stem} (layer {mine}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_service_never_imports_the_dev_tools():
    assert not [p.stem for p in service_modules() if "dev" in imports(p)]


def test_a_planted_upward_import_is_caught(tmp_path):
    planted = tmp_path / "tree.py"
    planted.write_text("from .director import Director\n")
    assert imports(planted) == {"director"} and layer_of("director") < layer_of("tree")
