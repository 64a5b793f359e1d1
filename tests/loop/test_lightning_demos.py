"""pytorch-lightning's own demo code (``pytorch_lightning/demos/boring_classes.py`` from the
installed wheel), ported as a user would — its imports changed, nothing else — and run side by
side with the original: the same weights, counters, and evaluation results."""
from __future__ import annotations

import inspect
import sys
import types

import pytest
import torch
from helpers import make_trainer
from torch.utils.data import DataLoader

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(180)

# The port: Lightning's imports, replaced (nothing else in the file changes).
PORTED_IMPORTS = {
    "from pytorch_lightning import LightningDataModule, LightningModule":
        "from raytrainer import LightningDataModule, LightningModule",
    "from pytorch_lightning.core.optimizer import LightningOptimizer":
        "from torch.optim import Optimizer as LightningOptimizer",  # self.optimizers() is one
    "from pytorch_lightning.utilities.types import STEP_OUTPUT": "from typing import Any as STEP_OUTPUT",
}


@pytest.fixture(scope="module")
def demos():
    import pytorch_lightning.demos.boring_classes as theirs
    source = inspect.getsource(theirs)
    for lightning, ours in PORTED_IMPORTS.items():
        assert lightning in source, f"the demo no longer imports {lightning!r}"
        source = source.replace(lightning, ours)
    assert "pytorch_lightning" not in source.replace("pytorch_lightning.demos", "")
    ported = types.ModuleType("ported_boring_classes")
    sys.modules[ported.__name__] = ported  # (dataclass-like helpers look their module up)
    exec(compile(source, theirs.__file__ + " (ported)", "exec"), ported.__dict__)
    yield theirs, ported
    sys.modules.pop(ported.__name__, None)


def _run_both(tmp_path, demos, build, trainer_kwargs, then=("validate", "test")):
    """``build(module_of_classes)`` -> (model, fit kwargs); both trainers fit and then run
    ``then``; returns what a user observes: (raytrainer's, Lightning's)."""
    observed = []
    for classes in demos:
        torch.manual_seed(0)
        model, fit_kwargs = build(classes)
        kwargs = {"max_epochs": 2, "logger": False, "num_sanity_val_steps": 2, **trainer_kwargs}
        if classes is demos[1]:
            trainer = make_trainer(tmp_path / "rt", **kwargs)
        else:
            trainer = pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), **kwargs)
        trainer.fit(model, **fit_kwargs)
        counters = (trainer.global_step, trainer.current_epoch)
        results = {stage: getattr(trainer, stage)(model, **({"datamodule": fit_kwargs["datamodule"]}
                                                            if "datamodule" in fit_kwargs else {}))
                   for stage in then}
        observed.append(((*counters, trainer.global_step, trainer.current_epoch), model.state_dict(), results,
                         {k: float(v) for k, v in trainer.callback_metrics.items()}))
    return observed[1], observed[0]


def _assert_same(ours, theirs):
    assert ours[0] == theirs[0]
    for (name, a), b in zip(ours[1].items(), theirs[1].values()):
        torch.testing.assert_close(a, b, msg=name)
    assert ours[2] == theirs[2] and ours[3] == pytest.approx(theirs[3])


def test_boring_model_with_its_own_loaders_and_step_scheduler(tmp_path, demos):
    """Dict step outputs ({"loss": ...}), a StepLR from configure_optimizers' two lists, the
    module's own loaders for every stage."""
    ours, theirs = _run_both(tmp_path, demos, lambda m: (m.BoringModel(), {}), {"limit_train_batches": 10})
    _assert_same(ours, theirs)
    assert ours[0] == (20, 2, 20, 2)  # (and still so after validate() and test())


def test_boring_model_with_boring_datamodule(tmp_path, demos):
    ours, theirs = _run_both(tmp_path, demos, lambda m: (m.BoringModel(), {"datamodule": m.BoringDataModule()}),
                             {"limit_train_batches": 8, "limit_val_batches": 4})
    _assert_same(ours, theirs)


def test_manual_optimization_boring_model(tmp_path, demos):
    ours, theirs = _run_both(tmp_path, demos, lambda m: (m.ManualOptimBoringModel(), {}),
                             {"limit_train_batches": 6}, then=())
    _assert_same(ours, theirs)


def test_demo_model_without_batch_idx_name_and_with_hparams_attribute(tmp_path, demos):
    """DemoModel names its second argument batch_nb and keeps the learning rate as an attribute."""
    def build(m):
        torch.manual_seed(0)
        return m.DemoModel(learning_rate=0.01), {"train_dataloaders": DataLoader(m.RandomDataset(32, 32), batch_size=4)}
    ours, theirs = _run_both(tmp_path, demos, build, {}, then=())
    _assert_same(ours, theirs)
    assert ours[0] == (16, 2, 16, 2)


def test_test_after_fit_logs_at_the_fits_step_and_epoch(tmp_path, demos):
    """trainer.test() after fit: self.global_step in test_step and the logged row's step and epoch
    are where the fit ended (Lightning's loops belong to the trainer)."""
    from row_loggers import row_loggers
    rows_classes = row_loggers(pl)

    def build(m):
        class Tested(m.BoringModel):
            def test_step(self, batch, batch_idx):
                self.log("seen_step", float(self.global_step))
        return Tested(), {}
    observed = []
    for classes, rows in zip(demos, reversed(rows_classes)):
        torch.manual_seed(0)
        model, logger = build(classes)[0], rows()
        kwargs = dict(max_epochs=2, limit_train_batches=10, limit_test_batches=3, logger=logger, log_every_n_steps=100)
        if classes is demos[1]:
            trainer = make_trainer(tmp_path / "rt", **kwargs)
        else:
            trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False,
                                 enable_model_summary=False, default_root_dir=str(tmp_path / "pl"), **kwargs)
        trainer.fit(model)
        observed.append((trainer.test(model), logger.rows[-1]))
    assert observed[0] == observed[1] == ([{"seen_step": 20.0}], (20, {"seen_step": 20.0, "epoch": 2.0}))
