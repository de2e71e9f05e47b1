"""Every query parameter a handler reads is in the OpenAPI document, and every one the document lists is read.

Derived from the code, not a list: each handler's source (and the API's functions it calls, transitively) is
parsed for reads of the query string (`request.args.get("x")`, `request.args["x"]`, `get_args(...).get("x")`,
and helpers that read a name they are passed, such as `query_flag(request, "x")`)."""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import api
from api.app import create_app  # noqa: F401  # registers every route
from api.openapi import REGISTRY, build_document

API_ROOT = Path(api.__file__).parent
QUERY_ATTRS = ("get_args", "query_args", "query_string", "get_query_args")


@dataclass
class FunctionReads:
    """What one function takes from the query string."""

    names: set[str] = field(default_factory=set)
    # Indexes of its own parameters whose value it reads as a query parameter name (query_flag's `name`).
    name_params: set[int] = field(default_factory=set)
    unknown: list[str] = field(default_factory=list)  # reads whose name is not a literal: where, for the message
    calls: list[ast.Call] = field(default_factory=list)


def _is_args(node: ast.AST) -> bool:
    """`request.args` or `request.get_args(...)` (what `.get(name)` is called on)."""
    if isinstance(node, ast.Attribute) and node.attr == "args":
        return isinstance(node.value, ast.Name) and node.value.id in ("request", "req")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in QUERY_ATTRS


def _analyse(fn: ast.FunctionDef | ast.AsyncFunctionDef, where: str) -> FunctionReads:
    reads = FunctionReads()
    params = [a.arg for a in fn.args.args]
    handled: set[int] = set()
    for node in ast.walk(fn):
        key: ast.AST | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and _is_args(node.func.value) and node.args:
            key, base = node.args[0], node.func.value
        elif isinstance(node, ast.Subscript) and _is_args(node.value):
            key, base = node.slice, node.value
        if key is not None:
            handled.add(id(base))
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                reads.names.add(key.value)
            elif isinstance(key, ast.Name) and key.id in params:
                reads.name_params.add(params.index(key.id))
            else:
                reads.unknown.append(f"{where}:{node.lineno}")
        if isinstance(node, ast.Call):
            reads.calls.append(node)
    # The query string used any other way (iterated, passed on whole): its names cannot be known here.
    for node in ast.walk(fn):
        if _is_args(node) and id(node) not in handled:
            reads.unknown.append(f"{where}:{getattr(node, 'lineno', '?')}")
    return reads


class ApiCode:
    """The API package's functions, parsed once, with what each reads from the query string."""

    def __init__(self) -> None:
        self.functions: dict[tuple[str, str], tuple[ast.FunctionDef | ast.AsyncFunctionDef, FunctionReads]] = {}
        self.imports: dict[str, dict[str, tuple[str, str | None]]] = {}  # module -> local name -> (module, attr)
        for path in sorted(API_ROOT.rglob("*.py")):
            module = "api." + ".".join(path.relative_to(API_ROOT).with_suffix("").parts)
            module = module.removesuffix(".__init__")
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names: dict[str, tuple[str, str | None]] = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("api"):
                    for alias in node.names:
                        names[alias.asname or alias.name] = (node.module, alias.name)
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    where = f"{path.relative_to(API_ROOT.parent)}"
                    self.functions[(module, node.name)] = (node, _analyse(node, where))
            self.imports[module] = names

    def resolve(self, module: str, call: ast.Call) -> tuple[str, str] | None:
        """The API function a call names (`f(...)`, `imported(...)`, `module.f(...)`), if any."""
        imports = self.imports.get(module, {})
        if isinstance(call.func, ast.Name):
            if (module, call.func.id) in self.functions:
                return module, call.func.id
            target = imports.get(call.func.id)
            if target and (target[0], target[1]) in self.functions:
                return target[0], str(target[1])
        elif isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name):
            target = imports.get(call.func.value.id)
            if target:
                submodule = f"{target[0]}.{target[1]}"
                if (submodule, call.func.attr) in self.functions:
                    return submodule, call.func.attr
        return None

    def reads(self, module: str, name: str, seen: set[tuple[str, str]] | None = None) -> tuple[set[str], list[str]]:
        """The query names ``module.name`` reads, itself or through API functions it calls; and unknown reads."""
        seen = seen if seen is not None else set()
        if (module, name) in seen or (module, name) not in self.functions:
            return set(), []
        seen.add((module, name))
        _, own = self.functions[(module, name)]
        names, unknown = set(own.names), list(own.unknown)
        for call in own.calls:
            target = self.resolve(module, call)
            if target is None:
                continue
            callee = self.functions[target][1]
            for index in callee.name_params:
                arg = call.args[index] if index < len(call.args) else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.add(arg.value)
                else:
                    unknown.append(f"a call of {target[1]} in {module}.{name}:{call.lineno}")
            more, more_unknown = self.reads(*target, seen)
            names |= more
            unknown += more_unknown
        return names, unknown

    def readers(self) -> Iterator[tuple[str, str]]:
        """Every API function that reads the query string itself."""
        for key, (_, reads) in self.functions.items():
            if reads.names or reads.name_params or reads.unknown:
                yield key


def _handler_key(handler: Callable[..., Any]) -> tuple[str, str]:
    module = inspect.getmodule(handler)
    assert module is not None
    importlib.import_module(module.__name__)
    return module.__name__, handler.__name__


def test_every_query_parameter_a_handler_reads_is_documented_and_no_other() -> None:
    code = ApiCode()
    doc = build_document("test", internal=True)
    wrong: list[str] = []
    reached: set[tuple[str, str]] = set()
    assert REGISTRY.handlers, "no routes registered"
    for (method, path), handler in REGISTRY.handlers.items():
        module, name = _handler_key(handler)
        seen: set[tuple[str, str]] = set()
        read, unknown = code.reads(module, name, seen)
        reached |= seen
        documented = {p["name"] for p in doc["paths"][path][method.lower()].get("parameters", ())
                      if p["in"] == "query"}
        if unknown:
            wrong.append(f"{method} {path} reads query parameters whose names are not literals: {unknown}")
        if read - documented:
            wrong.append(f"{method} {path} reads {sorted(read - documented)}, not in the OpenAPI document")
        if documented - read:
            wrong.append(f"{method} {path} documents {sorted(documented - read)}, which it does not read")
    # A read outside every documented handler's reach (a route added without `route()`, a call this test
    # cannot follow) would escape the check above: each must be reached from one.
    stray = [f"{m}.{n}" for m, n in code.readers() if (m, n) not in reached]
    assert not stray, f"functions read the query string where no documented handler reaches them: {stray}"
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_each_way_of_reading() -> None:
    """The analysis itself: literal reads, subscripts, get_args, helpers taking the name, and unknowns."""
    source = '''
def helper(request, name):
    return request.get_args(keep_blank_values=True).get(name)

async def handler(request):
    a = request.args.get("a")
    b = request.args["b"]
    return helper(request, "c"), a, b

async def sloppy(request, key):
    return dict(request.args), request.args.get(key.upper())
'''
    tree = ast.parse(source)
    fns = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert _analyse(fns["helper"], "x").name_params == {1}
    assert _analyse(fns["handler"], "x").names == {"a", "b"}
    assert len(_analyse(fns["sloppy"], "x").unknown) == 2
