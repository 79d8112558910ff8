"""The example notebooks are committed executed: valid, run top to bottom, error-free and small.

The notebooks are NOT re-executed here (they train models for minutes); re-run them as described in
notebooks/README.md after changing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_quickstart.ipynb", "02_missing_labels.ipynb", "03_loss_functions.ipynb"}
MAX_BYTES = 1_000_000
# prefix of the temporary run directories the notebooks create; it must never show up in outputs
TMP_PREFIX = "mlcl_nb"


def _code_cells(path: Path) -> list:
    nb = nbformat.read(path, as_version=4)
    return [c for c in nb.cells if c.cell_type == "code"]


def _output_text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type in ("display_data", "execute_result"):
        data = output.get("data", {})
        return "\n".join(str(data.get(k, "")) for k in ("text/plain", "text/markdown", "text/html"))
    return ""


def test_expected_notebooks_exist():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}, f"found {[p.name for p in NOTEBOOKS]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_valid_nbformat(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)  # raises ValidationError
    assert nb.nbformat == 4
    assert nb.metadata.get("kernelspec", {}).get("language") == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_executed_in_order(path: Path):
    cells = _code_cells(path)
    assert cells, "no code cells"
    counts = [c.execution_count for c in cells]
    unexecuted = [i for i, n in enumerate(counts) if n is None]
    assert not unexecuted, f"unexecuted code cells at positions {unexecuted}"
    # one top-to-bottom run in a fresh kernel numbers the cells 1..n
    assert counts == list(range(1, len(cells) + 1)), counts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_error_outputs(path: Path):
    for i, cell in enumerate(_code_cells(path)):
        for out in cell.outputs:
            assert out.output_type != "error", f"code cell {i}: {out.get('ename')}: {out.get('evalue')}"
            if out.output_type == "stream" and out.name == "stderr":
                assert "Traceback" not in out.text, f"code cell {i} printed a traceback"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_present_small_and_machine_independent(path: Path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    cells = _code_cells(path)
    assert any(c.outputs for c in cells), "no outputs saved"
    for i, cell in enumerate(cells):
        for out in cell.outputs:
            assert TMP_PREFIX not in _output_text(out), f"code cell {i} shows a temporary run directory"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_from_any_working_directory(path: Path):
    """No cell looks for the repository from the working directory (the package finds its own configs
    and project root), so a notebook started anywhere runs."""
    code = "\n".join(c.source for c in _code_cells(path))
    assert "Path.cwd()" not in code and "os.getcwd()" not in code and "os.chdir" not in code
    assert "cwd=REPO" not in code
