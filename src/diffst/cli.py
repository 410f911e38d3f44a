"""The ``diffst`` command: ``demo``, ``prepare``, ``train``, ``super-resolve``, ``upsample``, ``evaluate`` and ``plot``.

Each subcommand mirrors the Python function of the same name with the same parameter names (``--lr-um`` is
``lr_um``). The SpatialData store is read with :func:`spatialdata.read_zarr`, so the library writes its results into
that store itself. Errors in the data are reported as one line on stderr (exit status 1), in the command line's words
(``--image-key``, not ``image_key=``); ``--verbose`` shows the traceback. Usage errors exit with status 2, Ctrl-C with
130 (after ``train`` saved its checkpoint and said how to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["main"]

PROG = "diffst"
DESCRIPTION = (
    "Super-resolve spatial transcriptomics gene maps with Diff-ST, guided by the tissue image.\n\n"
    "All sizes are physical, in µm. The commands work on a SpatialData zarr store (PATH) and write their "
    "results into it: `prepare` the LR/HR gene rasters, tiles and split; `train` a model (recorded in the "
    "store); `super-resolve` into images['diffst_sr']; `evaluate` PCC / RMSE / SSIM on the test tiles. "
    "For example, 100 µm LR pixels super-resolved 10× to 10 µm:\n"
    "  diffst prepare slide.zarr --genes 25 --lr-um 100 --scale 10 --tile-um 400\n"
    "  diffst train slide.zarr\n"
    "  diffst super-resolve slide.zarr --n-samples 4\n"
    "  diffst evaluate slide.zarr --output metrics.csv\n"
    "From a platform's output folder to a store, with spatialdata-io (pip install spatialdata-io), in Python:\n"
    "  Xenium:     spatialdata_io.xenium('xenium_outs/').write('slide.zarr')\n"
    "  Visium:     spatialdata_io.visium('outs/', fullres_image_file='/abs/path/he.tif').write('slide.zarr')\n"
    "  Visium HD:  spatialdata_io.visium_hd('outs/', load_segmentations_only=False).write('slide.zarr')\n"
    "  CosMx:      spatialdata_io.cosmx('cosmx_run/').write('slide.zarr')\n"
    "  MERSCOPE:   spatialdata_io.merscope('merscope_outs/').write('slide.zarr')\n"
    "`diffst demo` runs all of it on built-in data. `diffst COMMAND --help` explains each command."
)

#: Exceptions that mean "the input or the data are wrong", reported without a traceback.
_DATA_ERRORS = (ValueError, KeyError, OSError, ImportError)


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``diffst`` command line; returns the exit status (0 success, 1 data error, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # only the command asked for is built in full: `diffst --help` then loads neither torch nor spatialdata
    parser = build_parser([a for a in argv if a in SUMMARIES][:1])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help, --version and usage errors
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    verbose = bool(getattr(args, "verbose", False))
    restore = _apply_verbosity(args)
    words = CliWords(parser, getattr(args, "command", None))
    try:
        with contextlib.nullcontext() if verbose else _quiet_ome_zarr(), words.in_messages():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        print(f"{PROG}: {words(_interrupted(e, argv))}", file=sys.stderr)
        return 130
    except _DATA_ERRORS as e:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: error: {words(_message(e))}", file=sys.stderr)
        return 1
    finally:
        restore()


def _interrupted(e: KeyboardInterrupt, argv: Sequence[str]) -> str:
    """What Ctrl-C stopped, what was kept and how to go on, with the command that resumes a training."""
    from .tl._run import Interrupted, resume_hint

    again = [a for a in argv if a not in ("--overwrite",)]
    if "train" in again and not any(a == "--resume" or a.startswith("--resume=") for a in again):
        again.append("--resume")
    how = f"`{PROG} {shlex.join(again)}`" if "train" in again else "`diffst train PATH --resume`"
    checkpoint = getattr(e, "checkpoint", None)
    if checkpoint is not None:
        return resume_hint(e.steps, e.saved_step, checkpoint, how)  # type: ignore[attr-defined]
    if isinstance(e, Interrupted):
        return str(e).replace("`dst.tl.train(..., resume=True)`", how)
    return "interrupted"


class CliWords:
    """The library's words in the command line's: `image_key=…` → `--image-key …`, `dst.tl.train` → `diffst train`.

    Applied to error messages and, while a command runs, to diffst's log lines and warnings. With ``command``, only
    that command's flags are named (a Python name it has no flag for stays as it is).
    """

    _NAME = re.compile(r"`(\w+)(?:=([^`]*))?`")
    _FUNC = re.compile(r"`?dst\.(?:pp|tl|pl)\.(\w+)(?:\([^`]*\))?`?")

    def __init__(self, parser: argparse.ArgumentParser, command: str | None = None) -> None:
        self.flags: dict[str, argparse.Action] = {}
        self.commands: set[str] = set(COMMANDS)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if command is not None and name != command:
                        continue  # only the flags the user can pass to this command
                    self._add_flags(sub)

    @classmethod
    def of_command(cls, sub: argparse.ArgumentParser) -> CliWords:
        """The words of one subcommand's parser (to rewrite its own help)."""
        words = cls(argparse.ArgumentParser(add_help=False))
        words._add_flags(sub)
        return words

    def _add_flags(self, sub: argparse.ArgumentParser) -> None:
        for a in sub._actions:
            if any(o.startswith("--") for o in a.option_strings) and a.dest != "help":
                self.flags.setdefault(a.dest, a)

    def __call__(self, text: str) -> str:
        text = self._FUNC.sub(self._function, text)
        return self._NAME.sub(self._name, text)

    def _function(self, m: re.Match[str]) -> str:
        command = m.group(1).replace("_", "-")
        return f"`{PROG} {command}`" if command in self.commands else m.group(0)

    def _name(self, m: re.Match[str]) -> str:
        action = self.flags.get(m.group(1))
        if action is None:
            return m.group(0)
        longs = [o for o in action.option_strings if o.startswith("--")]
        value = (m.group(2) or "").strip().strip("'\"")
        if not value:
            return f"`{longs[0]}`"
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"`{longs[0] if value == 'True' else longs[-1]}`"
        if action.nargs in (0, "?") and value == str(action.const):
            return f"`{longs[0]}`"
        if action.nargs in (0, "?") and value in ("True", "False", "None"):
            return f"without `{longs[0]}`"
        return f"`{longs[0]} {value}`"

    @contextlib.contextmanager
    def in_messages(self) -> Iterator[None]:
        """Rewrite diffst's log lines and Python warnings while a command runs."""
        import warnings

        logger = logging.getLogger("diffst")

        def rewrite(record: logging.LogRecord) -> bool:
            record.msg = self(record.getMessage())
            record.args = ()
            return True

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            print(f"{PROG}: warning: {self(str(message))}", file=sys.stderr)

        logger.addFilter(rewrite)
        before = warnings.showwarning
        warnings.showwarning = show
        try:
            yield
        finally:
            logger.removeFilter(rewrite)
            warnings.showwarning = before


