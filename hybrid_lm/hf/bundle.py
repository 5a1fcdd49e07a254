"""Which modules the exported modeling file is made of: the wrapper template and every module it reaches through
relative imports, ordered so each comes after the modules it uses while being imported (see `flatten.py`).

Resolution follows Python's own: `from .x import name` finds the module that defines `name` (through a package's
`__init__` re-exports, stars included); `from .. import ops` + `ops.attention(...)` finds the module behind each
attribute used; `from . import layers` with no attribute use (a registration side effect) takes every module the
package's `__init__` re-exports names from. A package's imports of whole subpackages (`from . import triton as
_triton`) are not followed. No tensors here, so no shape letters.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

# Modules shipped beside the generated file: imports of them stay relative (`from .configuration_hybrid_lm import`).
SHIPPED = {"hf.configuration_hybrid_lm": "configuration_hybrid_lm"}
# Readability only: among modules free to go anywhere, these top-level folders come first, in this order.
SECTION_ORDER = ("ops", "utils", "registry", "config", "layers", "model", "hf")


class FlattenError(RuntimeError):
    """The package's modules cannot be flattened safely (a clash, an unresolvable import, a forbidden import)."""


@dataclass
class Module:
    name: str  # relative to the package, e.g. "ops.attention" ("ops.__init__" for a package's own file)
    path: Path
    source: bytes
    tree: ast.Module
    defs: dict[str, ast.stmt] = field(default_factory=dict)  # top-level name -> defining statement
    aliases: set[str] = field(default_factory=set)  # names bound to packages/modules (`ops` in `ops.attention`)
    imported: set[str] = field(default_factory=set)  # names taken from other bundled modules
    hoisted: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # (module, name, asname)
    needs: set[str] = field(default_factory=set)  # modules it uses while being imported (they go first)
    uses: set[str] = field(default_factory=set)  # modules it uses only when its functions run

    @property
    def tag(self) -> str:
        return self.name.replace(".", "_")


def bound_names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def only_relative_imports(stmt: ast.stmt) -> bool:
    """`if TYPE_CHECKING:` blocks holding nothing but relative imports vanish with them (and bring in nothing)."""
    return (isinstance(stmt, ast.If) and not stmt.orelse
            and all(isinstance(s, ast.ImportFrom) and s.level > 0 for s in stmt.body))


def resolve(module: Module, node: ast.ImportFrom) -> str:
    """The package-relative dotted target of a relative import ("" for the package itself)."""
    parts = module.name.split(".")[:-1]
    if node.level - 1 > len(parts):
        raise FlattenError(f"{module.path}:{node.lineno}: relative import climbs out of the package")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + (node.module.split(".") if node.module else []))


def _runtime_nodes(stmt: ast.stmt):
    """(node, inside_function) for every node of a top-level statement."""
    stack = [(stmt, False)]
    while stack:
        node, nested = stack.pop()
        yield node, nested
        inner = nested or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


