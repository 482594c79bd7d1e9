"""examples/notebook.ipynb executed in a real Jupyter kernel (nbclient + ipykernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

@pytest.fixture(autouse=True)
def _local_backend(monkeypatch):
    """These tests are about the local backend: pin it, whatever other backends are installed."""
    monkeypatch.setenv("MESHRUN_BACKEND", "local")


NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"


@pytest.mark.service
def test_notebook_runs_in_a_real_kernel(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    def outputs(i):
        return nb.cells[i].get("outputs", [])

    def text(i):
        return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs(i))

    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert text(2) == "squaring 3\n9"                      # plain call in the kernel
    html = outputs(3)[0]["data"]["text/html"]              # the job's HTML view
    assert "meshrun.Job" in html and "succeeded" in html and "square" in html
    assert text(4) == "49"                                 # the result came back
    assert text(5) == "[0, 1, 4, 9, 16]"
    assert "squaring 7" in text(6)
    cmd = outputs(7)[0]["data"]                             # a command job shows its output and exit code
    assert "hello from a command job" in cmd["text/html"] and "exit code" in cmd["text/html"]
    assert "exit code 0" in cmd["text/plain"] and "succeeded" in cmd["text/plain"]
