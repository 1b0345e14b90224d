"""The shape of the code: no import cycles, and each package exports exactly its public list.

Imports are read from the source (`ast`), so an import hidden behind `TYPE_CHECKING` or
inside a function counts too. A package's public list is written out here: a name added
to or dropped from a package's surface must be a decision, made here as well.
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("actors", "messages", "persistence", "cli")

ERRORS = {
    "AgentConfigError",
    "AgentNotFound",
    "AgentNotInGroup",
    "AgentRoleError",
    "BlockExists",
    "BlockNotFound",
    "BlockVersionNotFound",
    "DatabaseInUse",
    "GroupBusy",
    "GroupFailed",
    "GroupNotFound",
    "MessageNotFound",
    "NotFoundError",
    "NotOwner",
    "OwnershipLost",
    "PrimaryAgentError",
    "ReadOnlyRuntime",
    "RunEventNotFound",
    "RunNotFound",
    "RunsTimeout",
    "RuntimeBusy",
    "RuntimeFailed",
    "RuntimeStopped",
    "SchemaMismatch",
    "ShardLost",
    "SleeptimeError",
    "StoreRejected",
    "StoreUnavailable",
    "TransitionRefused",
    "TurnTimeout",
    "UnknownAgentKind",
}
PUBLIC: dict[str, set[str]] = {
    "actors": ERRORS
    | {
        # the runtime and its settings
        "Runtime",
        "TurnStream",
        "AsyncRuntime",
        "AsyncTurnStream",
        "Chaos",
        "RestartPolicy",
        "DEFAULT_URL",
        "DEFAULT_MEMORY_PERSONA",
        "DEFAULT_PASSIVATE_AFTER",
        "DEFAULT_MAX_ACTIVE_GROUPS",
        "configure_logging",
        # the agent SDK (actors.sdk) and the kind registry (`rt.agents`)
        "AgentBehaviour",
        "AgentContext",
        "AgentFactory",
        "AgentKinds",
        "Memory",
        "StepFailed",
        "StepResult",
        "ToolResult",
        # the rules and the checks (actors.rules, invariants)
        "INITIAL_COUNTER",
        "decide_fire",
        "DEFAULT_PREAMBLE",
        "render_transcript",
        "INVARIANTS",
        "InvariantReport",
        # retention (issue 19)
        "PruneReport",
    },
    "messages": ERRORS
    | {
        "ALLOWED_TRANSITIONS",
        "TERMINAL_STATUSES",
        "DEFAULT_BLOCK_LIMIT",
        "DEFAULT_MAX_ATTEMPTS",
        "DEFAULT_RUN_TIMEOUT",
        "MAX_RUN_TIMEOUT",
        "MEMORY_PERSONA",
        "Agent",
        "AgentSpec",
        "Block",
        "BlockCreate",
        "Blocks",
        "BlockChange",
        "BlockSource",
        "BlockVersion",
        "ContentPart",
        "Group",
        "GroupSettings",
        "ImageContent",
        "Message",
        "MessageCreate",
        "ReasoningContent",
        "Role",
        "Run",
        "RunEvent",
        "RunStatus",
        "StopReason",
        "TextContent",
        "ToolCall",
        "TurnResult",
        "GroupOwner",
        # retention (issue 19)
        "PRUNE_KINDS",
        "PruneReport",
        "PruneSettings",
    },
    "persistence": {
        "DEFAULT_SHARDS",
        "MAX_SHARDS",
        "Leases",
        "ShardBook",
        "ShardOwner",
        "Store",
        "StoreObserver",
        "GroupState",
        "NewGroup",
        "RetentionMarks",
        "AgentJoin",
        "AgentLeave",
        "StaleTurn",
        "Transition",
        "TurnRequest",
        "TurnWrite",
        "parse_url",
        "redact",
        "serving_processes",
        "sqlite_file",
        "utcnow",
    },
    "cli": set(),
}
RAY_MODULES = {
    "actors._ray_async_client",
    "actors._ray_client",
    "actors._ray_host",
    "actors._ray_local",
    "actors._ray_routes",
    "actors.ray_cluster",
    "cli.ray_workloads",
}
"""The modules that import Ray (the `ray` extra): nothing else may, so the base install
works without it."""
PUBLIC_MODULES: dict[str, set[str]] = {
    # sleeptime on a Ray cluster (SPEC 16), with the ray extra
    "actors.ray_cluster": {
        "DEFAULT_HOST_CPUS",
        "DEFAULT_MAX_RESTARTS",
        "DEFAULT_NAMESPACE",
        "AsyncRayRuntime",
        "AsyncRayTurnStream",
        "HostGone",
        "HostInfo",
        "LocalRay",
        "RayAgentKinds",
        "RayCluster",
        "RayRuntime",
        "RayTurnStream",
        "ShardHost",
        "connect_ray",
        "local_ray",
        "start_hosts",
        "start_local_ray",
    },
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {module for module in found if module in known and module != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_in_a_cycle() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_hidden_behind_type_checking_count(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n"
    )
    assert imports("pkg.m", module, {"pkg.m": module, "pkg.b": module}) == {"pkg.b"}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_exports_its_public_list_and_nothing_else(package: str) -> None:
    module = importlib.import_module(package)
    exported = set(getattr(module, "__all__", []))
    assert exported == PUBLIC[package]
    defined = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert defined <= exported, f"{package} binds names outside __all__: {defined - exported}"
    assert all(hasattr(module, name) for name in exported)


@pytest.mark.parametrize("name", sorted(PUBLIC_MODULES))
def test_a_public_module_exports_its_public_list(name: str) -> None:
    pytest.importorskip("ray", reason="the ray extra is missing")
    module = importlib.import_module(name)
    assert set(module.__all__) == PUBLIC_MODULES[name]
    assert all(hasattr(module, exported) for exported in module.__all__)


def _loaded_at_import(name: str, path: Path, known: dict[str, Path]) -> tuple[bool, set[str]]:
    """Whether the module imports Ray itself when it is imported, and the project modules
    it imports then (its top-level statements only; an import in a function waits)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ray_itself, project = False, set()
    for node in ast.parse(path.read_text()).body:
        found: list[str] = []
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        ray_itself |= any(m == "ray" or m.startswith("ray.") for m in found)
        project |= {m for m in found if m in known and m != name}
    return ray_itself, project


def test_only_the_ray_modules_import_ray() -> None:
    known = modules()
    graph = {name: _loaded_at_import(name, path, known) for name, path in known.items()}
    importing = {name for name, (itself, _) in graph.items() if itself}
    while True:  # and whatever imports one of them, when it is imported
        more = {name for name, (_, uses) in graph.items() if uses & importing} - importing
        if not more:
            break
        importing |= more
    assert importing == RAY_MODULES
