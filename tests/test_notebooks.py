"""Every notebook under notebooks/ runs top to bottom on a real Jupyter kernel (nbclient + ipykernel).

Each notebook has a whole-notebook time budget: every cell gets the time left of it, so a stuck
notebook fails instead of hanging. Cells tagged ``shows-image`` must display a picture (image/png),
and no cell may print a progress bar.
"""

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Seconds per notebook, start to finish (each runs in about 1-2 minutes on 2 idle CPU cores).
BUDGET_S = {"01_quickstart.ipynb": 600, "02_your_data.ipynb": 900, "03_guards_and_probes.ipynb": 900}
IMAGE_TAG = "shows-image"
# tqdm's text bar ("12/40 [00:03<00:07, 4.1it/s]") and its Jupyter widget.
PROGRESS_TEXT = re.compile(r"\d+/\d+ \[\d+:\d+|it/s\]|s/it\]")
WIDGET = "application/vnd.jupyter.widget-view+json"


def _code_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code"]


def _texts(output):
    """Every text an output carries (stream text, plain-text reprs, tracebacks)."""
    if output.output_type == "stream":
        return [output.text]
    if output.output_type == "error":
        return ["\n".join(output.traceback)]
    return [str(output.get("data", {}).get("text/plain", ""))]


def test_notebooks_exist_with_budgets_and_no_committed_outputs():
    assert [p.name for p in NOTEBOOKS] == sorted(BUDGET_S)
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        cells = _code_cells(notebook)
        assert cells, path.name
        assert all(not c.outputs and c.execution_count is None for c in cells), f"strip the outputs of {path.name}"
        assert any(IMAGE_TAG in c.metadata.get("tags", []) for c in cells), f"{path.name} shows no picture"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_a_kernel(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + BUDGET_S[path.name]
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
    )
    # The kernel inherits the test environment (offline hub, temp caches) but not the switch that turns
    # progress bars off: quieting them is the notebook's job.
    env = {k: v for k, v in os.environ.items() if k != "SAFETYPAIRS_NO_PROGRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    client.execute(env=env)  # raises CellExecutionError (with the cell and traceback) when a cell fails

    for index, cell in enumerate(_code_cells(notebook)):
        kinds = {kind for output in cell.outputs for kind in output.get("data", {})}
        if IMAGE_TAG in cell.metadata.get("tags", []):
            assert "image/png" in kinds, f"{path.name} code cell {index} shows no image: {sorted(kinds)}"
        assert WIDGET not in kinds, f"{path.name} code cell {index} shows a progress widget"
        for text in (t for output in cell.outputs for t in _texts(output)):
            assert not PROGRESS_TEXT.search(text), f"{path.name} code cell {index} prints a progress bar: {text[-300:]}"