@contextlib.contextmanager
def _quiet_ome_zarr() -> Iterator[None]:
    """Hide ome-zarr's "no parent found for <Label …>" warning, printed whenever a store with labels is read."""
    logger = logging.getLogger("ome_zarr.reader")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _message(e: BaseException) -> str:
    # KeyError's str() is the repr of its argument (quotes, escaped newlines); show the message itself
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    text = str(e)
    return text if text else type(e).__name__


def _apply_verbosity(args: argparse.Namespace) -> Callable[[], None]:
    """Set ``dst.settings.verbosity`` from ``--verbose`` / ``--quiet``; returns what puts the old value back."""
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if not (verbose or quiet):
        return lambda: None
    from ._settings import settings

    before = settings.verbosity
    settings.verbosity = 2 if verbose else 0

    def restore() -> None:
        settings.verbosity = before

    return restore


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------------------------------
# Parser, generated from the library functions
# --------------------------------------------------------------------------------------------------------------------
class _Formatter(argparse.HelpFormatter):
    """Wraps each line of a description on its own (keeping lists) and appends ``(default: …)`` where meaningful."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip():
                lines.append("")
                continue
            lead = " " * (len(line) - len(line.lstrip()))
            # "  name      text": continuation lines start under the text column
            column = re.match(r"\s+\S.*?\s{2,}(?=\S)", line)
            more = " " * column.end() if column else lead
            lines.append(
                textwrap.fill(line.strip(), width, initial_indent=indent + lead, subsequent_indent=indent + more)
            )
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and "default:" not in text
            and action.option_strings
            and default is not None
            and default is not argparse.SUPPRESS
            and not isinstance(default, bool)
            and action.nargs != 0
        ):
            text += " (default: %(default)s)"
        return text


@dataclass(frozen=True)
class Option:
    """How one library parameter reads on the command line, where its signature alone does not say it."""

    flags: tuple[str, ...] = ()
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    nargs: str | None = None
    const: Any = None
    choices: tuple[str, ...] | None = None
    help: str | None = None  # the command line's own words, where the docstring's speak Python


@dataclass(frozen=True)
class Command:
    """A subcommand: the library function it calls, the parameters it exposes and what the CLI adds around them.

    Each parameter in ``params`` becomes ``--name-with-dashes`` with the function's default, a type, choices or flag
    form derived from its annotation, and the help text of its numpydoc entry; ``options`` covers what the
    annotation cannot express (a comma-separated list, a JSON object). ``cli_only`` adds the options the function
    has no parameter for (``--output``).
    """

    function: str  # "module:name"
    summary: str
    description: str
    params: tuple[str, ...]
    run: Callable[[argparse.Namespace], int]
    path: str | None = None  # help of the PATH positional; None: the command takes no store
    options: dict[str, Option] = field(default_factory=dict)
    cli_only: Callable[[argparse.ArgumentParser], None] | None = None

    def load(self) -> Callable[..., Any]:
        """The library function (imported now: only for the command being run or asked about)."""
        import importlib

        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``diffst`` argument parser with its subcommands.

    ``commands``: the subcommands to build with their options (each imports its library function, whose signature
    and docstring the options are made from); the others are listed by name and summary only. ``None``: all of them.
    """
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the options may come before or after the subcommand without one position resetting the other
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Print details (dst.settings.verbosity = 2) and the full traceback of errors.",
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Print only warnings, errors and results (dst.settings.verbosity = 0; no progress bars).",
    )
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, formatter_class=_Formatter, parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        if commands is None or name in commands:
            _add_command(sub, common, name, command)
        else:  # listed with its summary; its options (and the library they come from) are loaded when it is used
            sub.add_parser(name, help=command.summary, parents=[common])
    return parser


