"""The import structure of morph/: no circles, and no arrow from a lower layer to a higher one.

Read from the source with `ast` (nothing is imported): every `import` and `from ... import`
in a module, those inside functions included, is an arrow from it to the morph module it
names. LAYERS is the one written order (the README's layout section shows it): a module
may import from its own layer and the layers below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "morph"

# Top to bottom. Names are module paths under morph/ ("sae" is the package and everything
# in it); the longest matching name places a module.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli", "__main__", "_bundle.entry", "_bundle.build"),
    ("editor", "repl", "server", "eval", "sae", "doctor"),
    ("tasks", "runtime", "choose"),
    ("engine",),
    ("steering", "models", "store", "convert"),
    ("paths", "errors", "fsutil", "config", "crash", "meaning", "_bundle", "__init__"),
)


def modules() -> dict[str, Path]:
    """Module name (relative to morph, "sae.corpus"; a package by its name) -> file."""
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The morph modules `name` imports: `import morph.x.y` -> x.y; `from morph.x import y`
    -> x.y when that is a module, else x."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found = [_rel(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package `node.level - 1` levels up
                up = pkg.split(".")[: max(0, len(pkg.split(".")) - node.level + 1)] if pkg else []
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = "" if node.module == "morph" else _rel(node.module or "")
            if base is None:
                continue
            found = [f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in known else base or "__init__"
                     for a in node.names]
        else:
            continue
        out.update(f for f in found if f in known)
    return out - {name}


def _rel(module: str) -> str | None:
    """"morph.x.y" -> "x.y" ("morph" -> "__init__"); None outside morph."""
    if module == "morph":
        return "__init__"
    return module[len("morph."):] if module.startswith("morph.") else None


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and len(n) > depth:
                best, depth = i, len(n)
    assert best is not None, f"morph/{name}: in no layer of LAYERS (tests/test_imports.py)"
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_circles():
    assert cycles(graph()) == []


def test_no_arrow_points_up():
    up = sorted(f"{a} ({' / '.join(LAYERS[layer_of(a)])}) -> {b} ({' / '.join(LAYERS[layer_of(b)])})"
                for a, bs in graph().items() for b in bs if layer_of(b) < layer_of(a))
    assert up == []


def test_the_checker_sees_circles_and_upward_arrows():
    """The parser and both checks on a made-up graph, so that the tests above can fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("engine.vllm") > layer_of("server.app") > layer_of("cli.steer")
    mods = set(modules())
    assert "steering.request" in imports("engine.base", PACKAGE / "engine" / "base.py", mods)
    assert "engine.generate" in imports("sae.corpus", PACKAGE / "sae" / "corpus.py", mods)
