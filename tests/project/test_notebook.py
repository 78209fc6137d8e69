"""notebooks/quickstart.ipynb runs top to bottom, headless, on CPU; any failing cell fails the test."""

import json
import os
import sys
import time

import pytest
from hf_fixtures import REPO

ROOT = REPO
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(monkeypatch, tmp_path):
    # JAXRAST_TOY_FAMILY points the notebook at another family (e.g. one just rebuilt).
    family = os.environ.get("JAXRAST_TOY_FAMILY") or os.path.join(ROOT, "jaxrast", "toy", "family")
    if not os.path.exists(os.path.join(family, "s_base", "config.json")):
        pytest.skip(f"the toy family is not built yet ({family}/s_base/config.json is missing); "
                    "the notebook runs the demo on it")
    nbformat = pytest.importorskip("nbformat", reason="pip install nbclient nbformat ipykernel")
    nbclient = pytest.importorskip("nbclient", reason="pip install nbclient nbformat ipykernel")

    # A kernel spec for this interpreter (a system-wide "python3" spec may point elsewhere).
    spec_dir = tmp_path / "jupyter" / "kernels" / "jaxrast-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxrast test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel inherits this environment: one plain CPU device (not conftest's 8 fake
    # ones) and this checkout first on the path.
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="jaxrast-test",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    seconds = time.perf_counter() - start

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "Recovery rate RR" in text and "M_base + ΔR" in text and "pass@8" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the demo's two plots and the pass@k plot
    print(f"the notebook ran in {seconds:.0f} s (keep it near a minute on 2 CPU cores; timing is not a pass/fail)")
