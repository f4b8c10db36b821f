"""``python -m sparse_compile show`` and ``demo``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparse_compile.cli import main


def test_show_prints_picture_and_densities(capsys):
    assert main(["show", "causal & sliding(64)", "--length", "512"]) == 0
    out = capsys.readouterr().out
    assert "causal & sliding(64)" in out and "density        0.1173" in out
    assert "block density  0.4375" in out and "#" in out


def test_show_bad_pattern_exits_2(capsys):
    assert main(["show", "casual"]) == 2
    assert "did you mean 'causal'" in capsys.readouterr().err


def test_draw_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    assert main(["show", "heads(causal, strided(4))", "--length", "100", "--keys", "80",
                 "--block", "16", "-o", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "sparse_compile", "show", "local(8)",
                           "--length", "32"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "local(8)" in done.stdout


def test_demo_compiles_a_llama_checks_it_and_times_it(capsys):
    pytest.importorskip("transformers")
    status = main(["demo", "--device", "cpu", "--length", "96", "--window", "16", "--layers", "1",
                   "--hidden", "64", "--heads", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert status == 0
    assert "model.layers.0.self_attn" in out and "1 rewritten" in out
    assert "causal & sliding(16)" in out and "OK" in out and "speed-up" in out
    assert "CPU (no GPU found)" in out
