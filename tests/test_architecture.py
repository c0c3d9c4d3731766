"""The package's shape: imports run one way through the layers (no circle, lazy imports included),
every module imports in a fresh interpreter, no module over 600 lines, and the train step and loop
name no objective."""

import ast
import inspect
import os
import subprocess
import sys

from tests.conftest import ROOT

PKG = os.path.join(ROOT, "jaxllm")
# bottom up; a module may import its own layer and the ones below, never above
LAYERS = [("jaxllm", "jaxllm.errors", "jaxllm.config", "jaxllm.config_rl"), ("jaxllm.core", "jaxllm.data"), ("jaxllm.train",),
          ("jaxllm.rl",), ("jaxllm.objectives",), ("jaxllm.app",)]


def _modules() -> dict:
    """module name -> source path, for every .py under jaxllm/."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(path: str, modules: dict) -> set:
    """jaxllm modules `path` imports anywhere (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def _graph():
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
    if module in LAYERS[0]:
        return 0
    for i, packages in enumerate(LAYERS[1:], 1):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_no_import_circle():
    graph, state, stack = _graph(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_go_down_the_layers():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, upward
    config_deps = _graph()["jaxllm.config"]
    assert config_deps <= {"jaxllm.errors", "jaxllm.config_rl"}, f"config imports {config_deps}"
    assert _graph()["jaxllm.config_rl"] <= {"jaxllm.errors"}


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print('imported', len(sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_no_module_over_600_lines():
    long = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p))) > 600}
    assert not long, long


def test_train_step_and_loop_name_no_objective():
    from jaxllm.objectives import REGISTRY
    for name in ("loop", "step", "state", "objective"):
        path = os.path.join(PKG, "train", f"{name}.py")
        strings = {n.value for n in ast.walk(ast.parse(open(path).read()))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & set(REGISTRY), f"train/{name}.py names objectives {strings & set(REGISTRY)}"


def test_trainer_run_reads_in_under_50_lines():
    from jaxllm.train.loop import Trainer
    assert len(inspect.getsource(Trainer.run).splitlines()) < 50


def test_model_classes_are_chosen_in_one_place():
    """MODEL_CLASSES (name -> class) is read only by objectives.model_class."""
    def uses(path):
        return any(isinstance(n, ast.Name) and n.id == "MODEL_CLASSES" for n in ast.walk(ast.parse(open(path).read())))
    users = [m for m, p in _modules().items() if uses(p)]
    assert sorted(users) == ["jaxllm.core.model", "jaxllm.objectives"], users
