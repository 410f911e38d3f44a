"""One public API: the data object is the only positional argument and ``prepared_key`` names prepared data
everywhere; no module of ``diffst.tl`` imports another in a circle."""

from __future__ import annotations

import inspect

import pytest

import diffst as dst

PUBLIC = [
    dst.pp.prepare, dst.pp.image_features, dst.tl.train, dst.tl.super_resolve, dst.tl.upsample, dst.tl.tesla,
    dst.tl.evaluate, dst.tl.evaluate_spots, dst.get.pixels, dst.get.aggregate, dst.pl.gene_maps,
]  # fmt: skip


@pytest.mark.parametrize("func", PUBLIC, ids=lambda f: f.__name__)
def test_the_data_are_the_only_positional_argument(func):
    params = list(inspect.signature(func).parameters.values())
    assert params[0].name == "sdata"
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional == ["sdata"], positional


def test_one_name_for_each_key():
    """``prepared_key``: prepared data; ``key``: the result a function reads; ``key_added``: what it writes."""
    for func in PUBLIC:
        params = inspect.signature(func).parameters
        doc = inspect.getdoc(func)
        if "key" in params:  # reads an SR result (or an image on a prepared grid)
            assert func.__name__ in ("evaluate", "pixels", "aggregate", "gene_maps"), func.__name__
            assert params["key"].default == "diffst_sr"
        if "prepared_key" in params:
            assert "prepared_key\n" in doc, func.__name__


def test_old_spellings_are_errors_before_the_first_release(prepared_toy, untrained_model):
    """No compatibility layer before a release: the one spelling of each argument, the data the only positional one."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'key'"):
        dst.tl.upsample(prepared_toy, key="diffst", method="bicubic")
    with pytest.raises(TypeError, match="positional argument"):
        dst.tl.super_resolve(prepared_toy, untrained_model, inplace=False)


def _imports(package: str) -> dict[str, set[str]]:
    """The modules of ``package`` each module of it imports (top-level and lazy imports alike), by name."""
    import ast
    import importlib
    from pathlib import Path

    folder = Path(importlib.import_module(package).__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module)
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update(a.name for a in node.names)
        graph[path.stem] = {d for d in deps if (folder / f"{d}.py").exists()}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_tools_have_no_import_circle():
    graph = _imports("diffst.tl")
    assert graph["_guard"] >= {"_inference"} and "_super_resolve" not in graph["_guard"]
    assert _cycle(graph) is None, " → ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one


#: The longest a function of the tools and the model may be, in lines of code (docstring, comments and blank lines
#: left out). The simulators (``datasets/``) and ``pl.gene_maps`` are not held to it yet.
MAX_FUNCTION_LINES = 120


def test_no_function_is_a_wall_of_code():
    import ast
    import io
    import tokenize
    from pathlib import Path

    long = []
    package = Path(dst.__file__).parent
    for path in sorted(
        p for folder in ("pp", "tl", "get", "model", "features") for p in (package / folder).rglob("*.py")
    ):
        source = path.read_text()
        code_lines = {
            tok.start[0]
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        }
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    doc = set(range(body[0].lineno, body[0].end_lineno + 1))
                else:
                    doc = set()
                n = len([ln for ln in range(node.lineno, node.end_lineno + 1) if ln in code_lines and ln not in doc])
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