def _add_command(sub: Any, common: argparse.ArgumentParser, name: str, command: Command) -> None:
    func = command.load()
    p = sub.add_parser(
        name,
        help=command.summary,
        description=f"{command.summary}\n\n{command.description}",
        formatter_class=_Formatter,
        parents=[common],
    )
    if command.path is not None:
        p.add_argument("path", metavar="PATH", help=f"SpatialData zarr store (a `.zarr` folder) {command.path}.")
    target = inspect.unwrap(func)
    signature = inspect.signature(target)
    docs = _parameter_docs(target)
    for param in command.params:
        _add_option(p, param, signature.parameters[param], docs.get(param, ""), target, command.options.get(param))
    if command.cli_only is not None:
        command.cli_only(p)
    words = CliWords.of_command(p)
    for action in p._actions:
        if action.help:
            action.help = words(action.help)
    p.set_defaults(func=command.run, library_params=command.params)


def _add_option(
    p: argparse.ArgumentParser, name: str, param: inspect.Parameter, doc: str, func: Callable, option: Option | None
) -> None:
    """``--name`` for one parameter: its default, and type, choices or flag form from its annotation."""
    option = option or Option()
    flags = option.flags or (f"--{name.replace('_', '-')}",)
    kwargs: dict[str, Any] = {"dest": name, "default": param.default, "help": option.help or doc}
    base, choices, optional = _annotation(param.annotation, func)
    if option.type is not None or option.nargs is not None:
        kwargs.update(type=option.type, metavar=option.metavar, nargs=option.nargs)
        if option.nargs == "?":
            kwargs["const"] = option.const
    elif base is bool and param.default is False and not optional:
        kwargs["action"] = "store_true"
    elif base is bool:  # True or None by default: both --name and --no-name
        kwargs["action"] = argparse.BooleanOptionalAction
    elif choices is not None or option.choices is not None:
        kwargs["choices"] = list(option.choices or choices)
    elif base in (int, float):
        kwargs["type"] = {int: _positive_int, float: _positive_float}[base] if name not in _ANY_NUMBER else base
        kwargs["metavar"] = option.metavar
    else:
        kwargs["metavar"] = option.metavar
    p.add_argument(*flags, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


#: Numeric parameters that may be zero or negative (the others must be positive).
_ANY_NUMBER = frozenset({"seed", "num_workers", "tile", "bin_size", "min_tissue", "tile_overlap"})


def _annotation(annotation: Any, func: Callable) -> tuple[type | None, list[str] | None, bool]:
    """``(base type, Literal choices, whether None is allowed)`` of a parameter's (string) annotation."""
    import typing

    if isinstance(annotation, str):
        namespace = {**vars(typing), "Path": Path, **func.__globals__}
        try:
            annotation = eval(annotation, namespace)
        except NameError:  # a name imported for type checking only (SpatialData, DiffST): not a CLI value
            return None, None, False
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, [str(a) for a in args], False
    if args and type(None) in args:  # X | None
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1:  # a union of several types: only an explicit `Option` can parse it
            return None, None, True
        base, choices, _ = _annotation(rest[0], func)
        return base, choices, True
    if annotation in (bool, int, float, str):
        return annotation, None, False
    return None, None, False


def _parameter_docs(func: Callable) -> dict[str, str]:
    """Each parameter's numpydoc description, as one paragraph in the command line's words."""
    import docstring_parser

    parsed = docstring_parser.parse(inspect.getdoc(func) or "", style=docstring_parser.DocstringStyle.NUMPYDOC)
    out = {}
    for p in parsed.params:
        text = _plain(p.description or "")
        for name in p.arg_name.split(","):
            out[name.strip()] = text
    return out


def _plain(text: str) -> str:
    """A docstring's reST and Python as command-line text, one paragraph.

    Roles → `dst.pp.prepare` (which :class:`CliWords` turns into `diffst prepare`), :doc: links → the page's name,
    ``code`` → `code`, quoted values → bare words (`"auto"` → `auto`), `True` / `False` / `None` → on / off / none.
    """
    text = re.sub(r":doc:`/?([\w-]+)`", r"the '\1' page of the documentation", text)
    text = re.sub(r":\w+:`~?diffst\.((?:pp|tl|pl|get)\.\w+)`", r"`dst.\1`", text)
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"`([\"'])([^`\"']*)\1`", r"`\2`", text)
    text = re.sub(r"`(\w+)=([\"'])([^`\"']*)\2`", r"`\1=\3`", text)
    text = re.sub(r"`(True|False|None)`", lambda m: {"True": "on", "False": "off", "None": "none"}[m.group(1)], text)
    return " ".join(text.split()).replace("%", "%%")


