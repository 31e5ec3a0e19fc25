"""The package's import arrows run one way: an AST scan of every module's imports (top level and inside
functions). Nothing under backbones/, layers/ or deeplab_keras/architecture.py imports deeplab_keras.models
(the model sits above them), architecture.py imports only the standard library, and the modules import each
other at load time without a cycle."""
import ast
import os
import sys

import deeplab_keras

PACKAGE = os.path.dirname(os.path.abspath(deeplab_keras.__file__))
LOWER = ("deeplab_keras.backbones", "deeplab_keras.layers", "deeplab_keras.architecture")


def _modules():
    """{module name: path} of every .py file of the package (export/ included, as installed)."""
    out = {}
    for root, dirs, files in os.walk(PACKAGE, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), PACKAGE)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(["deeplab_keras", *rel])] = os.path.join(root, name)
    return out


def _imports(name, path, top_level_only):
    """The modules ``name`` imports (``from a import b`` counts as ``a`` and, when it exists, ``a.b``)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    nodes = _top_level(tree.body) if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _top_level(body):
    """Import statements run when the module loads: the module body and its if / try blocks, not functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    yield from _top_level(child.body if isinstance(child, ast.ExceptHandler) else [child])


def _graph(top_level_only):
    modules = _modules()
    return {name: sorted(m for m in _imports(name, path, top_level_only) if m in modules and m != name)
            for name, path in modules.items()}


def test_lower_layers_do_not_import_the_model():
    graph = _graph(top_level_only=False)
    assert any(name.startswith("deeplab_keras.backbones.") for name in graph)  # the scan sees the package
    upward = {name: [m for m in deps if m.startswith("deeplab_keras.models")]
              for name, deps in graph.items() if name.startswith(LOWER)}
    assert not any(upward.values()), {k: v for k, v in upward.items() if v}


def test_architecture_module_is_standard_library_only():
    path = _modules()["deeplab_keras.architecture"]
    roots = {m.split(".")[0] for m in _imports("deeplab_keras.architecture", path, top_level_only=False)}
    assert roots <= set(sys.stdlib_module_names), roots


def test_no_import_cycle():
    """At load time (function-level imports are the deliberate way down, e.g. ModelConfig.build -> DeepLabV2)."""
    graph = _graph(top_level_only=True)
    # ``from deeplab_keras import x`` in a submodule names a package that is loading already (its ancestor): no arrow
    graph = {name: [m for m in deps if not name.startswith(m + ".")] for name, deps in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_model_config_builds_without_the_model_imported_first():
    """ModelConfig.build imports the model class itself (no registry filled at import)."""
    import subprocess

    code = ("import os; os.environ.setdefault('KERAS_BACKEND', 'tensorflow')\n"
            "from deeplab_keras.models.config import ModelConfig\n"
            "m = ModelConfig(num_classes=2, backbone='vgg16', aspp='largefov', width_multiplier=0.0625).build()\n"
            "print(type(m).__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(PACKAGE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("DeepLabV2"), out.stderr[-2000:]