class Bundle:
    """The modules the template reaches, found by following relative imports through the package."""

    def __init__(self, package_dir: Path, drop: dict[str, tuple[str, ...]]):
        self.package_dir, self.drop = package_dir, drop
        self.loaded: dict[str, Module] = {}
        self.modules: list[Module] = []

    def kind(self, dotted: str) -> str | None:
        path = self.package_dir.joinpath(*dotted.split(".")) if dotted else self.package_dir
        if (path / "__init__.py").is_file():
            return "package"
        return "module" if dotted and path.with_suffix(".py").is_file() else None

    def load(self, name: str) -> Module:
        if name not in self.loaded:
            path = self.package_dir.joinpath(*name.split(".")).with_suffix(".py")
            if not path.is_file():
                raise FlattenError(f"module {name} not found at {path}")
            source = path.read_bytes()
            m = Module(name, path, source, ast.parse(source, filename=str(path)))
            for stmt in m.tree.body:
                if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    m.defs.update({n: stmt for n in bound_names(stmt)
                                   if n != "__all__" and n not in self.drop.get(name, ())})
            self.loaded[name] = m
        return self.loaded[name]

    def init(self, package: str) -> Module:
        return self.load(f"{package}.__init__" if package else "__init__")

    def definer(self, target: str, name: str, where: str) -> tuple[str, str]:
        """("def", module defining `name`) or ("module", dotted) when `from .target import name` names a module."""
        if self.kind(target) == "module":
            m = self.load(target)
            if name in m.defs:
                return "def", target
            for stmt in m.tree.body:  # a name the module itself imports relatively
                if isinstance(stmt, ast.ImportFrom) and stmt.level > 0 and any(
                        (a.asname or a.name) == name for a in stmt.names):
                    return self.definer(resolve(m, stmt), name, where)
            raise FlattenError(f"{where}: {name!r} is not defined in {target}")
        if self.kind(target) == "package":
            return self.provider(target, name, where)
        raise FlattenError(f"{where}: no module {target!r} in the package")

    def provider(self, package: str, name: str, where: str) -> tuple[str, str]:
        """Where `package.name` comes from: a re-export in the package's __init__, or a submodule."""
        init, stars = self.init(package), []
        for stmt in init.tree.body:
            if not (isinstance(stmt, ast.ImportFrom) and stmt.level > 0):
                continue
            for alias in stmt.names:
                if alias.name == "*":
                    stars.append(resolve(init, stmt))
                elif (alias.asname or alias.name) == name:
                    if alias.asname not in (None, alias.name):
                        raise FlattenError(f"{init.path}: re-exports {alias.name!r} as {alias.asname!r}; "
                                           f"flattening needs one name")
                    return self.definer(resolve(init, stmt), alias.name, where)
        for star in stars:
            if self.kind(star) == "module" and name in self.load(star).defs:
                return "def", star
        if name in init.defs:
            raise FlattenError(f"{where}: {name!r} is defined in {init.path}; move it into a module")
        sub = f"{package}.{name}" if package else name
        if self.kind(sub):
            return "module", sub
        raise FlattenError(f"{where}: package {package or '(root)'!r} provides no {name!r}")

    def reexported_modules(self, package: str, where: str) -> set[str]:
        """The modules behind every name a package's __init__ re-exports (a side-effect `from . import pkg`)."""
        init, found = self.init(package), set()
        for stmt in init.tree.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.level > 0:
                for alias in stmt.names:
                    target = resolve(init, stmt)
                    if alias.name == "*":
                        found.add(target)
                    elif self.kind(f"{target}.{alias.name}" if target else alias.name) is None:
                        found.add(self.definer(target, alias.name, where)[1])
        return found

    def link(self, m: Module) -> None:
        """Fill the module's aliases, imported names, hoisted imports and the modules it needs or uses."""
        attrs: dict[str, list[tuple[str, bool]]] = {}
        imports = []
        for stmt in m.tree.body:
            if isinstance(stmt, ast.Import):
                m.hoisted += [(a.name, None, a.asname) for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0:
                m.hoisted += [(stmt.module, a.name, a.asname) for a in stmt.names]
            if only_relative_imports(stmt):
                continue
            for node, nested in _runtime_nodes(stmt):
                if isinstance(node, ast.ImportFrom) and node.level > 0:
                    imports.append((node, nested))
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    attrs.setdefault(node.value.id, []).append((node.attr, nested))
        for node, nested in imports:
            target = resolve(m, node)
            if target in SHIPPED:
                continue
            for alias in node.names:
                where = f"{m.path}:{node.lineno}"
                if alias.asname not in (None, alias.name) or alias.name == "*":
                    raise FlattenError(f"{where}: `import ... as` / `import *` from the package cannot be "
                                       f"flattened; import the names themselves")
                kind, found = self.definer(target, alias.name, where)
                if kind == "def":
                    m.imported.add(alias.name)
                    (m.uses if nested else m.needs).add(found)
                    continue
                m.aliases.add(alias.name)
                used = attrs.get(alias.name, [])
                if not used and self.kind(found) == "package":
                    (m.uses if nested else m.needs).update(self.reexported_modules(found, where))
                for attr, attr_nested in used:
                    kind2, owner = (self.provider(found, attr, where) if self.kind(found) == "package"
                                    else self.definer(found, attr, where))
                    if kind2 != "def":
                        raise FlattenError(f"{where}: {alias.name}.{attr} is a module; use its names directly")
                    (m.uses if nested or attr_nested else m.needs).add(owner)

    def discover(self, root: str) -> None:
        queue, seen = [root], set()
        while queue:
            name = queue.pop()
            if name in seen:
                continue
            seen.add(name)
            m = self.load(name)
            self.link(m)
            queue.extend(sorted(m.needs | m.uses))
        self.modules = self._ordered(root, seen)

    def _ordered(self, root: str, names: set[str]) -> list[Module]:
        """Every module after the modules it needs at import time; otherwise SECTION_ORDER, then by name."""
        def rank(name):
            top = name.split(".")[0]
            return (SECTION_ORDER.index(top) if top in SECTION_ORDER else len(SECTION_ORDER) - 1.5, name)

        order, state = [], {}

        def visit(name, path):
            if state.get(name) == "done":
                return
            if state.get(name) == "active":
                raise FlattenError(f"import cycle at import time: {' -> '.join(path + [name])}")
            state[name] = "active"
            for dep in sorted(self.loaded[name].needs, key=rank):
                visit(dep, path + [name])
            state[name] = "done"
            order.append(self.loaded[name])

        for name in sorted(names - {root}, key=rank) + [root]:
            visit(name, [])
        return order


__all__ = ["Bundle", "FlattenError", "Module", "SHIPPED", "bound_names", "only_relative_imports", "resolve"]
