"""The Colab notebooks in colabs/: committed without outputs, and runnable top to bottom.

The notebooks run headless in FAST mode (tiny configs) in a kernel of this interpreter, in the
order a reader would chain them: 02 pretrains into the shared workdir, 03 finetunes a detector on
that pretraining run, 01 loads the detector. Each notebook also runs on its own (it trains what is
missing), so a single one can be selected with `-k`. A cell that raises fails the test with
nbclient's CellExecutionError, which shows the cell's source and traceback.
"""

import json
import os
import sys
import time

import nbformat
import pytest
from conftest import xla_flags
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
# Reader's order: each notebook reuses what the one before it trained.
NOTEBOOKS = (
    "02_pretraining_and_cpe.ipynb",
    "03_finetune_and_evaluate.ipynb",
    "01_open_vocabulary_detection.ipynb",
)
CELL_TIMEOUT_S = 300
KERNEL_NAME = "rovit-colab-test"


def _load(name: str) -> nbformat.NotebookNode:
    with open(os.path.join(COLABS, name), encoding="utf-8") as f:
        return nbformat.read(f, as_version=4)


def test_colabs_folder_holds_exactly_the_three_notebooks():
    assert sorted(n for n in os.listdir(COLABS) if n.endswith(".ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_valid_and_has_no_outputs(name):
    nb = _load(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {i} has committed outputs"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"
        assert "execution" not in cell.metadata, f"{name}: code cell {i} has execution timings"
    # The first code cell installs the package, unless the test environment says not to.
    first = code[0].source
    assert 'os.environ.get("ROVIT_SKIP_INSTALL") != "1"' in first, first
    assert "pip" in first and "REPO_URL" in first, first
    # The repository URL is set in one place.
    sources = "\n".join(c.source for c in nb.cells)
    assert sources.count("REPO_URL = ") == 1, name


def test_notebooks_share_one_repository_url():
    urls = set()
    for name in NOTEBOOKS:
        first = next(c for c in _load(name).cells if c.cell_type == "code")
        for line in first.source.splitlines():
            if line.startswith("REPO_URL = "):
                urls.add(line)
    assert len(urls) == 1, urls


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernel spec for this interpreter and the environment of a FAST, no-install run."""
    root = tmp_path_factory.mktemp("colabs")
    kernels = root / "kernels"
    write_kernel_spec(path=str(kernels / KERNEL_NAME), overrides={"display_name": KERNEL_NAME})
    spec = json.loads((kernels / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable, spec
    env = dict(
        os.environ,
        ROVIT_COLAB_FAST="1",
        ROVIT_SKIP_INSTALL="1",
        ROVIT_REPO_DIR=REPO,
        ROVIT_COLAB_WORKDIR=str(root / "work"),
        TFDS_DATA_DIR=str(root / "tfds"),
        # One CPU device, as on a Colab CPU runtime (the suite's 8 fake devices would not divide
        # the tiny detection batch).
        XLA_FLAGS=xla_flags(1),
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )
    cwd = root / "cwd"
    cwd.mkdir()
    return str(kernels), env, str(cwd)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, kernel_env):
    kernels, env, cwd = kernel_env
    nb = _load(name)
    km = KernelManager(
        kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels])
    )
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": cwd}},
    )
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError (source + traceback) if a cell fails
    elapsed = time.perf_counter() - start
    print(f"{name}: {elapsed:.1f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), name
    # Every notebook plots: at least one inline image was produced.
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} produced no figure"
