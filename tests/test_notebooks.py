"""Every notebook runs top to bottom on CPU (the tutorial is also a test of the public API)."""

from pathlib import Path

import pytest

from conftest import ORGANISM_READY

_HOW = ("the notebook tests need Jupyter, which the lean 'dev' extra leaves out: "
        "python3 -m pip install -e \".[dev,notebooks]\" (CI installs it)")
nbformat = pytest.importorskip("nbformat", reason=_HOW)
NotebookClient = pytest.importorskip("nbclient", reason=_HOW).NotebookClient
pytest.importorskip("ipykernel", reason=_HOW)

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_all_five_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_quickstart.ipynb", "02_compare_methods.ipynb", "03_ablation_study.ipynb",
                     "04_real_checkpoint.ipynb", "05_information_flow.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    if not ORGANISM_READY and "mech_vqa.organism" in "".join(c.source for c in book.cells if c.cell_type == "code"):
        pytest.skip("needs the organism checkpoint")
    for cell in book.cells:
        assert not cell.get("outputs"), f"{path.name} is committed with outputs; strip them"
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   extra_arguments=["--HistoryManager.enabled=False"]).execute()
    errors = [o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
