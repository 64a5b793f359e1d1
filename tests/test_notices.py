"""What raytrainer says goes through logging: visible by default as ``[raytrainer] ...`` on stderr,
silenced with one setLevel, and left to the user's own logging configuration when there is one.
Each case is a fresh interpreter (logging's configuration is process-wide)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers import REPO

pytestmark = pytest.mark.timeout(120)

_FIT = textwrap.dedent("""
    import logging, os, sys, tempfile
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    import raytrainer as rt
    {configure}

    class Net(rt.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit():
        data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
        rt.Trainer(launcher="local", max_epochs=1, logger=False, enable_progress_bar=False,
                   storage_path=tempfile.mkdtemp(), name="r").fit(Net(), data, ckpt_path="last")

    fit()
    {then}
""")


def _run(configure: str = "", then: str = "") -> subprocess.CompletedProcess:
    code = _FIT.format(configure=configure, then=then)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_notices_show_by_default_and_one_setlevel_silences_them():
    proc = _run(then='print("--- silenced ---", file=sys.stderr, flush=True)\n'
                     'logging.getLogger("raytrainer").setLevel(logging.WARNING)\nfit()')
    shown, silenced = proc.stderr.split("--- silenced ---")
    lines = shown.strip().splitlines()
    assert any(ln.startswith("[raytrainer] ckpt_path='last': no committed checkpoint") for ln in lines), shown
    assert any(ln.startswith("[raytrainer] fit: launcher=local device=cpu workers=1") for ln in lines), shown
    assert all(ln.startswith("[raytrainer] ") for ln in lines), shown  # one line each, our prefix
    assert "[raytrainer]" not in silenced, silenced
    assert proc.stdout == ""  # nothing on stdout: the CLI's report and the user's prints only


def test_the_users_logging_configuration_takes_over():
    proc = _run(configure='logging.basicConfig(level=logging.INFO, format="USER %(name)s: %(message)s")')
    lines = [ln for ln in proc.stderr.splitlines() if "raytrainer" in ln]
    assert any(ln.startswith("USER raytrainer.runtime.preflight: fit: launcher=local") for ln in lines), proc.stderr
    assert not any(ln.startswith("[raytrainer]") for ln in lines), proc.stderr  # our handler stayed out
