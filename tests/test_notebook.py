"""examples/notebook.ipynb executed headless with nbclient, as a person runs it in Jupyter: a
Module and a DataModule defined in the kernel's ``__main__``, fitted in the kernel
(launcher="local") and by 2 Ray Train workers (launcher="ray"), a checkpoint read back, and a Ray
fit interrupted with Jupyter's own interrupt (SIGINT to the kernel's process group, as the ■ button
sends it) and resumed in the next cell.

The kernel is the ``python3`` kernelspec that ipykernel's wheel installs into this venv
(``share/jupyter/kernels/python3``, argv ``python``, which jupyter_client runs as this
interpreter): no install step. Like tests/test_ray_s3.py's subprocess, the kernel starts its own
embedded Ray (RAY_ADDRESS removed) — what a notebook user gets — and the notebook's last cell shuts
it down; every process carrying this test's marker variable must be gone afterwards.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import sys
import time
import uuid

import pytest

import raytrainer as rt

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "notebook.ipynb"
RAY_FIT, RAY_RESUME = "rt.seed_everything(0)\nray_model", "on_ray = trainer("
MARKER = "RAYTRAINER_TEST_NOTEBOOK"   # env var naming the kernel and the Ray it starts
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``MARKER=<marker>`` (Linux /proc; others: none found)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _texts(cell) -> tuple[str, str]:
    """(stdout, stderr) of a code cell, colour codes removed (Ray colours its worker prefixes)."""
    out = {"stdout": "", "stderr": ""}
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            out[o.name] += ANSI.sub("", o.text)
    return out["stdout"], out["stderr"]


def _values(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)\b", line)}


def _line(text: str, prefix: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, f"expected one line starting with {prefix!r} in:\n{text}"
    return lines[0]


def _cell(nb, source_start: str):
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    assert len(cells) == 1, source_start
    return cells[0]


def test_notebook_fits_locally_and_on_ray_and_reloads_a_checkpoint(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("sklearn")           # the digits data
    from jupyter_client.kernelspec import KernelSpecManager
    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert argv0 in ("python", "python3", sys.executable), \
        f"the python3 kernelspec runs {argv0!r}, not this interpreter ({sys.executable})"

    nb = nbformat.read(NOTEBOOK, as_version=4)
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env[MARKER] = marker
    runs = tmp_path / "raytrainer_runs"
    ray_checkpoints = runs / "notebook-ray" / "checkpoints"
    seen = {}

    async def press_interrupt_once_a_checkpoint_is_committed():
        deadline = time.monotonic() + 180
        while not rt.checkpoint.list_committed(str(ray_checkpoints)):  # the first epoch is done
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.05)
        await client.km.interrupt_kernel()  # what Jupyter's ■ does: SIGINT to the kernel
        seen["interrupted"] = True

    def on_cell_execute(cell, cell_index):
        if cell.source.startswith(RAY_FIT):
            seen["task"] = asyncio.get_running_loop().create_task(press_interrupt_once_a_checkpoint_is_committed())
        elif cell.source.startswith(RAY_RESUME):  # what the resume will find (retention may prune it later)
            newest = rt.checkpoint.list_committed(str(ray_checkpoints))[-1]
            seen["newest"] = (newest.rsplit("/", 1)[1], sorted(rt.load_checkpoint(newest)["rank_states"]))

    # The notebook's folder is the kernel's working directory: its runs land in tmp_path.
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", on_cell_execute=on_cell_execute,
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.monotonic()
    try:
        client.execute(env=env)
    finally:
        print(f"notebook executed in {time.monotonic() - started:.1f} s")
        nbformat.write(nb, tmp_path / "executed.ipynb")   # for a look when it fails
        deadline = time.monotonic() + 30   # ray.shutdown() ran; its processes may take a moment
        while (left := _marked_pids(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"processes of the notebook's kernel or Ray survived it: {left}"

    interrupted_cell = _cell(nb, RAY_FIT)
    errors = [o for c in nb.cells if c is not interrupted_cell for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors, errors

    # launcher="local": the printed result, the checkpoint on disk, the bar drawn in the kernel.
    out, err = _texts(_cell(nb, "print(f\"local:"))
    local = _values(_line(out, "local:"))
    assert local["epochs"] == 3 and local["steps"] == 72   # 24 batches of 1527 samples, 3 epochs
    assert local["val_acc"] >= 0.9, out
    best = _line(out, "best checkpoint:").split(": ", 1)[1]
    assert best == str(runs / "notebook-local" / "checkpoints" / "step=000000072.ckpt")
    assert rt.checkpoint.read_marker(best)["global_step"] == 72  # committed
    fit_cell = _cell(nb, "rt.seed_everything(0)\nlocal_model")
    try:
        import ipywidgets  # noqa: F401  (the kernel is this interpreter: it sees the same packages)
    except ImportError:  # tqdm's text bar, redrawn in place by the notebook
        assert "Epoch 2: 100%" in _texts(fit_cell)[1] and "24/24" in _texts(fit_cell)[1]
    else:                # tqdm's widget
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                   for o in fit_cell.outputs)

    # launcher="ray", interrupted: both workers stopped at one step after the press, a committed
    # checkpoint named in rt.Preempted, the kernel and its Ray kept.
    _, fit_err = _texts(interrupted_cell)
    assert "[raytrainer] fit: launcher=ray workers=2" in fit_err  # the notices go to stderr
    assert seen.get("interrupted"), "no checkpoint of the Ray run appeared: the interrupt was never sent"
    [error] = [o for o in interrupted_cell.outputs if o.output_type == "error"]
    assert error.ename == "Preempted", error
    m = re.search(r"stopped on SIGINT at step (\d+); checkpoint (\S+) committed", error.evalue)
    assert m, error.evalue
    stopped_at = int(m.group(1))
    assert 12 <= stopped_at < 96, stopped_at  # after the first epoch's checkpoint, well before the end
    print(f"interrupted after step 12's checkpoint, stopped at step {stopped_at}")
    assert m.group(2) == str(ray_checkpoints / f"step={stopped_at:09d}.ckpt")
    # the newest when the resume started, written by both ranks (each rank's RNG and data position)
    assert seen["newest"] == (f"step={stopped_at:09d}.ckpt", [0, 1])

    # ...resumed in the next cell to the end: 8 epochs, each worker half of every epoch.
    out, _ = _texts(_cell(nb, "print(f\"ray:"))
    on_ray = _values(_line(out, "ray:"))
    assert on_ray["epochs"] == 8 and on_ray["steps"] == 96
    assert on_ray["val_acc"] >= 0.9, out
    ckpt = ray_checkpoints / "step=000000096.ckpt"
    assert f"checkpoint: {ckpt} ranks: [0, 1]" in out.splitlines()
    assert rt.checkpoint.read_marker(str(ckpt))["global_step"] == 96
    assert (runs / "notebook-ray" / "csv" / "metrics.csv").is_file()
    assert any((runs / "notebook-ray" / "tensorboard").rglob("events.out.tfevents.*"))

    # Rank 0's bar, drawn in the kernel (the driver: callbacks/progress.py) as the local fit's is:
    # every epoch's bar reaches 12/12 (the epoch the interrupt landed in, in the resumed run), no
    # bar behind Ray's worker prefix. A bar may be drawn after its cell ended: every cell from the
    # Ray fit on is searched.
    ray_cells = nb.cells[nb.cells.index(interrupted_cell):]
    drawn = "".join(_texts(c)[1] for c in ray_cells).replace("\r", "\n")
    assert not re.search(r"RayTrainWorker pid=\d+\) Epoch", drawn), drawn
    try:
        import ipywidgets  # noqa: F401
    except ImportError:  # tqdm's text bar, redrawn in place
        for epoch in range(8):
            assert re.search(rf"^Epoch {epoch}: 100%\|.*\| 12/12 \[.*val_acc=", drawn, re.M), (epoch, drawn)
    else:                # tqdm's widgets
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                   for c in ray_cells for o in c.outputs)

    # The checkpoint read back: the weights fit left in the model, the same validation accuracy.
    out, _ = _texts(_cell(nb, "state = rt.load_checkpoint"))
    line = _line(out, "reloaded:")
    assert "weights_equal=True" in line and "step=96" in line
    assert _values(line)["val_acc"] == pytest.approx(on_ray["val_acc"], abs=1e-4)

    # Nothing about missing ipywidgets: the widget is optional (raytrainer/callbacks/progress.py).
    everything = "".join("".join(_texts(c)) for c in nb.cells if c.cell_type == "code")
    assert "IProgress not found" not in everything and "Missing packages" not in everything
    # Quiet by default: no log line of Ray's (its start, the Ctrl-C, the shutdown) reaches the user.
    assert not re.search(r"\b(WARNING|ERROR)\b", everything), everything
