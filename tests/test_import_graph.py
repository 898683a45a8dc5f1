"""The package's import graph: no module imports itself through others (every import counted, also those inside
functions), and no room imports a room above it in the architecture's order."""
import ast
from pathlib import Path

import prefuse

ROOT = Path(prefuse.__file__).parent
# the architecture, from the ground up: a module may import its own room and rooms below it
LAYERS = [
    ("prefuse.kernels",),
    ("prefuse.algorithms",),
    ("prefuse.heads", "prefuse.preference", "prefuse.vocab_parallel_preference", "prefuse.batch_gather"),
    ("prefuse.engine.checks",),  # settings' one-line errors: no prefuse import, used by every settings section
    ("prefuse.engine.data", "prefuse.engine.checkpoint", "prefuse.engine.models"),
    ("prefuse.engine.core", "prefuse.engine.judges"),
    ("prefuse.engine.online",),
    ("prefuse.engine.methods",),
    ("prefuse.engine.train",),
    ("prefuse.engine.reward", "prefuse.engine.sft"),
    ("prefuse.engine.eval",),
    ("prefuse.commands", "prefuse.compat", "prefuse.bench"),
    ("prefuse.cli", "prefuse.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The prefuse modules that `name` imports, anywhere in it; `from pkg import sub` counts the submodule."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "prefuse"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "prefuse":
                continue
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            found |= subs or {base}
            if len(subs) < len(node.names):
                found.add(base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_the_package_has_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def layer_of(name: str) -> int:
    best = None
    for i, rooms in enumerate(LAYERS):
        for room in rooms:
            if name == room or name.startswith(room + "."):
                if best is None or len(room) > best[1]:
                    best = (i, len(room))
    assert best is not None or name in ("prefuse", "prefuse.engine"), f"{name}: in no layer of LAYERS"
    return best[0] if best else -1


def test_no_module_imports_a_room_above_its_own():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in sorted(targets)
              if layer_of(a) >= 0 and layer_of(b) > layer_of(a)]
    assert not upward, "imports that run up the architecture:\n" + "\n".join(upward)


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    """The checks above can fail: the reader finds a function-local import and a relative one."""
    edges = graph()
    assert "prefuse.engine.checkpoint.files" in edges["prefuse.engine.checkpoint"]  # `from . import files`
    assert "prefuse.commands.registry" in edges["prefuse.cli"]  # inside a function
    assert "prefuse.kernels" in edges["prefuse"]


# modules imported inside a function because they need an optional dependency (Triton, vLLM) or are one backend of
# two picked at run time; the command modules and the bench import the engine when they run, so that one command's
# start does not load every other's
LAZY_ALLOWED = {"prefuse.kernels.triton_ops", "prefuse.kernels.torch_ops", "prefuse.engine.online.vllm"}
LAZY_ROOMS = ("prefuse.commands", "prefuse.bench", "prefuse.cli")


def test_function_local_imports_only_for_optional_dependencies():
    found = []
    for name, path in modules().items():
        if name.startswith(LAZY_ROOMS):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefuse"):
                    targets = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                elif isinstance(node, ast.Import):
                    targets = {a.name for a in node.names if a.name.startswith("prefuse")}
                else:
                    continue
                if targets and not targets & LAZY_ALLOWED:
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {sorted(targets)[0]}")
    assert not found, "imports inside functions without an optional dependency:\n" + "\n".join(found)
