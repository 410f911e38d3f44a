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
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["main"]

PROG = "diffst"

#: The keyword arguments each command passes to its library function: their defaults are the function's own.
DEMO_ARGS = ("dataset", "out", "quick", "seed", "overwrite")
PREPARE_ARGS = (
    "genes scale lr_um degradation image_key points_key table_key coordinate_system tile_um min_tissue split "
    "split_block_um gene_selection layer bin_size um_per_px spot_diameter_um spot_pitch_um region image_kind seed "
    "key_added overwrite"
).split()
TRAIN_ARGS = (
    "key preset max_epochs batch_size accelerator devices seed checkpoint_dir resume overwrite config patience "
    "val_steps num_workers time_budget guard supervision image_encoder"
).split()
SUPER_RESOLVE_ARGS = (
    "genes key sampler steps n_samples consistency tile_overlap batch_size seed units key_added overwrite block_lr"
).split()
EVALUATE_ARGS = ("key", "truth_key", "split", "genes")
UPSAMPLE_ARGS = ("key", "method", "key_added", "units", "consistency", "overwrite")
PLOT_ARGS = ("key", "region", "tile", "split", "units", "show_image", "panel_size")

#: One line per command, for `diffst --help` (which builds only the command it is asked about, so it imports nothing
#: heavy).
SUMMARIES = {
    "demo": "Run the whole Diff-ST workflow on built-in data and compare it with bicubic up-sampling.",
    "prepare": "Build low- and high-resolution gene rasters, tiles and a train/val/test split (dst.pp.prepare).",
    "train": "Train a Diff-ST model on the prepared tiles (dst.tl.train).",
    "super-resolve": "Super-resolve the gene maps over the whole tissue (dst.tl.super_resolve).",
    "upsample": "Up-sample the LR gene maps without a model: the baselines (dst.tl.upsample).",
    "plot": "Draw gene maps of a result over the tissue image: LR | SR mean | truth | SR std (dst.pl.gene_maps).",
    "evaluate": "Score a super-resolved result against the HR truth on held-out tiles (dst.tl.evaluate).",
}

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
        print(f"{PROG}: {_interrupted(e, argv)}", file=sys.stderr)
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
    """What Ctrl-C stopped, and for ``train`` where its checkpoint is and the command that resumes it."""
    checkpoint = getattr(e, "checkpoint", None)
    if checkpoint is None:
        return "interrupted"
    from .tl._run import resume_hint

    again = [a for a in argv if a not in ("--overwrite",)]
    if "train" in again and not any(a == "--resume" or a.startswith("--resume=") for a in again):
        again.append("--resume")
    how = f"`{PROG} {shlex.join(again)}`" if "train" in again else "`diffst train PATH --resume`"
    return resume_hint(e.steps, e.saved_step, checkpoint, how)  # type: ignore[attr-defined]


