"""One check of requested genes, one exception type (a KeyError and a ValueError at once), everywhere."""

from __future__ import annotations

import pytest

import diffst as dst
from diffst._genes import GeneError, resolve_genes
from diffst.tl._data import Prepared

from .models import untrained
from .toy import toy_xenium

pytestmark = pytest.mark.usefixtures("quiet")


def test_resolve_genes_checks_once_and_raises_one_type():
    avail = ["CD3E", "CD4", "EPCAM"]
    assert resolve_genes(None, avail, unknown=str) == avail
    assert resolve_genes(None, avail, unknown=str, default=avail[:1]) == ["CD3E"]
    assert resolve_genes("CD4", avail, unknown=str) == ["CD4"]
    with pytest.raises(GeneError) as info:
        resolve_genes(["CD4", "CD3"], avail, unknown=lambda m: f"{m} are not here:")
    e = info.value
    assert isinstance(e, KeyError) and isinstance(e, ValueError)
    assert str(e) == "['CD3'] are not here:\n  'CD3': Did you mean 'CD3E', 'CD4'?"
    with pytest.raises(GeneError, match="`genes` is empty; pass gene names, or None"):
        resolve_genes([], avail, unknown=str, empty="or None")
    with pytest.raises(GeneError, match=r"lists \['CD4'\] more than once"):
        resolve_genes(["CD4", "CD4"], avail, unknown=str)


@pytest.fixture(scope="module")
def with_result():
    sdata = toy_xenium(size_um=800, n=60_000, seed=0)
    dst.settings.verbosity, before = 0, dst.settings.verbosity
    dst.pp.prepare(sdata, genes=5, lr_um=40, scale=4, tile_um=160)
    dst.tl.upsample(sdata, method="bicubic")
    dst.settings.verbosity = before
    return sdata, untrained(Prepared.from_sdata(sdata, "diffst"))


CALLS = {
    "pp.prepare": lambda s, m: dst.pp.prepare(s, genes=["G1", "NOPE"], lr_um=40, scale=4, tile_um=160, key_added="x"),
    "tl.super_resolve": lambda s, m: dst.tl.super_resolve(s, model=m, genes=["NOPE"], inplace=False),
    "tl.evaluate": lambda s, m: dst.tl.evaluate(s, key="bicubic_sr", genes=["NOPE"]),
    "get.pixels": lambda s, m: dst.get.pixels(s, key="bicubic_sr", genes=["NOPE"]),
    "pl.gene_maps": lambda s, m: dst.pl.gene_maps(s, genes=["NOPE"], key="bicubic_sr"),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_every_public_function_raises_gene_error_for_an_unknown_gene(with_result, call):
    sdata, model = with_result
    with pytest.raises(GeneError, match="'NOPE'"):
        CALLS[call](sdata, model)
