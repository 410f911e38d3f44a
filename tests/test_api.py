"""One public API: the data object is the only positional argument, ``prepared_key`` names prepared data everywhere,
and the old spellings keep working for one release with a ``FutureWarning``."""

from __future__ import annotations

import inspect

import pytest

import diffst as dst
from diffst._compat import deprecated_arguments

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


def _f(sdata, *, model=None, genes=None, prepared_key="diffst"):
    return sdata, model, genes, prepared_key


def test_old_spellings_work_and_warn_with_the_new_one():
    f = deprecated_arguments(renamed={"key": "prepared_key"}, positional=("model", "genes"))(_f)
    assert inspect.signature(f) == inspect.signature(_f)  # the docs and the CLI see the new signature
    with pytest.warns(FutureWarning, match=r"pass `model=`, `genes=` to _f\(\) by name"):
        assert f("s", "m", ["g"]) == ("s", "m", ["g"], "diffst")
    with pytest.warns(FutureWarning, match=r"`key=` of _f\(\) is now `prepared_key=`.*diffst 0.3"):
        assert f("s", key="k") == ("s", None, None, "k")
    with pytest.raises(TypeError, match="both `key=`"):
        f("s", key="k", prepared_key="p")
    with pytest.raises(TypeError, match="multiple values"):
        f("s", "m", model="m2")
    with pytest.raises(TypeError, match="takes 1 positional argument"):
        f("s", "m", "g", "extra")
    with pytest.raises(TypeError, match="no parameter 'nope'"):
        deprecated_arguments(renamed={"key": "nope"})(_f)


def test_a_notebook_in_the_old_style_still_runs(prepared_toy, untrained_model):
    sdata = prepared_toy
    with pytest.warns(FutureWarning, match="`key=` of upsample"):
        dst.tl.upsample(sdata, key="diffst", method="bicubic")
    gene = str(sdata["bicubic_sr"].c.values[0])
    with pytest.warns(FutureWarning, match="by name"):
        adata = dst.get.pixels(sdata, "bicubic_sr", [gene])
    assert adata.var_names.tolist() == [gene] and adata.n_obs > 0
    with pytest.warns(FutureWarning) as record:
        out = dst.tl.super_resolve(sdata, untrained_model, key="diffst", inplace=False)
    assert {str(w.message).split(";")[0] for w in record} >= {
        "pass `model=` to super_resolve() by name, not by position (the data are its only positional argument)",
        "`key=` of super_resolve() is now `prepared_key=`",
    }
    assert set(out) >= {"mean"} and "diffst_sr" not in sdata.images  # inplace=False left sdata as it was


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