class CliWords:
    """The library's words in the command line's: `image_key=…` → `--image-key …`, `dst.tl.train` → `diffst train`.

    Applied to error messages and, while a command runs, to diffst's log lines and warnings. With ``command``, only
    that command's flags are named (a Python name it has no flag for stays as it is).
    """

    _NAME = re.compile(r"`(\w+)(?:=([^`]*))?`")
    _FUNC = re.compile(r"`?dst\.(?:pp|tl|pl)\.(\w+)(?:\([^`]*\))?`?")

    def __init__(self, parser: argparse.ArgumentParser, command: str | None = None) -> None:
        self.flags: dict[str, argparse.Action] = {}
        self.commands: set[str] = set()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    self.commands.add(name)
                    if command is not None and name != command:
                        continue  # only the flags the user can pass to this command
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
# Parser
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


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``diffst`` argument parser with its subcommands.

    ``commands``: the subcommands to build with their options (each takes its defaults from the library function's
    signature, which imports it); the others are listed by name and summary only. ``None``: all of them.
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

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Super-resolve spatial transcriptomics gene maps with Diff-ST, guided by the tissue image.\n\n"
            "All sizes are physical, in µm. The commands work on a SpatialData zarr store (PATH) and write their "
            "results into it: `prepare` the LR/HR gene rasters, tiles and split; `train` a model (recorded in the "
            "store); `super-resolve` into images['diffst_sr']; `evaluate` PCC / RMSE / SSIM on the test tiles. "
            "For example, 100 µm LR pixels super-resolved 10× to 10 µm:\n"
            "  diffst prepare slide.zarr --genes 25 --lr-um 100 --scale 10 --tile-um 400\n"
            "  diffst train slide.zarr\n"
            "  diffst super-resolve slide.zarr --n-samples 4\n"
            "  diffst evaluate slide.zarr --output metrics.csv\n"
            "`diffst demo` runs all of it on built-in data. `diffst COMMAND --help` explains each command."
        ),
        formatter_class=_Formatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    adders = {
        "demo": _add_demo,
        "prepare": _add_prepare,
        "train": _add_train,
        "super-resolve": _add_super_resolve,
        "upsample": _add_upsample,
        "evaluate": _add_evaluate,
        "plot": _add_plot,
    }
    for name, add in adders.items():
        if commands is None or name in commands:
            add(sub, common)
        else:  # listed with its summary; its options (and the library they come from) are loaded when it is used
            sub.add_parser(name, help=SUMMARIES[name], parents=[common])
    return parser


def _subparser(sub: Any, common: argparse.ArgumentParser, name: str, description: str):
    """A command's parser: its one-line summary (from ``SUMMARIES``) above ``description``."""
    summary = SUMMARIES[name]
    return sub.add_parser(
        name, help=summary, description=f"{summary}\n\n{description}", formatter_class=_Formatter, parents=[common]
    )


def _library_defaults(p: argparse.ArgumentParser, func: Callable[..., Any], names: Sequence[str]) -> None:
    """Give the options of ``names`` the defaults of ``func``'s parameters, so help and behaviour follow the API."""
    params = inspect.signature(func).parameters
    p.set_defaults(**{n: params[n].default for n in names})


