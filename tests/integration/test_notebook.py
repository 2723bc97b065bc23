"""``notebooks/01_quickstart.ipynb`` runs top to bottom at tiny size, is committed without outputs, and is what
``make notebooks`` builds from its jupytext source ``notebooks/01_quickstart.py``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "notebooks" / "01_quickstart.py"
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"
# appended to the `parameters` cell (papermill-style): later assignments win
TINY_PARAMETERS = (
    '\n\n# injected by tests/integration/test_notebook.py\nTINY = True\nTHREADS = 1\nOUT_DIR = "quickstart_out"\n'
)


def parameters_cells(nb) -> list:
    return [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]


def cell_text(cell) -> str:
    """Everything a code cell printed (streams and text/plain results)."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def cell_inputs(nb) -> list[tuple[str, str, list[str]]]:
    """What the script determines of each cell: its type, its source and its tags."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed at tiny size in a fresh working directory: (notebook, working directory)."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters_cells(nb)[0].source += TINY_PARAMETERS
    workdir = tmp_path_factory.mktemp("quickstart")
    # a kernel spec that runs this interpreter (the one with kdpipe), found before any user-installed one
    kernels = tmp_path_factory.mktemp("jupyter") / "kernels" / "kdpipe-test"
    kernels.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernels / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "kdpipe", "language": "python"}))
    client = NotebookClient(nb, timeout=300, kernel_name="kdpipe-test", resources={"metadata": {"path": str(workdir)}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(kernels.parents[1]))
        client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails
    return nb, workdir


def test_quickstart_runs_at_tiny_size(executed):
    nb, workdir = executed
    out = workdir / "quickstart_out"
    # the teacher store: finished (manifest), readable, and covering the training examples
    stores = list((out / "stores").glob("reasoning-train-k8-*"))
    assert len(stores) == 1, stores
    manifest = json.loads((stores[0] / "manifest.json").read_text())
    assert manifest["k"] == 8 and manifest["num_examples"] > 0 and manifest["total_rows"] > 0
    # the KD run logged its diagnostics and the notebook plotted them
    metrics = (out / "student_kd" / "version_0" / "metrics.csv").read_text()
    for name in ("kd/top1_agreement", "kd/teacher_topk_mass", "kd/divergence_L1", "train/divergence"):
        assert name in metrics, name
    assert (out / "kd_diagnostics.png").stat().st_size > 1000
    assert (out / "teacher_sft" / "version_0" / "metrics.csv").exists()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # label mask, curriculum plan, KD diagnostics, accuracy per level
    text = "\n".join(cell_text(c) for c in code)
    assert "TINY run, 1 torch threads" in text
    assert str(stores[0]) in text
    # the stored top-k plus the tail bin of one position is a distribution
    total = float(re.search(r"top-k \+ tail = ([0-9.]+)", text).group(1))
    assert total == pytest.approx(1.0, abs=0.02)
    for name in ("teacher", "student (KD)"):
        assert re.search(rf"{re.escape(name)}: accuracy [0-9.]+%", text), name


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], cell.id
        assert cell.execution_count is None, cell.id
    # one parameters cell, and it is the first code cell (every size comes from it)
    assert parameters_cells(nb) == [code[0]]
    assert "TINY = False" in code[0].source


def test_committed_notebook_is_what_make_notebooks_builds():
    """The committed ``.ipynb`` has the cells jupytext builds from the script: a stale notebook fails."""
    built = jupytext.read(SCRIPT)
    committed = nbformat.read(NOTEBOOK, as_version=4)
    expected, actual = cell_inputs(built), cell_inputs(committed)
    stale = "notebooks/01_quickstart.ipynb is out of date with notebooks/01_quickstart.py: run `make notebooks`"
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert got == want, f"{stale} (cell {index} differs)"
    assert len(actual) == len(expected), f"{stale} ({len(actual)} cells, the script has {len(expected)})"
    assert committed.metadata.get("kernelspec") == built.metadata.get("kernelspec"), stale
