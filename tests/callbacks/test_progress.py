"""ProgressBar: which bar it draws where (terminal, Jupyter kernel, log file), the whole lines it
writes where a redrawn bar would arrive as fragments, and a Ray worker's bar drawn by the driver."""
from __future__ import annotations

import io
import sys
import types
import warnings

import pytest
import tqdm.std

import raytrainer as rt
from helpers import LinearModel, loader
from raytrainer.callbacks import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _fake_kernel(monkeypatch, shell_name="ZMQInteractiveShell"):
    """Make ``sys.modules["IPython"].get_ipython()`` return a shell of class ``shell_name``."""
    shell = type(shell_name, (), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    for var in ("QT_API", "SPYDER_ARGS"):
        monkeypatch.delenv(var, raising=False)


def test_bar_class_terminal_text_file_lines():
    assert progress._bar_class(_Tty()) is tqdm.std.tqdm
    assert progress._bar_class(io.StringIO()) is None          # a log file, a Ray worker's output
    closed = io.StringIO()
    closed.close()
    assert progress._bar_class(closed) is None


def test_bar_class_in_a_kernel_without_ipywidgets_is_the_text_bar_and_warns_nothing(monkeypatch):
    _fake_kernel(monkeypatch)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)       # import ipywidgets -> ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # tqdm.auto would warn here
        assert progress._bar_class(io.StringIO()) is tqdm.std.tqdm


def test_bar_class_in_a_kernel_with_ipywidgets_is_the_widget(monkeypatch):
    pytest.importorskip("ipywidgets")
    import tqdm.notebook
    _fake_kernel(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert progress._bar_class(io.StringIO()) is tqdm.notebook.tqdm


def test_bar_class_ipython_terminal_and_qtconsole_are_not_notebooks(monkeypatch):
    _fake_kernel(monkeypatch, "TerminalInteractiveShell")
    assert progress._bar_class(io.StringIO()) is None
    _fake_kernel(monkeypatch)
    monkeypatch.setenv("QT_API", "pyqt5")
    assert progress._bar_class(io.StringIO()) is None


class _ShownLosses(LinearModel):
    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch), prog_bar=True)


def test_fit_writes_one_whole_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path, capsys):
    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_epochs=2, logger=False,
                         enable_checkpointing=False, storage_path=str(tmp_path), name="bar",
                         log_every_n_steps=1)
    trainer.fit(_ShownLosses(), loader(n=12, batch_size=4), loader(n=4))
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("Epoch ")]
    assert len(lines) == 2, err
    for epoch, line in enumerate(lines):
        assert line.startswith(f"Epoch {epoch}: 100%|##########| 3/3 [")
        assert "train_loss=" in line and "val_loss=" in line


def test_line_bar_prints_every_interval_and_at_close():
    out = io.StringIO()
    bar = progress._LineBar(total=10, initial=2, desc="Epoch 1", file=out, every_s=0.0)
    bar.update()
    bar.set_postfix({"loss": "0.5"})
    bar.every_s = 3600.0
    bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Epoch 1:  30%|###       | 3/10 [")
    assert lines[1].startswith("Epoch 1:  40%|####      | 4/10 [") and lines[1].endswith("loss=0.5]")


def test_a_worker_sends_its_bar_and_summary_and_the_driver_draws_them_as_a_local_fit_would(tmp_path, capsys):
    """A Ray worker's rank 0 (here an in-process run whose context has a progress sink, as
    runtime/ray_train.py gives rank 0) draws nothing and sends its bar's states and the model
    summary; the driver's ProgressBar (``follow``) draws them: with stderr not a terminal, the
    same whole lines per epoch as a local fit, at the worker's rate, the summary logged."""
    import time

    import torch

    from raytrainer.loop.context import LocalContext
    from raytrainer.loop.execute import execute

    class Slow(_ShownLosses):
        def training_step(self, batch, batch_idx):
            time.sleep(0.02)
            return super().training_step(batch, batch_idx)

    sent = []
    ctx = LocalContext(torch.device("cpu"))
    ctx.progress_sink = sent.append
    trainer = rt.Trainer(launcher="local", accelerator="cpu", max_epochs=2, logger=False, enable_model_summary=True,
                         enable_checkpointing=False, storage_path=str(tmp_path), name="bar", log_every_n_steps=1)
    execute(trainer, "fit", Slow(), None, {"train": loader(n=12, batch_size=4), "val": loader(n=4)}, None, ctx)
    assert capsys.readouterr().err == ""  # the worker drew nothing
    assert sent[0]["logger"] == "raytrainer.summary" and "Trainable params" in sent[0]["log"]
    assert [(s["desc"], s["n"]) for s in sent if s.get("closed")] == [("Epoch 0", 3), ("Epoch 1", 3)]

    pending = list(sent)
    driver_bar = progress.ProgressBar()
    with driver_bar.follow(lambda: [pending.pop(0) for _ in range(len(pending))]):
        pass  # the fit ran on the workers; what they sent is drawn when it arrives (here: at the end)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("Epoch ")]
    assert [ln[:len("Epoch 0: 100%|##########| 3/3 [")] for ln in lines] == [
        f"Epoch {e}: 100%|##########| 3/3 [" for e in (0, 1)]
    for line in lines:  # the worker's rate (3 steps of >= 20 ms), not how fast the states arrived
        rate = float(line.split("it/s")[0].rsplit(", ", 1)[1])
        assert rate < 60, line
        assert "train_loss=" in line and "val_loss=" in line


def test_workers_prints_are_printed_on_the_driver_behind_their_rank(capsys):
    """runtime/worker_output.py: a worker's prints (stdout and stderr, where warnings go) become
    whole lines sent to the driver, which prints them behind the rank, on the same stream, once."""
    from raytrainer.runtime.worker_output import sent_to_driver

    sent = []
    with sent_to_driver(sent.append, rank=1):
        print("step 3: loss 0.5")
        print("partial", end="")
        print("UserWarning: careful\n  the line after", file=sys.stderr)
    assert capsys.readouterr() == ("", "")  # nothing written in the worker itself
    with progress.follow(lambda: [sent.pop(0) for _ in range(len(sent))]):
        pass
    out, err = capsys.readouterr()
    assert out == "(rank 1) step 3: loss 0.5\n(rank 1) partial"
    assert err == "(rank 1) UserWarning: careful\n(rank 1)   the line after\n"
