"""The package's layers (docs/architecture.md), checked statically: no module imports a higher layer, no import
cycle between modules or between packages, and no function-local import of our own modules in the packages that
keep their imports at the top, and no module of megatron_opsd/, tests/ or tools/ uses another module's private
(``_``) names. Pure AST over the source files: nothing is imported, it runs in about two seconds.

Every ``import`` counts as an arrow, at module level and inside functions alike (a function-local import is a
dependency too, only a hidden one); imports under ``if TYPE_CHECKING:`` do not (they never run). The CLI boundary
(``megatron_opsd/cli.py``, the subcommand modules it names and the code they share, ``SHARED_CLI_MODULES``) is
where the rooms are wired together, so it belongs to the top layer wherever its file lives: it may import any
layer, and nothing below it may import it. Inside ``training/``, each method's subpackage is a unit above the
shared run machinery, and no method imports another.
"""
from __future__ import annotations

import ast
import sys
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "megatron_opsd"

# Subpackages that are units of their own (``training.opsd``), not part of their parent's unit: training's method
# subpackages sit above the run machinery they compose, and no method imports another (``METHODS``).
METHODS = ("training.opsd", "training.grpo", "training.sft")
SUBPACKAGE_UNITS = METHODS

# Lowest first. A module may import its own layer and the layers below it; the units are the top-level modules
# and subpackages of megatron_opsd ("" is the package's own __init__), and SUBPACKAGE_UNITS. Keep
# docs/architecture.md in step.
LAYERS: list[tuple[str, ...]] = [
    ("", "errors", "lifecycle", "templates"),  # no imports of our own beyond this layer
    ("parallel",),  # process groups, CPU compatibility, local multi-process launch
    ("models",),  # megatron GPTModel from HF configs, weights, LoRA, tokenizers
    ("config",),  # the one dataclass tree (holds parallel's ParallelConfig, validates model.lora's targets)
    ("data", "rewards", "losses"),  # prompts and contexts, verifiers and filters, vocab-parallel divergences
    ("rollout",),  # the vLLM sidecar: server, client, weight transports
    ("training",),  # the run machinery every method composes: run, loop, schedule, engine, checkpoints, batches
    METHODS,  # one subpackage per method: its step, trainer, CLI (and config checks); none imports another
    ("evaluation",),  # benchmarks on the sidecar
    ("pipeline", "planning"),  # stage runner (SFT -> RLVR -> OPSD), memory planner
    ("demo",),  # the CPU demo and its ablation
    ("cli",),  # `megatron-opsd`
]

# Known arrows that break the rules, each with who removes it. Deleted entries are checked too: an entry that no
# longer matches an import fails the test, so the list only shrinks.
ALLOWED_ARROWS: dict[tuple[str, str], str] = {
}

# Packages whose own imports (megatron_opsd.*) are all at module top, outside the CLI boundary. Third-party heavy
# or optional packages (vllm in the trainer process, megatron-core, transformers, wandb, math-verify, ...) may still
# be imported inside functions: docs/architecture.md, "Imports".
TOP_IMPORT_UNITS = ("", "errors", "lifecycle", "templates", "parallel", "models", "data", "rewards", "rollout",
                    "evaluation", "pipeline", "planning", "demo", "training", "losses", *METHODS)

# CLI boundary modules that no SUBCOMMANDS entry names: code the subcommands share.
SHARED_CLI_MODULES = {
    "megatron_opsd.training.cli": "the flags, pre-launch checks and launch of `train`, `rl` and `sft`",
}

# Our own modules that may be imported inside functions: they import an optional heavy package at module top.
LAZY_MODULES: dict[str, str] = {
    "megatron_opsd.rollout.client.collective": "imports vLLM at module top; the trainer process loads vLLM only "
                                               "for rollout.transport=collective",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _unit(module: str) -> str:
    """The layer unit of a module: ``megatron_opsd.rollout.client`` -> ``rollout``; the package itself -> ``""``;
    a module of a SUBPACKAGE_UNITS entry -> that entry (``megatron_opsd.training.opsd.step`` -> ``training.opsd``);
    a CLI boundary module -> ``cli``, wherever its file lives: the top layer (``training/opsd/cli.py`` may wire
    training to evaluation)."""
    if module in _cli_boundary():
        return "cli"
    return _subpackage_unit(module) or (module.split(".")[1] if "." in module else "")


def _subpackage_unit(module: str) -> str:
    """The SUBPACKAGE_UNITS entry ``module`` belongs to, CLI boundary or not (``""`` if none)."""
    return next((unit for unit in SUBPACKAGE_UNITS if f"{module}.".startswith(f"megatron_opsd.{unit}.")), "")


def _layer_of(unit: str) -> int:
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"megatron_opsd.{unit} has no layer: add it to LAYERS in tests/test_architecture.py "
                         "and to docs/architecture.md")


