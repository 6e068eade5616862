"""launch/colab_tpu.ipynb: executed top to bottom on CPU, offline, at its smoke sizes, and committed cleared.

The kernel is this interpreter's (`python3`, the ipykernel of the environment running the tests); it and the
notebook's jobs import the kardia_jax of this checkout (PYTHONPATH), see one CPU device (the 8 fake devices of
conftest.py are dropped from XLA_FLAGS: the notebook sizes its batches to the device count) and write into a
temporary workdir.
"""

import json
import os
import pathlib

import nbformat
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_tpu.ipynb"
GRPO_STEPS = 3  # the notebook's smoke setting of grpo.max_steps

# Inserted before the notebook's first JAX computation (section 4): the cells before it, and so the jobs, ran
# without this kernel claiming an accelerator (a TPU serves one process at a time). Private API: test only.
BACKEND_CHECK = ("from jax._src import xla_bridge\n"
                 "assert not xla_bridge.backends_are_initialized(), 'the kernel initialized JAX before the jobs'")


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), \
        "clear the notebook's outputs before committing it"
    assert not any(line.lstrip().startswith(("!", "%")) for cell in code for line in cell.source.splitlines()), \
        "the notebook's cells are Python (no shell or magic lines)"


def test_notebook_runs_offline_on_cpu(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
    for key, value in {
        "KARDIA_NOTEBOOK_SMOKE": "1",
        "KARDIA_NOTEBOOK_WORKDIR": str(workdir),
        "HF_HUB_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }.items():
        monkeypatch.setenv(key, value)  # the kernel, and the jobs it starts, inherit this environment

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first_jax = next(i for i, cell in enumerate(nb.cells)
                     if cell.cell_type == "code" and "import jax" in cell.source.splitlines())
    nb.cells.insert(first_jax, nbformat.v4.new_code_cell(BACKEND_CHECK))
    # Run from launch/, as Jupyter does for a notebook opened there; any cell error raises CellExecutionError.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    text = _outputs_text(nb)
    assert f"kardia_jax  {REPO / 'kardia_jax'}" in text  # the kernel imported this checkout's package
    assert "JAX sees 1 cpu device(s)." in text and "model: tiny" in text
    for name in ("understanding", "reasoning", "emotion", "response"):  # the four spans (of the reference replies)
        assert f"{name}: " in text
    assert "Rubric judge, mean score" in text
    rubric_row = next(line for line in text.splitlines() if line.strip().startswith("rubric score"))
    scores = [float(x) for x in rubric_row.split()[2:]]
    assert len(scores) == 3 and all(1.0 <= s <= 5.0 for s in scores)  # reference, SFT, GRPO
    assert any("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))

    assert (workdir / "sft" / "hf").is_dir() and (workdir / "grpo" / "hf").is_dir()
    rows = [json.loads(line) for line in (workdir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, GRPO_STEPS + 1))
    assert all("reward/total" in row and "reward/rubric" in row for row in rows)
