"""The notebooks in ``notebooks/`` run top to bottom (nbclient, the ``python3`` kernel of this Python)
so they never go stale. Each writes only into a temporary folder (``SANE_NOTEBOOK_DIR``)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_bring_your_own_models.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code, path.name
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} holds outputs"


def test_kernel_is_this_python_with_this_checkout(tmp_path):
    """The notebooks' ``python3`` kernel runs this interpreter and imports this checkout's sane_hf."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys, sane_hf\nprint(sys.executable, sane_hf.__file__)")])
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    executable, package = nb.cells[0].outputs[0]["text"].split()
    assert executable == sys.executable
    assert Path(package).resolve() == ROOT / "sane_hf" / "__init__.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("SANE_NOTEBOOK_DIR", str(work))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert work.is_dir() and any(work.iterdir())
    # nothing written next to the notebook or into the repository
    assert {p.name for p in tmp_path.iterdir()} <= {"work", "hf_datasets_cache", "hf_modules"}
    assert sorted(p.name for p in path.parent.iterdir()) == [p.name for p in NOTEBOOKS]