@lru_cache(maxsize=None)
def _cli_boundary() -> frozenset[str]:
    """``megatron_opsd.cli`` and every module its SUBCOMMANDS table names (read from the source, not imported)."""
    tree = ast.parse(_modules()["megatron_opsd.cli"].read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "SUBCOMMANDS":
            table = ast.literal_eval(node.value)
            return frozenset({"megatron_opsd.cli", *SHARED_CLI_MODULES, *(module for module, _ in table.values())})
    raise AssertionError("megatron_opsd/cli.py has no SUBCOMMANDS table")


def _resolve(target: str) -> str:
    """The module an import reaches: ``megatron_opsd.models.gpt.unwrap`` -> ``megatron_opsd.models.gpt``."""
    modules = _modules()
    while target not in modules:
        target = target.rpartition(".")[0]
    return target


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _from_base(package: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads (a relative one resolved against ``package``)."""
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return base


@lru_cache(maxsize=None)
def _imports(module: str) -> tuple[tuple[str, int, bool], ...]:
    """(imported module, line, at module level) for each import of megatron_opsd in ``module``."""
    path = _modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                out.extend((_resolve(a.name), child.lineno, top) for a in child.names
                           if a.name.split(".")[0] == "megatron_opsd")
            elif isinstance(child, ast.ImportFrom):
                base = _from_base(package, child)
                if base.split(".")[0] == "megatron_opsd":
                    out.extend((_resolve(f"{base}.{a.name}"), child.lineno, top) for a in child.names)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            else:
                visit(child, top)

    visit(ast.parse(path.read_text()), True)
    return tuple(out)


@lru_cache(maxsize=None)
def _arrows() -> dict[str, set[str]]:
    """module -> the modules it imports (itself excluded), without the allowed arrows."""
    graph = {m: {t for t, _, _ in _imports(m) if t != m} for m in _modules()}
    for source, target in ALLOWED_ARROWS:
        graph.get(source, set()).discard(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_unit_has_a_layer():
    for module in _modules():
        _layer_of(_unit(module))
    listed = [unit for units in LAYERS for unit in units]
    assert len(listed) == len(set(listed)), f"a unit is in two layers: {listed}"


def _upward(imports: dict[str, tuple]) -> list[str]:
    """``module -> ((target, line, top), ...)`` -> one line per import of a higher layer (allow-list excepted)."""
    return [f"{_modules()[module].relative_to(PACKAGE_DIR.parent)}:{line}: {module} (layer "
            f"{_unit(module) or 'megatron_opsd'}) imports {target}"
            for module, targets in imports.items() for target, line, _ in targets
            if (module, target) not in ALLOWED_ARROWS and _layer_of(_unit(target)) > _layer_of(_unit(module))]


def _package_graph(arrows: dict[str, set[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in arrows.items():
        graph.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    return graph


def test_no_module_imports_a_higher_layer():
    upward = _upward({m: _imports(m) for m in _modules()})
    assert not upward, "imports of a higher layer (docs/architecture.md):\n" + "\n".join(upward)


def _cross_method(imports: dict[str, tuple]) -> list[str]:
    """One line per import of another method's module by a method's module (its CLI included): a method composes
    the shared machinery, never another method (what two methods share moves down to ``training/``)."""
    return [f"{_modules()[module].relative_to(PACKAGE_DIR.parent)}:{line}: {module} ({_subpackage_unit(module)}) "
            f"imports {target} ({_subpackage_unit(target)})"
            for module, targets in imports.items() if _subpackage_unit(module) in METHODS
            for target, line, _ in targets if _subpackage_unit(target) not in ("", _subpackage_unit(module))]


def test_no_method_imports_another_method():
    crossing = _cross_method({m: _imports(m) for m in _modules()})
    assert not crossing, "a method imports another method (docs/architecture.md, 'Layers'):\n" + "\n".join(crossing)


def test_no_import_cycle_between_modules():
    cycles = _cycles(_arrows())
    assert not cycles, "import cycles (module level and function-local imports both count):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_import_cycle_between_packages():
    cycles = _cycles(_package_graph(_arrows()))
    assert not cycles, "import cycles between packages:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_allowed_arrows_still_exist():
    """An allow-list entry whose import is gone must be deleted (the list only shrinks)."""
    stale = [f"{source} -> {target}" for source, target in ALLOWED_ARROWS
             if source not in _modules() or target not in {t for t, _, _ in _imports(source)}]
    assert not stale, "delete these ALLOWED_ARROWS entries, the imports are gone:\n" + "\n".join(stale)


def test_own_imports_at_module_top():
    boundary = _cli_boundary()
    local = [f"{_modules()[m].relative_to(PACKAGE_DIR.parent)}:{line}: {target}"
             for m in _modules() if _unit(m) in TOP_IMPORT_UNITS and m not in boundary
             for target, line, top in _imports(m) if not top and target not in LAZY_MODULES]
    assert not local, ("function-local imports of megatron_opsd modules (move them to the top; "
                       "docs/architecture.md, 'Imports'):\n" + "\n".join(local))


# rollout/ by process (docs/sidecar.md, "Processes"): each subpackage runs in one process and imports only itself
# and the shared modules at rollout/'s top (protocol, secret, transfer, environment), which import none of the
# subpackages; the rest of the package (the trainer, evaluation, the pipeline) is the trainer side and imports only
# the client and the shared modules. The CLI boundary starts any of them (``megatron-opsd sidecar``).
ROLLOUT_PROCESSES = {"client": "the trainer process", "sidecar": "the sidecar's server process",
                     "worker": "vLLM's engine-core and worker processes"}


def _rollout_side(module: str) -> str | None:
    """``client`` / ``sidecar`` / ``worker`` for a module of that subpackage, ``shared`` for the rest of rollout/,
    None outside rollout/."""
    parts = module.split(".")
    if parts[:2] != ["megatron_opsd", "rollout"]:
        return None
    return parts[2] if len(parts) > 2 and parts[2] in ROLLOUT_PROCESSES else "shared"


def _cross_process(imports: dict[str, tuple]) -> list[str]:
    """One line per import that crosses rollout/'s process boundaries (see ``ROLLOUT_PROCESSES``)."""
    boundary = _cli_boundary()
    found = []
    for module, targets in imports.items():
        side = _rollout_side(module)
        for target, line, _ in targets:
            to = _rollout_side(target)
            if to is None or to == "shared" or to == side or (side is None and (to == "client" or module in boundary)):
                continue
            where = f"{_modules()[module].relative_to(PACKAGE_DIR.parent)}:{line}: {module}"
            runs_in = ROLLOUT_PROCESSES.get(side or "client") if side != "shared" else "every process"
            found.append(f"{where} (runs in {runs_in}) imports {target} ({ROLLOUT_PROCESSES[to]})")
    return found


def test_rollout_processes_import_only_their_own_side():
    found = _cross_process({m: _imports(m) for m in _modules()})
    assert not found, "rollout/ imports across processes (docs/sidecar.md, 'Processes'):\n" + "\n".join(found)
    imports = {m: _imports(m) for m in _modules()}
    planted = {"megatron_opsd.rollout.sidecar.server": "megatron_opsd.rollout.client.sidecar_client",
               "megatron_opsd.rollout.worker.extension": "megatron_opsd.rollout.client.auth",
               "megatron_opsd.rollout.client.sidecar_client": "megatron_opsd.rollout.sidecar.staging",
               "megatron_opsd.rollout.protocol": "megatron_opsd.rollout.worker.collective",
               "megatron_opsd.evaluation.runner": "megatron_opsd.rollout.sidecar.engine"}
    for module, target in planted.items():
        imports[module] += ((target, 1, True),)
    crossing = {line.split(": ", 1)[1].split(" (runs in")[0] + " -> " + line.rsplit(" imports ", 1)[1].split(" (")[0]
                for line in _cross_process(imports)}
    assert crossing == {f"{m} -> {t}" for m, t in planted.items()}, crossing


# Our own source trees: a private name of any module in them is that module's own business.
SOURCE_TREES = ("megatron_opsd", "tests", "tools")

@lru_cache(maxsize=None)
def _sources() -> dict[str, Path]:
    """Every module of megatron_opsd/, tests/ and tools/ by dotted name (``tests.test_checkpoint``)."""
    return {_module_name(p): p for tree in SOURCE_TREES for p in sorted((PACKAGE_DIR.parent / tree).rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")  # dunders (``__version__``) are public


@lru_cache(maxsize=None)
def _private_members() -> dict[str, frozenset[str]]:
    """``_name`` -> the modules whose classes define it (a method, a class attribute or ``self._name = ...``)."""
    found: dict[str, set[str]] = {}
    for module in _sources():
        for cls in ast.walk(_parsed(module)):
            if not isinstance(cls, ast.ClassDef):
                continue
            for node in ast.walk(cls):
                names = []
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names = [node.name]
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names = [node.attr] if getattr(node.value, "id", None) == "self" else []
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [t.id for t in targets if isinstance(t, ast.Name)]
                for name in filter(_is_private, names):
                    found.setdefault(name, set()).add(module)
    return {name: frozenset(modules) for name, modules in found.items()}


def _private_uses(module: str, tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, name, owner) for each use in ``module`` of a private (``_``) name that another of our modules owns:
    ``from megatron_opsd.x import _name``; ``x._name`` (read, call or monkeypatch) and ``setattr/getattr(x,
    "_name")`` where ``x`` is an imported module of ours; ``obj._name`` where ``_name`` is a private member of a
    class in another of our modules and this module defines no member of that name (``self``/``cls`` excepted).
    A name two modules share is public (drop the underscore) or moves to the module that owns it."""
    sources = _sources()
    package = module if sources[module].name == "__init__.py" else module.rpartition(".")[0]
    ours = set(SOURCE_TREES) | set(sources)
    bound: dict[str, str] = {}  # local name -> the module (or package) of ours it names
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in SOURCE_TREES:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(package, node)
            if base.split(".")[0] not in SOURCE_TREES:
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in ours or (PACKAGE_DIR.parent / target.replace(".", "/")).is_dir():
                    bound[alias.asname or alias.name] = target
                elif _is_private(alias.name) and base != module:
                    out.append((node.lineno, alias.name, base))

    def owner(expr: ast.AST) -> str | None:
        """The module or package of ours that ``expr`` names, if any (``megatron_opsd.training.opsd``)."""
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            parent = owner(expr.value)
            return f"{parent}.{expr.attr}" if parent and f"{parent}.{expr.attr}" in ours else None
        return None

    members = _private_members()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            where = owner(node.value)
            if where is not None and where != module:
                out.append((node.lineno, node.attr, where))
            elif where is None and node.attr in members and module not in members[node.attr] and \
                    getattr(node.value, "id", None) not in ("self", "cls"):
                out.append((node.lineno, node.attr, " / ".join(sorted(members[node.attr]))))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "setattr", "getattr", "delattr", "hasattr") and len(node.args) >= 2:
            where, name = owner(node.args[0]), node.args[1]
            if where is not None and where != module and isinstance(name, ast.Constant) and \
                    isinstance(name.value, str) and _is_private(name.value):
                out.append((node.lineno, name.value, where))
    return sorted(out)


@lru_cache(maxsize=None)
def _parsed(module: str) -> ast.AST:
    return ast.parse(_sources()[module].read_text())


def _private_violations(module: str, tree: ast.AST) -> list[str]:
    path = _sources()[module].relative_to(PACKAGE_DIR.parent)
    return [f"{path}:{line}: {module} uses the private {name} of {where}"
            for line, name, where in _private_uses(module, tree)]


def test_no_private_names_used_across_modules():
    found = [line for m in _sources() for line in _private_violations(m, _parsed(m))]
    assert not found, "private names used from another module (make them public or move them; " \
        "docs/architecture.md, 'Imports'):\n" + "\n".join(found)


def test_checks_find_planted_violations():
    """The checks can fail: an upward arrow (between packages, and from training's machinery into a method), a
    method importing another, a module cycle and a package cycle planted in the real graph."""
    imports = {m: _imports(m) for m in _modules()}
    imports["megatron_opsd.parallel.distributed"] += (("megatron_opsd.models.gpt", 1, False),)
    imports["megatron_opsd.training.run"] += (("megatron_opsd.training.opsd.step", 1, True),)
    imports["megatron_opsd.training.grpo.step"] += (("megatron_opsd.training.opsd.step", 1, True),)
    upward = _upward(imports)
    assert any("megatron_opsd.parallel.distributed (layer parallel) imports megatron_opsd.models.gpt" in line
               for line in upward)
    assert any("megatron_opsd.training.run (layer training) imports megatron_opsd.training.opsd.step" in line
               for line in upward)
    assert [line.split(": ", 1)[1] for line in _cross_method(imports)] == [
        "megatron_opsd.training.grpo.step (training.grpo) imports megatron_opsd.training.opsd.step (training.opsd)"]
    arrows = {m: set(t) for m, t in _arrows().items()}
    arrows["megatron_opsd.models.weights"].add("megatron_opsd.models.lora")  # lora imports weights
    assert ["megatron_opsd.models.lora", "megatron_opsd.models.weights"] in _cycles(arrows)
    arrows["megatron_opsd.data.contexts"].add("megatron_opsd.rollout.client")
    arrows["megatron_opsd.rollout.client"].add("megatron_opsd.data.datasets")
    assert ["data", "rollout"] in _cycles(_package_graph(arrows))
    planted = ast.parse("from megatron_opsd.models.weights import Recipe, _SafetensorsReader\n"
                        "from .weights import _export_view\nfrom megatron_opsd import __version__\n"
                        "from megatron_opsd.training import opsd\nimport megatron_opsd.rollout.client as rc\n"
                        "import megatron_opsd\n"
                        "opsd._planted(1)\nopsd._planted = None\nrc._planted\nmegatron_opsd.training.opsd._planted\n"
                        "setattr(opsd, '_planted', 1)\ngetattr(opsd, 'public')\n"
                        "def f(client, self):\n    client._senders, self._senders, opsd.__name__\n")
    assert [line.split(": ", 1)[1] for line in _private_violations("megatron_opsd.models.lora_peft", planted)] == [
        f"megatron_opsd.models.lora_peft uses the private {name} of {owner}" for name, owner in [
            ("_SafetensorsReader", "megatron_opsd.models.weights"), ("_export_view", "megatron_opsd.models.weights"),
            ("_planted", "megatron_opsd.training.opsd"), ("_planted", "megatron_opsd.training.opsd"),
            ("_planted", "megatron_opsd.rollout.client"), ("_planted", "megatron_opsd.training.opsd"),
            ("_planted", "megatron_opsd.training.opsd"), ("_senders", "megatron_opsd.rollout.client.sidecar_client")]]
    own = ast.parse("from megatron_opsd.models.weights import _SafetensorsReader\n")
    assert _private_violations("megatron_opsd.models.weights", own) == []  # a module's own private name
    same = ast.parse("def f(client):\n    client._senders\n")
    assert _private_violations("megatron_opsd.rollout.client.sidecar_client", same) == []  # its own class's member


# One direction of control (issue 29): the trainers (their own files) call the machinery; the machinery never
# calls back. Only the step loop and ``Run.fit``, which drive a trainer, may name it; only OPSD's trainer builds
# (names) its teacher prompts, from the rollouts that came back.
TRAINER_FILES = {f"megatron_opsd.{method}.trainer" for method in METHODS}
TRAINER_DRIVERS = ("megatron_opsd.training.loop.", "megatron_opsd.training.run.Run.fit")


def _trainer_callbacks(module: str, tree: ast.AST) -> list[str]:
    """``module``'s functions (qualified names) that name a ``trainer`` outside the drivers, or ``teacher_prompts``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                names = {n.id for n in ast.walk(child) if isinstance(n, ast.Name)}
                names |= {n.arg for n in ast.walk(child) if isinstance(n, ast.arg)}
                names |= {n.attr for n in ast.walk(child) if isinstance(n, ast.Attribute)}
                if not isinstance(child, ast.ClassDef):
                    if "trainer" in names and not name.startswith(TRAINER_DRIVERS):
                        found.append(f"{name} names the trainer")
                    if "teacher_prompts" in names:
                        found.append(f"{name} names teacher_prompts")
                visit(child, name + ".")

    if module not in TRAINER_FILES:
        visit(tree, module + ".")
    return sorted(set(found))


def test_no_component_calls_back_into_the_trainer():
    training = [m for m in _modules() if m.startswith("megatron_opsd.training.")]
    found = [line for m in training for line in _trainer_callbacks(m, _parsed(m))]
    assert not found, "the machinery calls back into the trainer (docs/architecture.md, 'One step'):\n" + \
        "\n".join(found)
    planted = ast.parse("class Run:\n    def save(self, trainer):\n        trainer.extra_models()\n"
                        "    def fit(self, trainer):\n        trainer.train_step(None)\n"
                        "def sample_rollouts(run, make):\n    return make.teacher_prompts()\n")
    assert _trainer_callbacks("megatron_opsd.training.run", planted) == [
        "megatron_opsd.training.run.Run.save names the trainer",
        "megatron_opsd.training.run.sample_rollouts names teacher_prompts"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
