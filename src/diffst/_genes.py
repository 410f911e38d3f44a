"""Gene names a user asks for, checked in one place with one exception type."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ._spatial import suggest


class GeneError(KeyError, ValueError):
    """Requested genes that are not there, or an empty or repeated list of genes.

    Both a :class:`KeyError` (a name that is not there) and a :class:`ValueError` (a bad argument), so code that
    catches either keeps working; its message is shown as written (a plain ``KeyError`` shows its repr).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def resolve_genes(
    genes: str | Sequence[str] | None,
    available: Sequence[str],
    *,
    unknown: Callable[[list[str]], str],
    default: Sequence[str] | None = None,
    empty: str = "or None for all of them",
) -> list[str]:
    """The requested genes as a list, in the order asked, after checking them against ``available``.

    Parameters
    ----------
    genes
        A gene name, names, or ``None`` for ``default`` (all of ``available`` when ``default`` is ``None``).
    available
        The genes there are.
    unknown
        The start of the message for genes that are not there, from their list; a line per gene with its closest
        matches follows.
    default
        What ``None`` means.
    empty
        The end of the message for an empty list (what else may be passed).

    Raises
    ------
    GeneError
        An empty list, a gene named twice, or genes not in ``available``.

    """
    if genes is None:
        return list(available if default is None else default)
    want = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not want:
        msg = f"`genes` is empty; pass gene names, {empty}."
        raise GeneError(msg)
    twice = sorted({g for g in want if want.count(g) > 1})
    if twice:
        msg = f"`genes` lists {twice} more than once."
        raise GeneError(msg)
    known = set(available)
    missing = [g for g in want if g not in known]
    if missing:
        names = list(available)
        hints = "".join(f"\n  {g!r}:{suggest(g, names) or ' no close match'}" for g in missing[:10])
        raise GeneError(unknown(missing) + hints)
    return want
