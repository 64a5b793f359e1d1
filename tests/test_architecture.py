"""The house rules, checked (DESIGN.md's layout): no import circles, rooms that must not import
ray don't, every module imports alone, one source for the Trainer's defaults, no print() outside
the CLI, Ray's private API in one adapter, no file over 500 lines."""
from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO

PACKAGE = REPO / "raytrainer"
MAX_LINES = 500


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: pathlib.Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import in ``path``; a name imported
    from a package is the submodule when one exists (``from raytrainer.checkpoint import store``)."""
    tree = ast.parse(path.read_text())
    module_level = {id(n) for n in tree.body}
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node

    def top_level(node) -> bool:
        while id(node) not in module_level:
            node = parents.get(id(node))
            if node is None or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return False
        return True

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, top_level(node), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.append((sub if sub in MODULES else node.module, top_level(node), node.lineno))
    return found


def _own_graph() -> dict[str, set[str]]:
    return {name: {m for m, _, _ in _imports(path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycles():
    """Every import of our own modules counts, deferred ones inside functions too: a circle held
    open by a function-level import is still a circle."""
    assert _cycles(_own_graph()) == []


def test_the_cycle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Function-level imports of our own modules are allowed only to defer a heavy import.
DEFERRED = {
    "raytrainer.runtime.ray_train": "imports ray and ray.train (seconds): only for launcher='ray'",
    "raytrainer.checkpoint.sharded": "imports torch.distributed.checkpoint (~0.5 s): only for sharded checkpoints",
}


def test_function_level_imports_of_our_modules_only_defer_ray_or_heavy_imports():
    deferred = {(name, m, line) for name, path in MODULES.items() for m, top, line in _imports(path)
                if m in MODULES and not top}
    assert {m for _, m, _ in deferred} <= set(DEFERRED), sorted(deferred)
    for module in DEFERRED:  # and each of them really is heavy at import
        heavy = {m for m, top, _ in _imports(MODULES[module]) if top}
        assert heavy & {"ray", "raytrainer.runtime.cluster", "torch.distributed.checkpoint"} or \
            any(m.startswith("torch.distributed.checkpoint") for m in heavy), module


def test_the_loop_never_imports_ray():
    for name, path in MODULES.items():
        if name.startswith("raytrainer.loop"):
            offending = [(m, line) for m, _, line in _imports(path) if m == "ray" or m.startswith("ray.")]
            assert offending == [], f"{path.relative_to(REPO)} imports ray: {offending}"


def test_rays_private_api_is_reached_through_one_adapter():
    adapter = MODULES["raytrainer.runtime.ray_internals"]
    for name, path in MODULES.items():
        if path == adapter:
            continue
        private = [(m, line) for m, _, line in _imports(path)
                   if m.startswith("ray.") and ("._" in m or m.split(".")[-1].startswith("_"))]
        assert private == [], f"{path.relative_to(REPO)} imports Ray internals {private}; use ray_internals.py"
        text = path.read_text()
        for attr in ("_execution_idx", "_deep_copy", "_register_sigint_handler", "_datasets_to_split"):
            assert attr not in text, f"{path.relative_to(REPO)} uses Ray's private {attr}; use ray_internals.py"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_print_only_in_the_cli_and_module_print():
    """Users filter and silence raytrainer's notices with logging; the CLI's own report and
    ``Module.print`` (Lightning's ``self.print``, which prints what the user passes) print."""
    allowed = {"raytrainer.module"}
    for name, path in MODULES.items():
        if name.startswith("raytrainer.cli") or name in allowed:
            continue
        calls = [n.lineno for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert calls == [], f"print() in {path.relative_to(REPO)} at lines {calls}: use logging.getLogger(__name__)"


def test_no_global_statements():
    """No module-level state that functions rebind: process-wide state lives in objects."""
    for path in MODULES.values():
        found = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Global)]
        assert found == [], f"global statement in {path.relative_to(REPO)} at {found}"


def test_trainer_signature_and_config_defaults_agree():
    """TrainerConfig holds every default once; Trainer.__init__ spells the same arguments out
    (keyword-only), with the same defaults, plus the objects it builds (callbacks, loggers)."""
    import dataclasses

    import raytrainer as rt
    from raytrainer.config import TrainerConfig
    params = {n: p for n, p in inspect.signature(rt.Trainer.__init__).parameters.items() if n != "self"}
    # **not_supported: Lightning arguments refused by name (config errors), nothing else
    assert params.pop("not_supported").kind is inspect.Parameter.VAR_KEYWORD
    fields = {f.name: f.default for f in dataclasses.fields(TrainerConfig) if f.init}
    assert set(params) == set(fields) | {"callbacks", "logger"}
    assert all(p.kind is p.KEYWORD_ONLY for p in params.values())
    assert {n: params[n].default for n in fields} == fields
    assert (params["callbacks"].default, params["logger"].default) == (None, True)
    # The arguments as given are kept (a sweep rebuilds trials from them), resolved values apart.
    trainer = rt.Trainer(max_steps=10, precision=16, logger=False)
    assert trainer.cfg.given["max_epochs"] is None and trainer.cfg.max_epochs == -1
    assert trainer.cfg.given["precision"] == 16 and trainer.cfg.precision == "16-mixed"
    assert trainer._init_kwargs["max_steps"] == 10 and trainer._init_kwargs["logger"] is False


_ALONE = textwrap.dedent("""
    import importlib, os, sys, traceback
    import numpy, torch, fsspec, yaml, ray, ray.train, ray.tune  # third-party, loaded once before forking
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    print("FAILED:" + ",".join(failed))
""")


@pytest.mark.timeout(180)
def test_every_module_imports_alone():
    """Each module in a process where no other raytrainer module was imported first (a fork of
    one fresh interpreter per module, third-party packages preloaded): an import that works only
    after another room happened to load is caught here."""
    proc = subprocess.run([sys.executable, "-c", _ALONE, *MODULES], capture_output=True, text=True,
                          timeout=170, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "FAILED:", proc.stderr[-3000:]


_LOCAL_FIT = textwrap.dedent("""
    import sys, tempfile
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    import raytrainer as rt

    class Net(rt.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss)
            return loss
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(16, 2), torch.randn(16, 1)), batch_size=4)
    trainer = rt.Trainer(launcher="local", max_epochs=2, storage_path=tempfile.mkdtemp(), name="r")
    result = trainer.fit(Net(), data, data, )
    trainer.validate(dataloaders=data, ckpt_path="last")
    assert result.global_step == 8
    print("RAY:" + ",".join(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))))
""")


@pytest.mark.timeout(120)
def test_an_in_process_fit_never_imports_ray():
    """With loggers, checkpoints, a progress bar, validation and a resume: ray stays unimported."""
    proc = subprocess.run([sys.executable, "-c", _LOCAL_FIT], capture_output=True, text=True, timeout=110,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "RAY:", proc.stdout[-2000:]