# --------------------------------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------------------------------
def _gene_list(text: str) -> list[str]:
    genes = [g.strip() for g in text.split(",") if g.strip()]
    if not genes:
        msg = f"expected comma-separated gene names, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return genes


def _genes_or_count(text: str) -> int | list[str]:
    stripped = text.strip()
    if stripped.isdigit():
        n = int(stripped)
        if n < 1:
            msg = f"the number of genes must be at least 1, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return n
    return _gene_list(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not value > 0 or value == float("inf"):
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _resume(text: str) -> str:
    if text != "auto":
        msg = f"expected nothing or 'auto' after --resume, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return text


def _budget(text: str) -> float | None:
    return None if text.strip().lower() == "none" else _positive_float(text)


def _region(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
        msg = f"expected X0,Y0,X1,Y1 in µm with X0 < X1 and Y0 < Y1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values  # type: ignore[return-value]


def _split_shares(text: str) -> tuple[float, float, float]:
    try:
        shares = tuple(float(v) for v in text.split(","))
    except ValueError:
        shares = ()
    if len(shares) != 3:
        msg = f"expected three comma-separated shares TRAIN,VAL,TEST (e.g. 0.7,0.15,0.15), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return shares  # type: ignore[return-value]


def _devices(text: str) -> int | str | list[int]:
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(v) for v in text.split(",") if v.strip()]
        return int(text)
    except ValueError:
        msg = f"expected 'auto', a number of devices or comma-separated device indices, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"not valid JSON ({e.msg}): {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not isinstance(value, dict):
        msg = f"expected a JSON object such as '{{\"cam\": false}}', got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


# --------------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------------
def _read(path: str) -> SpatialData:
    """The SpatialData at ``path``, backed by its store, or a clear error."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"No SpatialData store at {str(p)!r}: the path does not exist."
        raise FileNotFoundError(msg)
    if not p.is_dir() or not any((p / marker).exists() for marker in (".zgroup", "zarr.json", ".zattrs")):
        msg = (
            f"{str(p)!r} is not a SpatialData zarr store (a `.zarr` folder written by `sdata.write`). Convert your "
            "data first, e.g. with spatialdata_io (`spatialdata_io.xenium(...).write('slide.zarr')`)."
        )
        raise ValueError(msg)
    import spatialdata as sd

    try:
        return sd.read_zarr(p)
    except (ValueError, KeyError, OSError):
        raise
    except Exception as e:  # zarr / ome-zarr raise many types for a damaged store
        msg = f"Could not read the SpatialData store {str(p)!r}: {type(e).__name__}: {e}"
        raise ValueError(msg) from e


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The library function's keyword arguments: every parameter the command exposes."""
    return {n: getattr(args, n) for n in args.library_params}


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(**_kwargs(args))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .pp import prepare

    sdata = _read(args.path)
    prepare(sdata, **_kwargs(args))
    from ._contract import read_record

    written = read_record(sdata, args.key_added).elements
    print(f"wrote {', '.join(sorted(written.values()))} and attrs[{args.key_added!r}] to {args.path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .tl import train

    sdata = _read(args.path)
    kwargs = _kwargs(args)
    if args.checkpoint_dir is not None:
        # the store records the model's path: an absolute one still holds when the store is used from elsewhere
        kwargs["checkpoint_dir"] = Path(args.checkpoint_dir).expanduser().resolve()
    model = train(sdata, **kwargs)
    print(f"model saved to {model.path} (recorded in attrs[{args.prepared_key!r}]['model'] of {args.path})")
    return 0


def _cmd_super_resolve(args: argparse.Namespace) -> int:
    from .tl import super_resolve

    sdata = _read(args.path)
    super_resolve(sdata, **_kwargs(args))
    written = [args.key_added] + ([f"{args.key_added}_std"] if args.n_samples > 1 else [])
    print(f"wrote {', '.join(f'images[{w!r}]' for w in written)} and attrs[{args.key_added!r}] to {args.path}")
    return 0


def _cmd_upsample(args: argparse.Namespace) -> int:
    from .tl import upsample

    sdata = _read(args.path)
    kwargs = _kwargs(args)
    upsample(sdata, **kwargs)
    key = args.key_added or ("image_floor_sr" if args.method == "image" else f"{args.method}_sr")
    print(f"wrote images[{key!r}] and attrs[{key!r}] to {args.path}")
    return 0


def _output_file(text: str | None) -> Path | None:
    """The ``--output`` path, checked before any work: its folder must exist."""
    if text is None:
        return None
    output = Path(text).expanduser()
    if not output.parent.exists():
        msg = f"Cannot write --output {str(output)!r}: the folder {str(output.parent)!r} does not exist."
        raise FileNotFoundError(msg)
    return output


def _cmd_evaluate_spots(args: argparse.Namespace) -> int:
    from .tl import evaluate_spots

    output = _output_file(args.output)
    sdata = _read(args.path)
    df = evaluate_spots(sdata, **_kwargs(args))
    _show_scores(df, f"{df.attrs.get('spots')} held-out spots of the {args.split} tiles, each predicted while hidden:",
                 output)  # fmt: skip
    return 0


def _cmd_image_features(args: argparse.Namespace) -> int:
    from .pp import image_features

    sdata = _read(args.path)
    image_features(sdata, **_kwargs(args))
    key = args.key_added or f"{args.prepared_key}_features"
    print(f"wrote images[{key!r}] and attrs[{args.prepared_key!r}]['image_features'] to {args.path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    output = _output_file(args.output)
    import matplotlib

    matplotlib.use("Agg")
    from .pl import gene_maps

    sdata = _read(args.path)
    fig = gene_maps(sdata, **_kwargs(args))
    fig.savefig(output, dpi=args.dpi, bbox_inches="tight")
    print(f"wrote {output}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .tl import evaluate

    output = _output_file(args.output)
    sdata = _read(args.path)
    df = evaluate(sdata, **_kwargs(args))
    _show_scores(df, f"{args.key} ({df.attrs.get('method')}) on the {args.split} tiles:", output)
    return 0


def _show_scores(df, title: str, output: Path | None) -> None:
    """Print a table of scores under its title; write it as CSV to ``output`` when given."""
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(title)
        print(df)
    if output is not None:
        df.to_csv(output)
        print(f"wrote {output}")


# --------------------------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------------------------
def _output_option(p: argparse.ArgumentParser, metavar: str, default: str | None, what: str) -> None:
    p.add_argument("--output", "-o", metavar=metavar, default=default, help=what)


def _plot_options(p: argparse.ArgumentParser) -> None:
    _output_option(p, "FILE", "gene_maps.png", "The figure file (PNG, PDF or SVG by its suffix).")
    p.add_argument("--dpi", type=_positive_int, default=150, help="Resolution of a raster figure.")


_GENES = Option(type=_gene_list, metavar="G1,G2,…")
_SPLIT = Option(choices=("test", "val", "train"))
_PREPARED_KEY = Option(flags=("--prepared-key", "--key"), metavar="KEY")

COMMANDS: dict[str, Command] = {
    "demo": Command(
        "diffst._demo:run_demo",
        "Run the whole Diff-ST workflow on built-in data and compare it with bicubic up-sampling.",
        "Prepares 25 genes (100 µm LR → 10 µm HR, 400 µm tiles on the synthetic slide), trains the default preset "
        "with its default budget (about 750 steps, capped at 6 minutes of training so that the demo ends within "
        "about 10 minutes on a 2-core CPU; the best validation checkpoint is kept), super-resolves with 4 samples, "
        "up-samples bicubically and scores both on the held-out test tiles. Writes into --out:\n"
        "  demo.zarr        SpatialData: the image, the transcripts, the prepared elements (diffst_lr, diffst_hr, "
        "…), images['diffst_sr'] and ['diffst_sr_std'] (Diff-ST mean and std), images['bicubic_sr']\n"
        "  gene_maps.png    LR | SR mean | truth | SR std of 3 genes over a test region\n"
        "  training.png     training and validation curves\n"
        "  metrics.csv      PCC / RMSE / SSIM / LR consistency per gene and their mean, Diff-ST and bicubic\n"
        "  model/model.pt   the trained model (checkpoints and logs beside it)\n"
        "--quick takes about a minute (a 1200 × 1200 µm slide, 5 genes, 40 µm LR → 10 µm HR on 160 µm tiles, the "
        "tiny preset with its default budget, 1 sample): it shows that everything works, not how good Diff-ST is.",
        ("dataset", "out", "quick", "seed", "overwrite"),
        run=_cmd_demo,
    ),
    "prepare": Command(
        "diffst.pp:prepare",
        "Build low- and high-resolution gene rasters, tiles and a train/val/test split (dst.pp.prepare).",
        "Works on transcripts (Xenium, MERFISH, CosMx), spots (Visium, ST) and Visium HD bins with an H&E or "
        "fluorescence image. Writes into the store, under --key-added (default 'diffst'):\n"
        "  images['diffst_lr']       LR counts per LR pixel (channels = genes)\n"
        "  images['diffst_lr_mask']  observed fraction of each LR pixel\n"
        "  images['diffst_hr']       HR counts per HR pixel, the truth (transcripts and bins only)\n"
        "  labels['diffst_tissue']   tissue mask on the LR grid\n"
        "  shapes['diffst_tiles']    tile squares with a `split` column (train / val / test)\n"
        "  shapes['diffst_spots']    the spots defining the LR pixels (spot data, --degradation visium)\n"
        "  attrs['diffst']           units, grid, genes, normalisation, co-expression",
        (
            "genes scale lr_um degradation image_key points_key table_key coordinate_system tile_um min_tissue split "
            "split_block_um gene_selection layer bin_size um_per_px spot_diameter_um spot_pitch_um region image_kind "
            "min_qv context_genes seed key_added overwrite"
        ).split(),
        run=_cmd_prepare,
        path="with an image and one measurement (transcripts, spots or bins)",
        options={
            "genes": Option(type=_genes_or_count, metavar="N|G1,G2,…"),
            "split": Option(type=_split_shares, metavar="TRAIN,VAL,TEST"),
            "min_qv": Option(type=_budget, metavar="QV|none"),
            "context_genes": Option(type=_genes_or_count, metavar="N|G1,G2,…"),
        },
    ),
    "train": Command(
        "diffst.tl:train",
        "Train a Diff-ST model on the prepared tiles (dst.tl.train).",
        "Learns from HR truth (transcripts, Visium HD bins) or, on a spot slide alone (Visium, ST), from the spots: "
        "hidden spots predicted from the image and the other spots. Prints a progress line every 30 s (step, loss, "
        "validation PCC, time left), stops early when the validation PCC stops improving or when --time-budget runs "
        "out, writes a checkpoint at least every minute and on Ctrl-C (then says how to resume with --resume), and "
        "saves the model (EMA weights) as <run folder>/model.pt. Its path is recorded in the store's "
        "attrs[KEY]['model'], where `diffst super-resolve` finds it. Each run starts afresh in its own folder unless "
        "--resume. The default preset trains on windows of at most 400 µm.",
        (
            "prepared_key preset max_epochs batch_size device devices seed checkpoint_dir resume overwrite config "
            "patience val_steps num_workers time_budget guard supervision image_encoder"
        ).split(),
        run=_cmd_train,
        path="prepared with `diffst prepare`",
        options={
            "prepared_key": _PREPARED_KEY,
            "devices": Option(
                type=_devices,
                metavar="N|I,J,…",
                help="GPUs to train on at once with DDP: a number, or comma-separated indices (1 by default). "
                "Several GPUs need a script or notebook (the `strategy` of `dst.tl.train`).",
            ),  # fmt: skip
            "resume": Option(type=_resume, nargs="?", const=True, metavar="auto"),
            "time_budget": Option(type=_budget, metavar="SECONDS|none"),
            "config": Option(
                type=_json_object,
                metavar="JSON",
                help="Overrides of the preset's configuration, a JSON object: e.g. '{\"cam\": false}' for an "
                "ablation, '{\"learning_rate\": 5e-4}'.",
            ),  # fmt: skip
            "image_encoder": Option(metavar="learned|stain|timm:MODEL"),
        },
    ),
    "super-resolve": Command(
        "diffst.tl:super_resolve",
        "Super-resolve the gene maps over the whole tissue (dst.tl.super_resolve).",
        "Covers the tissue with overlapping model windows, samples each, blends the seams and, with --n-samples > 1, "
        "also gives the per-pixel standard deviation. Writes into the store:\n"
        "  images['diffst_sr']      the SR map on the HR grid (pixels of lr_um / scale µm; channels = genes; --units), "
        "aligned to the image\n"
        "  images['diffst_sr_std']  per-pixel standard deviation over samples (only with --n-samples > 1)\n"
        "  attrs['diffst_sr']       sampler, steps, seed, model path …\n"
        "(names follow --key-added). A store that was not prepared is prepared with the model's genes and units.",
        (
            "model genes prepared_key image_key device precision sampler steps n_samples average_flips consistency tile_overlap batch_size seed units "
            "key_added overwrite block_lr"
        ).split(),
        run=_cmd_super_resolve,
        path="with the tissue image (prepared, or raw)",
        options={"prepared_key": _PREPARED_KEY, "genes": _GENES, "model": Option(metavar="MODEL")},
    ),
    "upsample": Command(
        "diffst.tl:upsample",
        "Up-sample the LR gene maps without a model: the baselines (dst.tl.upsample).",
        "'bicubic' and 'nearest' interpolate the LR counts; 'image' is the training-free image floor (bicubic weighted "
        "by the nuclear stain of the tissue image, kept consistent with every LR pixel). Writes images['<key-added>'] "
        "(default '<method>_sr', e.g. 'bicubic_sr') on the HR grid of µm pixels, which `diffst evaluate` and "
        "`diffst plot` read.",
        ("prepared_key", "method", "key_added", "units", "consistency", "overwrite"),
        run=_cmd_upsample,
        path="prepared with `diffst prepare`",
        options={"prepared_key": _PREPARED_KEY},
    ),
    "evaluate": Command(
        "diffst.tl:evaluate",
        "Score a super-resolved result against the HR truth on held-out tiles (dst.tl.evaluate).",
        "Scores the SR map on the prepared HR grid (pixels of hr_um = lr_um / scale µm, e.g. 10 µm) against the HR "
        "truth, per gene, averaged over the tiles of --split, on the normalised scale x = 2·log1p(counts)/s_g − 1: "
        "signed Pearson r (pcc), rmse, ssim; lr_consistency Σ|D(SR) − LR| / Σ LR in counts; and the "
        "paper-compatible paper_pcc, paper_rmse (per-tile min-max scaled, |r|; they flatter every method). Any SR "
        "result is scored the same way (Diff-ST or a baseline written by dst.tl.upsample). Prints the table (genes, "
        "then their mean) and writes it to --output; the store is not changed. Without HR truth (spot data) only "
        "lr_consistency is computed.",
        ("key", "truth_key", "split", "genes"),
        run=_cmd_evaluate,
        path="with an SR result",
        options={"split": _SPLIT, "genes": _GENES},
        cli_only=lambda p: _output_option(p, "CSV", None, "CSV file for the table (default: print only)."),
    ),
    "evaluate-spots": Command(
        "diffst.tl:evaluate_spots",
        "Score held-out spots of a spot slide, each predicted while hidden (dst.tl.evaluate_spots).",
        "The check of a model trained from a spot slide alone (Visium, ST), where there is no HR truth: each spot of "
        "the tiles of --split is hidden and predicted from the image and the other spots, its map degraded through "
        "the spot discs and compared with the counts the spot measured; bicubic and nearest up-sampling of the "
        "visible spots and the image floor go through the same protocol. Prints PCC and RMSE per gene and method "
        "(genes, then their mean) and writes them to --output; the store is not changed.",
        ("model", "prepared_key", "split", "seed"),
        run=_cmd_evaluate_spots,
        path="prepared with `diffst prepare` and trained with `diffst train`",
        options={"prepared_key": _PREPARED_KEY, "split": _SPLIT, "model": Option(metavar="MODEL")},
        cli_only=lambda p: _output_option(p, "CSV", None, "CSV file for the table (default: print only)."),
    ),
    "image-features": Command(
        "diffst.pp:image_features",
        "Encode the tissue image once, on the prepared HR grid, for training and super-resolution (dst.pp.image_features).",
        "Runs an image encoder over the prepared tiles: 'stain' (weight-free stain and texture features, no "
        "download) or 'timm:MODEL' (a pretrained model through timm, e.g. a pathology foundation model; --weights "
        "for a local file on a machine without internet). Writes images['<key-added>'] (default "
        "'<prepared key>_features') on the HR grid; `diffst train --image-encoder` then conditions the model on it.",
        (
            "encoder",
            "prepared_key",
            "key_added",
            "n_components",
            "um_per_px",
            "weights",
            "pretrained",
            "device",
            "batch_size",
            "seed",
            "overwrite",
        ),  # fmt: skip
        run=_cmd_image_features,
        path="prepared with `diffst prepare`",
        options={"prepared_key": _PREPARED_KEY, "encoder": Option(metavar="stain|timm:MODEL")},
    ),
    "plot": Command(
        "diffst.pl:gene_maps",
        "Draw gene maps of a result over the tissue image: LR | SR mean | truth | SR std (dst.pl.gene_maps).",
        "One row per gene, over the same region of the slide in µm (by default a test tile). Writes the figure to "
        "--output (PNG, PDF or SVG by its suffix).",
        ("genes", "key", "region", "tile", "split", "units", "show_image", "panel_size"),
        run=_cmd_plot,
        path="with an SR result (`diffst super-resolve` or `diffst upsample`)",
        options={
            "genes": _GENES,
            "split": _SPLIT,
            "region": Option(type=_region, metavar="X0,Y0,X1,Y1"),
            "tile": Option(type=int),
        },
        cli_only=_plot_options,
    ),
}

#: One line per command, for `diffst --help` (which builds only the command it is asked about, so it imports nothing
#: heavy).
SUMMARIES = {name: command.summary for name, command in COMMANDS.items()}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
