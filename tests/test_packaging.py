"""The package installs under one name, registers its backend, and CI runs the README's tests."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sparse_compile

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("generic_name", ["patterns", "codegen"])
def test_no_generic_top_level_modules(generic_name: str, tmp_path: Path) -> None:
    # Run outside the checkout: the repository root itself is on sys.path when testing from it.
    probe = f"import importlib.util; print(importlib.util.find_spec({generic_name!r}))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "None"


def test_subpackages_live_under_sparse_compile() -> None:
    patterns = importlib.import_module("sparse_compile.patterns")
    codegen = importlib.import_module("sparse_compile.codegen")
    assert Path(patterns.__file__).parent == ROOT / "patterns"
    assert Path(codegen.__file__).parent == ROOT / "codegen"


def test_backend_entry_point_is_registered() -> None:
    entry_points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    sparse = [ep for ep in entry_points if ep.name == "sparse"]
    assert len(sparse) == 1
    assert sparse[0].value == "sparse_compile.backend:sparse_backend"


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        sparse_compile.no_such_name  # noqa: B018


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match, "README.md must mark its test command with <!-- test-command -->"
    command = match.group(1).strip()
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert command in ci_script


def test_global_is_an_alias_of_global_() -> None:
    assert getattr(sparse_compile, "global") is sparse_compile.global_


def test_readme_main_command_runs_the_demo() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- main-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match, "README.md must mark its main command with <!-- main-command -->"
    assert match.group(1).strip().endswith("python -m sparse_compile demo")