def _add_path(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("path", metavar="PATH", help=f"SpatialData zarr store (a `.zarr` folder) {what}.")


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _subparser(
        sub,
        common,
        "demo",
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
    )
    p.add_argument(
        "--dataset",
        choices=["synthetic", "merfish"],
        help="'synthetic': a seeded synthetic Xenium slide with H&E (3000 × 3000 µm, nothing to download); 'merfish': "
        "the real Vizgen MERFISH mouse brain crop (500 × 450 µm, DAPI/PolyT; downloaded into the cache, or read "
        "from $DIFFST_DATA_DIR), prepared at 25 µm LR → 5 µm HR on 100 µm tiles.",
    )
    p.add_argument("--out", help="Output folder (created if needed).")
    p.add_argument(
        "--quick", action="store_true", help="A smaller run (tiny preset, few steps, 1 sample) for a first look or CI."
    )
    p.add_argument("--seed", type=int, help="Seed of the synthetic tissue, the split, training and sampling.")
    p.add_argument(
        "--overwrite", action="store_true", help="Replace the results of an earlier demo in --out (default: refuse)."
    )
    from ._demo import run_demo

    _library_defaults(p, run_demo, DEMO_ARGS)
    p.set_defaults(func=_cmd_demo)


def _add_prepare(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _subparser(
        sub,
        common,
        "prepare",
        "Works on transcripts (Xenium, MERFISH, CosMx), spots (Visium, ST) and Visium HD bins with an H&E or "
        "fluorescence image. Writes into the store, under --key-added (default 'diffst'):\n"
        "  images['diffst_lr']       LR counts per LR pixel (channels = genes)\n"
        "  images['diffst_lr_mask']  observed fraction of each LR pixel\n"
        "  images['diffst_hr']       HR counts per HR pixel, the truth (transcripts and bins only)\n"
        "  labels['diffst_tissue']   tissue mask on the LR grid\n"
        "  shapes['diffst_tiles']    tile squares with a `split` column (train / val / test)\n"
        "  shapes['diffst_spots']    the spots defining the LR pixels (spot data, --degradation visium)\n"
        "  attrs['diffst']           units, grid, genes, normalisation, co-expression",
    )
    _add_path(p, "with an image and one measurement (transcripts, spots or bins)")
    p.add_argument(
        "--genes",
        type=_genes_or_count,
        metavar="N|G1,G2,…",
        help="Number of genes to select (top N by --gene-selection, control probes excluded) or a comma-separated "
        "list of gene names.",
    )
    p.add_argument(
        "--scale",
        type=_positive_int,
        help="Super-resolution factor: HR pixels are lr_um / scale µm (10: 100 µm → 10 µm).",
    )
    p.add_argument("--lr-um", type=_positive_float, help="LR pixel size in µm (100 for Visium-scale spots).")
    p.add_argument(
        "--degradation",
        choices=["bin", "visium"],
        help="How LR arises from HR when the data have HR (transcripts, bins): 'bin' sums scale × scale HR pixels (the "
        "paper's setting); 'visium' measures 55 µm-diameter (0.55 · pitch) discs on a hexagonal lattice of pitch "
        "lr_um, like a Visium slide. Ignored for spot data, whose LR is the measured spots.",
    )
    p.add_argument(
        "--image-key",
        help="The tissue image element; needed when there are several (default: the only one; for Visium the finest "
        "of full/hires/lowres).",
    )
    p.add_argument(
        "--points-key", help="Transcripts (points with a gene column); needed when there are several points elements."
    )
    p.add_argument(
        "--table-key",
        help="Spot or bin counts table (Visium: 'table'; Visium HD: 'square_002um' …). Setting it chooses spots/bins "
        "over transcripts.",
    )
    p.add_argument(
        "--coordinate-system",
        help="Coordinate system shared by the image and the measurement (default: the only shared one, 'global' "
        "preferred).",
    )
    p.add_argument(
        "--tile-um",
        type=_positive_float,
        help="Tile side in µm, a multiple of --lr-um; training and evaluation use these tiles (default: 400 µm, or four "
        "spot pitches where the spots are sparser, e.g. 800 µm on the ST array; the tiny preset is designed for 160 µm).",
    )
    p.add_argument("--min-tissue", type=float, help="Minimum tissue fraction of a kept tile, in [0, 1].")
    p.add_argument(
        "--split",
        type=_split_shares,
        metavar="TRAIN,VAL,TEST",
        help="Shares of tiles for train, validation and test, comma-separated (default: 0.7,0.15,0.15).",
    )
    p.add_argument(
        "--split-block-um",
        type=_positive_float,
        help="Side in µm of the square blocks of tiles that go whole to one split, so neighbouring tiles do not leak "
        "across splits (default: 2 × tile_um).",
    )
    p.add_argument(
        "--gene-selection",
        choices=["spatially_variable", "highly_expressed"],
        help="How --genes N picks genes: Moran's I of the LR maps, or total counts; genes must be detected in at least "
        "5 %% of tissue LR pixels.",
    )
    p.add_argument("--layer", help="Table layer with raw counts (spots/bins) when X is not raw (default: X).")
    p.add_argument(
        "--bin-size",
        type=int,
        help="Visium HD bin size in µm to build HR from (default: the largest one dividing lr_um / scale).",
    )
    p.add_argument(
        "--um-per-px",
        type=_positive_float,
        help="µm per unit of the coordinate system, overriding the value derived from the data (which is reported).",
    )
    p.add_argument(
        "--spot-diameter-um",
        type=_positive_float,
        help="Spot diameter in µm, for spot data (default: table.uns['spot_diameter_um'] or 55 µm) and for "
        "--degradation visium (default: 0.55 × pitch).",
    )
    p.add_argument(
        "--spot-pitch-um",
        type=_positive_float,
        help="Lattice pitch in µm for --degradation visium (default: lr_um); for spot data, the array's "
        "centre-to-centre distance (default: 100 µm Visium, 200 µm ST, from the array coordinates).",
    )
    p.add_argument(
        "--region",
        help="For a table annotating several regions: the shapes element of the spots or bins to use (default: the "
        "one sharing a coordinate system with the image).",
    )
    p.add_argument(
        "--image-kind",
        choices=["rgb", "fluorescence"],
        help="Brightfield H&E ('rgb') or fluorescence, overriding what is decided from the pixels.",
    )
    p.add_argument("--seed", type=int, help="Seed of the train/val/test split.")
    p.add_argument("--key-added", help="Prefix of the new elements and key of the store's attrs.")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace existing elements of the same names (default: an existing key is an error).",
    )
    from .pp import prepare

    _library_defaults(p, prepare, PREPARE_ARGS)
    p.set_defaults(func=_cmd_prepare)


def _add_train(sub: Any, common: argparse.ArgumentParser) -> None:
    from .tl import train
    from .tl._train import DEFAULT_STEPS, PAPER_EPOCHS

    p = _subparser(
        sub,
        common,
        "train",
        "Learns from HR truth (transcripts, Visium HD bins) or, on a spot slide alone (Visium, ST), from the spots: "
        "hidden spots predicted from the image and the other spots. Prints a progress line every 30 s (step, loss, validation "
        "PCC, time left), stops early when the validation PCC stops improving or when --time-budget runs out, writes "
        "a checkpoint at least every minute and on Ctrl-C (then says how to resume with --resume), and saves the "
        "model (EMA weights) as <run folder>/model.pt. Its path is recorded in the store's attrs[KEY]['model'], "
        "where `diffst super-resolve` finds it. Each run starts afresh in its own folder unless --resume.",
    )
    _add_path(p, "prepared with `diffst prepare`")
    p.add_argument("--key", help="The --key-added used in `diffst prepare`.")
    p.add_argument(
        "--preset",
        choices=["default", "paper", "tiny"],
        help="Model size: 'default' (400 µm tiles of 10 µm HR pixels; trains on a laptop CPU in minutes), 'paper' "
        "(the paper's Table 3 on 2500 µm tiles; needs a GPU) or 'tiny' (160 µm tiles; tests).",
    )
    p.add_argument(
        "--max-epochs",
        type=_positive_int,
        help=f"Number of epochs (default: about {DEFAULT_STEPS['default']} optimiser steps for 'default', "
        f"{DEFAULT_STEPS['tiny']} steps for 'tiny', {PAPER_EPOCHS} epochs for 'paper'; early stopping may end sooner).",
    )
    p.add_argument("--batch-size", type=_positive_int, help="Tiles per optimiser step (default: the preset's).")
    p.add_argument(
        "--accelerator",
        help="Lightning accelerator: 'auto' (a CUDA GPU, then MPS, else CPU), 'cpu', 'gpu', 'mps'.",
    )
    p.add_argument(
        "--devices",
        type=_devices,
        help="Number of devices, a comma-separated list of device indices, or 'auto'; several train with DDP.",
    )
    p.add_argument("--seed", type=int, help="Seed of weights, batches, noise and augmentation (same seed, same model).")
    p.add_argument(
        "--checkpoint-dir",
        help="Where checkpoints, logs and model.pt go (default: a new run-<time>/ folder beside the store, under "
        "<PATH>.diffst/<key>-<data fingerprint>-<config hash>/).",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=_resume,
        metavar="auto",
        help="Continue the latest run of these data, configuration and seed (or the one in --checkpoint-dir) from "
        "its last checkpoint; an error when there is none. '--resume auto': continue one if there is one, else start "
        "afresh. Without it every run starts afresh.",
    )
    p.add_argument(
        "--time-budget",
        type=_budget,
        metavar="SECONDS|none",
        help="Training time limit in seconds, over all sessions of a resumed run; 'none' for none.",
    )
    p.add_argument(
        "--no-guard",
        dest="guard",
        action="store_false",
        help="Skip the guard (the check against bicubic and the image floor on validation, and its per-gene blend).",
    )
    p.add_argument(
        "--supervision",
        choices=["auto", "hr", "lr"],
        help="'hr': learn from HR truth; 'lr': learn from the LR spots alone (never reading HR truth, even where "
        "there is some); 'auto': 'hr' when the data have HR truth, else 'lr'.",
    )
    p.add_argument(
        "--image-encoder",
        metavar="learned|stain|timm:MODEL",
        help="Where the tissue-level image features come from: the model's own encoder ('learned'), the weight-free "
        "stain and texture features ('stain') or a timm model ('timm:<name>'), computed once per slide and stored.",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="Start afresh even if --checkpoint-dir holds an earlier run."
    )
    p.add_argument(
        "--config",
        type=_json_object,
        metavar="JSON",
        help="Overrides of the preset's DiffSTConfig fields as a JSON object, e.g. '{\"cam\": false}' or "
        "'{\"learning_rate\": 5e-4}'.",
    )
    p.add_argument(
        "--patience",
        type=_positive_int,
        help="Validation checks (about every 50 optimiser steps) without improvement of the validation PCC before "
        "stopping early.",
    )
    p.add_argument(
        "--val-steps", type=_positive_int, help="Sampler steps of the validation PCC (of fast-sampled maps)."
    )
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes.")
    _library_defaults(p, train, TRAIN_ARGS)
    p.set_defaults(func=_cmd_train)


def _add_super_resolve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _subparser(
        sub,
        common,
        "super-resolve",
        "Covers the tissue with overlapping model windows, samples each, blends the seams and, with --n-samples > 1, "
        "also gives the per-pixel standard deviation. Writes into the store:\n"
        "  images['diffst_sr']      the SR map on the HR grid (pixels of lr_um / scale µm; channels = genes; --units), "
        "aligned to the image\n"
        "  images['diffst_sr_std']  per-pixel standard deviation over samples (only with --n-samples > 1)\n"
        "  attrs['diffst_sr']       sampler, steps, seed, model path …\n"
        "(names follow --key-added). A store that was not prepared is prepared with the model's genes and units.",
    )
    _add_path(p, "with the tissue image (prepared, or raw)")
    p.add_argument(
        "--model",
        help="A saved model (model.pt, or the folder holding it). Default: the model `diffst train` recorded in the "
        "store; if there is none, one is trained with the defaults first.",
    )
    p.add_argument(
        "--genes",
        type=_gene_list,
        metavar="G1,G2,…",
        help="Comma-separated genes to write (default: all the model's genes; the model predicts them jointly).",
    )
    p.add_argument("--key", help="Key of the prepared data (--key-added of `diffst prepare`).")
    p.add_argument(
        "--sampler",
        choices=["fast", "ddim", "dpmsolver", "ddpm"],
        help="'fast' (the model's fast sampler, DPM-Solver++), 'ddim', 'dpmsolver' or 'ddpm' (1000 ancestral steps as "
        "in the paper; slow).",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        help="Sampler steps (default: the model's, 20 for the default preset's fast sampler).",
    )
    p.add_argument(
        "--n-samples",
        type=_positive_int,
        help="Samples per pixel; more than one also writes images['<key-added>_std'].",
    )
    p.add_argument(
        "--no-consistency",
        dest="consistency",
        action="store_false",
        help="Do not rescale samples so that re-degrading them reproduces the observed LR counts exactly (default: "
        "enforced).",
    )
    p.add_argument(
        "--tile-overlap",
        type=float,
        help="Overlap of neighbouring model windows as a fraction of the window, in [0, 1).",
    )
    p.add_argument("--batch-size", type=_positive_int, help="Model windows per network call.")
    p.add_argument("--seed", type=int, help="Same seed, same map (on the same device).")
    p.add_argument(
        "--units",
        choices=["counts", "log1p"],
        help="'counts': expected counts per HR pixel (re-binning compares with LR counts); 'log1p': log1p of them.",
    )
    p.add_argument("--key-added", help="Name of the result element (and of its attrs).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing result of that name.")
    p.add_argument(
        "--block-lr",
        type=_positive_int,
        help="Output chunk side in LR pixels (of lr_um µm each); memory per chunk grows with its square.",
    )
    from .tl import super_resolve

    _library_defaults(p, super_resolve, SUPER_RESOLVE_ARGS)
    p.set_defaults(func=_cmd_super_resolve)


def _add_upsample(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _subparser(
        sub,
        common,
        "upsample",
        "'bicubic' and 'nearest' interpolate the LR counts; 'image' is the training-free image floor (bicubic weighted "
        "by the nuclear stain of the tissue image, kept consistent with every LR pixel). Writes images['<key-added>'] "
        "(default '<method>_sr', e.g. 'bicubic_sr') on the HR grid, which `diffst evaluate` and `diffst plot` read.",
    )
    _add_path(p, "prepared with `diffst prepare`")
    p.add_argument("--key", help="Key of the prepared data (--key-added of `diffst prepare`).")
    p.add_argument("--method", choices=["bicubic", "nearest", "image"], help="The up-sampling.")
    p.add_argument("--key-added", help="Name of the result element (default: '<method>_sr', 'image_floor_sr').")
    p.add_argument(
        "--units",
        choices=["counts", "log1p"],
        help="'counts': expected counts per HR pixel; 'log1p': log1p of them.",
    )
    p.add_argument(
        "--consistency",
        action=argparse.BooleanOptionalAction,
        help="Rescale so that re-degrading reproduces the LR counts (default: on for 'image', off otherwise).",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace an existing result of that name.")
    from .tl import upsample

    _library_defaults(p, upsample, UPSAMPLE_ARGS)
    p.set_defaults(func=_cmd_upsample)


def _add_plot(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _subparser(
        sub,
        common,
        "plot",
        "One row per gene, over the same region of the slide in µm (by default a test tile). Writes the figure to "
        "--output (PNG, PDF or SVG by its suffix).",
    )
    _add_path(p, "with an SR result (`diffst super-resolve` or `diffst upsample`)")
    p.add_argument(
        "--genes",
        type=_gene_list,
        metavar="G1,G2,…",
        help="Comma-separated genes, one row each (default: the first three of the result).",
    )
    p.add_argument("--key", help="The SR result to draw: images[KEY] (e.g. 'diffst_sr', 'bicubic_sr').")
    p.add_argument(
        "--region",
        type=_region,
        metavar="X0,Y0,X1,Y1",
        help="The region in µm of the prepared coordinate system (default: one tile of --split).",
    )
    p.add_argument("--tile", type=int, help="Draw this tile of the prepared tiles (its index).")
    p.add_argument("--split", choices=["test", "val", "train"], help="Draw the first tile of this split.")
    p.add_argument("--units", choices=["counts", "log1p"], help="Colour scale of the maps.")
    p.add_argument("--show-image", action=argparse.BooleanOptionalAction, help="Draw the tissue image under the maps.")
    p.add_argument("--panel-size", type=_positive_float, help="Size of each panel in inches.")
    p.add_argument("--output", "-o", metavar="FILE", default="gene_maps.png", help="The figure file.")
    p.add_argument("--dpi", type=_positive_int, default=150, help="Resolution of a raster figure.")
    from .pl import gene_maps

    _library_defaults(p, gene_maps, PLOT_ARGS)
    p.set_defaults(func=_cmd_plot, genes=None)


def _add_evaluate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = _subparser(
        sub,
        common,
        "evaluate",
        "Scores the SR map on the prepared HR grid (pixels of hr_um = lr_um / scale µm, e.g. 10 µm) against the HR "
        "truth, per gene, averaged over the tiles of --split, on the normalised scale x = 2·log1p(counts)/s_g − 1: signed "
        "Pearson r (pcc), rmse, ssim; lr_consistency Σ|D(SR) − LR| / Σ LR in counts; and the paper-compatible "
        "paper_pcc, paper_rmse (per-tile min-max scaled, |r|; they flatter every method). Any SR result is scored "
        "the same way (Diff-ST or a baseline written by dst.tl.upsample). Prints the table (genes, then their mean) "
        "and writes it to --output; the store is not changed. Without HR truth (spot data) only lr_consistency is "
        "computed.",
    )
    _add_path(p, "with an SR result")
    p.add_argument(
        "--key",
        help="The SR result: images[KEY] with attrs[KEY] (e.g. 'diffst_sr', 'bicubic_sr').",
    )
    p.add_argument(
        "--truth-key",
        help="An image on the same HR grid with counts per HR pixel (genes as channels) to use as truth (default: the "
        "prepared HR counts images['<prepared key>_hr']).",
    )
    p.add_argument("--split", choices=["test", "val", "train"], help="Which tiles to score.")
    p.add_argument(
        "--genes",
        type=_gene_list,
        metavar="G1,G2,…",
        help="Comma-separated genes to score (default: all genes of the SR result).",
    )
    p.add_argument("--output", "-o", metavar="CSV", help="CSV file for the table (default: print only).")
    from .tl import evaluate

    _library_defaults(p, evaluate, EVALUATE_ARGS)
    p.set_defaults(func=_cmd_evaluate)


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


def _kwargs(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names}


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(**_kwargs(args, DEMO_ARGS))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .pp import prepare

    sdata = _read(args.path)
    prepare(sdata, **_kwargs(args, PREPARE_ARGS))
    from ._contract import read_record

    written = read_record(sdata, args.key_added).elements
    print(f"wrote {', '.join(sorted(written.values()))} and attrs[{args.key_added!r}] to {args.path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .tl import train

    sdata = _read(args.path)
    kwargs = _kwargs(args, TRAIN_ARGS)
    if args.checkpoint_dir is not None:
        # the store records the model's path: an absolute one still holds when the store is used from elsewhere
        kwargs["checkpoint_dir"] = Path(args.checkpoint_dir).expanduser().resolve()
    model = train(sdata, **kwargs)
    print(f"model saved to {model.path} (recorded in attrs[{args.key!r}]['model'] of {args.path})")
    return 0


def _cmd_super_resolve(args: argparse.Namespace) -> int:
    from .tl import super_resolve

    sdata = _read(args.path)
    super_resolve(sdata, args.model, **_kwargs(args, SUPER_RESOLVE_ARGS))
    written = [args.key_added] + ([f"{args.key_added}_std"] if args.n_samples > 1 else [])
    print(f"wrote {', '.join(f'images[{w!r}]' for w in written)} and attrs[{args.key_added!r}] to {args.path}")
    return 0


def _cmd_upsample(args: argparse.Namespace) -> int:
    from .tl import upsample

    sdata = _read(args.path)
    kwargs = _kwargs(args, UPSAMPLE_ARGS)
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


def _cmd_plot(args: argparse.Namespace) -> int:
    output = _output_file(args.output)
    import matplotlib

    matplotlib.use("Agg")
    from .pl import gene_maps

    sdata = _read(args.path)
    fig = gene_maps(sdata, args.genes, **_kwargs(args, PLOT_ARGS))
    fig.savefig(output, dpi=args.dpi, bbox_inches="tight")
    print(f"wrote {output}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .tl import evaluate

    output = _output_file(args.output)
    sdata = _read(args.path)
    df = evaluate(sdata, **_kwargs(args, EVALUATE_ARGS))
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(f"{args.key} ({df.attrs.get('method')}) on the {args.split} tiles:")
        print(df)
    if output is not None:
        df.to_csv(output)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
