"""Sphinx configuration for diffst.

Build (offline, warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The tutorials live in the repository's ``tutorials/`` folder; myst-nb only renders notebooks inside the source
directory, so they are copied to ``docs/tutorials/`` (git-ignored) when the build starts. Notebooks are not executed
here (``nb_execution_mode = "off"``): they are saved executed (``tutorials/run.py``), with their figures, and
``tests/test_tutorials.py`` executes them again.
"""

from __future__ import annotations

import filecmp
import re
import shutil
import warnings
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).parent
TUTORIALS = HERE.parent / "tutorials"

project = "diffst"
author = "diffst developers"
copyright = f"{date.today().year}, {author}"
release = _version("diffst")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]

# --- API pages -----------------------------------------------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_custom_sections = [("Attributes", "params_style")]
typehints_defaults = "comma"
typehints_document_rtype = True
always_document_param_types = False

# Without intersphinx (the build is offline) references to third-party types cannot resolve. Ignore exactly those;
# a broken reference to diffst's own objects is still an error.
nitpicky = True
_THIRD_PARTY = (
    r"(numpy|np|pandas|pd|torch|nn|scipy|anndata|spatialdata|spatialdata_io|xarray|xr|dask|da|distributed|lightning|L"
    r"|matplotlib|geopandas|gpd|shapely|skimage|diffusers|squidpy|scanpy|pooch|pathlib|collections|typing|dataclasses"
    r"|datetime|abc|timm)"
)
nitpick_ignore_regex = [
    (r"py:.*", _THIRD_PARTY + r"\..*"),
    (
        r"py:(class|obj|data)",
        r"(SpatialData|AnnData|DataArray|DataTree|DataFrame|GeoDataFrame|Tensor|Module|Generator|Figure|Axes|Path"
        r"|Sequence|Mapping|Iterable|Literal|Any|Callable|ndarray|dtype|device|Trainer|Callback|Client|Affine|Sequence"
        r"|Identity|Scale|Translation|Ellipsis)",
    ),
    # public type aliases (Literal[...]) shown by name in signatures
    (r"py:(class|obj|data)", r"(GeneSelection|Sampler|SamplerName|Precision|PresetName|Preset|Units|UpsampleMethod|SizeUm|Resume|Supervision)"),
    # private classes that appear in public signatures' type hints (not documented on purpose)
    (r"py:class", r"diffst\._contract\.Prepared"),
    (r"py:class", r"diffst\._degradation\.(BinDegradation|SpotDegradation)"),
    # the model's records, whose fields the DiffST docstring lists
    (r"py:class", r"diffst\.tl\._model\.(Guard|ModelUnits)"),
]

# --- MyST and notebooks ------------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are saved executed (tutorials/run.py); the test suite runs them again
nb_merge_streams = True

# sphinx-autodoc-typehints 3.6 calls an API that Sphinx 9 deprecates; the Python warning is noise, not a docs problem
warnings.filterwarnings("ignore", category=DeprecationWarning, module="sphinx_autodoc_typehints")
warnings.filterwarnings("ignore", message=".*set_application.*is deprecated")

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
# ".rst" first: autosummary writes its generated pages with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# --- HTML ----------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "diffst"
html_static_path: list[str] = []
html_theme_options = {
    "repository_url": "https://github.com/scverse/diffst",
    "use_repository_button": True,
    "path_to_docs": "docs",
}


def _copy_tutorials() -> None:
    """Copy ``../tutorials/*.ipynb`` into ``docs/tutorials/`` (only changed files, so rebuilds stay incremental)."""
    target = HERE / "tutorials"
    target.mkdir(exist_ok=True)
    sources = sorted(TUTORIALS.glob("*.ipynb"))
    for src in sources:
        dst = target / src.name
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            shutil.copy2(src, dst)
    names = {s.name for s in sources}
    for stale in target.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()


_copy_tutorials()


_SECTION_RULE = re.compile(r"^-{3,}$")


def _prose_returns(app, what, name, obj, options, lines: list[str]) -> None:
    """Render a prose ``Returns`` section as one ``:returns:`` field (the scverse docstring style, as scanpydoc does).

    diffst's docstrings say in prose what a function returns and where it writes (types live in the signature).
    Napoleon reads every unindented line of a numpydoc ``Returns`` section as a separate ``type`` entry, which turns
    a paragraph into a bullet per line (breaking inline literals and lists that span lines) and a one-line
    description into a cross-referenced return type. Sections in the typed numpydoc form (``name : type`` or a type
    line followed by an indented description) are left to napoleon. Runs before napoleon (priority 400 < 500).
    """
    for i in range(len(lines) - 1):
        if lines[i].strip() == "Returns" and _SECTION_RULE.match(lines[i + 1].strip()) and not lines[i][:1].isspace():
            break
    else:
        return
    start = i + 2
    end = start
    while end < len(lines):
        nxt = lines[end + 1].strip() if end + 1 < len(lines) else ""
        if lines[end].strip() and not lines[end][:1].isspace() and _SECTION_RULE.match(nxt):
            break
        end += 1
    body = lines[start:end]
    while body and not body[-1].strip():
        body.pop()
    content = [ln for ln in body if ln.strip()]
    if not content:
        return
    first = content[0]
    typed = " : " in first or (len(content) > 1 and content[1][:1].isspace() and not first.rstrip().endswith(":"))
    if typed and not first.lstrip().startswith(("-", "*")):
        return
    # an empty "name : type" line with the prose indented under it: napoleon renders that as one ``:returns:``
    lines[start:end] = [":", *[f"    {ln}" if ln.strip() else "" for ln in body], ""]


def _dataclass_fields() -> set[str]:
    from dataclasses import fields

    import diffst
    from diffst.model import DiffSTConfig, DiffSTOutput

    return {f.name for cls in (diffst.DiffST, DiffSTConfig, DiffSTOutput) for f in fields(cls)}


_FIELDS = _dataclass_fields()


def _skip_dataclass_fields(app, what, name, obj, skip, options):
    """Leave out the fields of diffst's dataclasses as separate entries: their docstrings' Attributes sections
    document them (with the types from the signature), so listing them again adds only noise."""
    if what == "class" and name in _FIELDS and not callable(obj) and not isinstance(obj, property):
        return True
    return None


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _prose_returns, priority=400)
    app.connect("autodoc-skip-member", _skip_dataclass_fields)
