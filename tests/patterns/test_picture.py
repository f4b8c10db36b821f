"""Text and PNG pictures."""

from __future__ import annotations

import pytest
import sparse_compile.patterns as P


def test_show_small_is_the_exact_mask(capsys):
    text = P.causal.show(4, 4, width=4)
    rows = text.splitlines()[-4:]
    assert rows == ["  #...", "  ##..", "  ###.", "  ####"]
    assert "density        0.6250" in capsys.readouterr().out


def test_show_long_sequence_is_bounded():
    text = (P.causal & P.sliding(4096)).show(1 << 20, width=32)
    assert len(text.splitlines()) < 40


def test_draw(tmp_path):
    pytest.importorskip("matplotlib")
    P.parse("causal | sink(8)").draw(str(tmp_path / "x.png"), 96, block_m=32)
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_dynamic_has_no_picture():
    with pytest.raises(P.PatternError, match="dynamic"):
        P.dma(8).show(16)
