"""ModelCheckpoint(dirpath=, filename=, ...) names its files as Lightning does, side by side with
pytorch-lightning: the same module and callback arguments under both, and the files each leaves
in ``dirpath``, ``best_model_path``, ``last_model_path`` and ``best_k_models`` compared; the named
files read with ``torch.load(weights_only=True)`` and resumed from."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

pl = pytest.importorskip("pytorch_lightning")
pytestmark = pytest.mark.timeout(120)

VAL_LOSSES = [0.5, 0.25, 0.375, 0.125]  # one per epoch: epoch 3 best, then epoch 1, then 2


def data(n: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


class Scripted:
    """Trains a small net; its validation loss is scripted per epoch (the names depend on it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", VAL_LOSSES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_both(tmp_path, epochs=4, **ckpt_kwargs):
    """Run the same fit under both; returns {"rt": (callback, dirpath), "pl": (...)}."""
    out = {}
    for who, base, mod in (("rt", rt.Module, rt), ("pl", pl.LightningModule, pl)):
        dirpath = tmp_path / who / "ckpts"
        cb = mod.callbacks.ModelCheckpoint(dirpath=str(dirpath), **ckpt_kwargs)
        module = type("M", (Scripted, base), {})()
        if who == "rt":
            make_trainer(tmp_path / "rt", max_epochs=epochs, enable_checkpointing=True, callbacks=[cb]).fit(
                module, data(), data())
        else:
            pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, num_sanity_val_steps=0, callbacks=[cb],
                       default_root_dir=str(tmp_path / "pl")).fit(module, data(), data())
        out[who] = (cb, dirpath)
    return out


def _observed(cb, dirpath):
    rel = lambda p: os.path.relpath(p, dirpath) if p else p  # noqa: E731
    return (sorted(os.listdir(dirpath)), rel(cb.best_model_path), rel(cb.last_model_path),
            sorted((rel(p), round(float(v), 4)) for p, v in cb.best_k_models.items()))


def test_monitored_top_k_and_last_are_named_and_kept_like_lightning(tmp_path):
    both = _fit_both(tmp_path, monitor="val_loss", filename="{epoch}-{val_loss:.2f}", save_top_k=2,
                     save_last=True)
    ours, theirs = _observed(*both["rt"]), _observed(*both["pl"])
    assert ours == theirs == (["epoch=1-val_loss=0.25.ckpt", "epoch=3-val_loss=0.12.ckpt", "last.ckpt"],
                              "epoch=3-val_loss=0.12.ckpt", "last.ckpt",
                              [("epoch=1-val_loss=0.25.ckpt", 0.25), ("epoch=3-val_loss=0.12.ckpt", 0.125)])
    cb, dirpath = both["rt"]
    # What Lightning users do with the best file: its weights into a plain module, or the module back.
    plain = nn.Linear(3, 1)
    plain.load_state_dict({k.removeprefix("net."): v
                           for k, v in torch.load(cb.best_model_path, weights_only=True)["state_dict"].items()})
    theirs_module = type("P", (Scripted, pl.LightningModule), {}).load_from_checkpoint(cb.best_model_path)
    assert torch.equal(theirs_module.net.weight, plain.weight)
    # last.ckpt holds the final state (resuming from a named file: the last test)
    assert torch.load(cb.last_model_path, weights_only=True)["global_step"] == 8


def test_names_without_a_monitor_the_version_counter_and_weights_only_like_lightning(tmp_path):
    # No filename: Lightning's default "{epoch}-{step}"; save_top_k=-1 keeps every one.
    both = _fit_both(tmp_path / "default", epochs=2, save_top_k=-1)
    assert _observed(*both["rt"])[0] == _observed(*both["pl"])[0] == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    # A template that names checkpoints alike: Lightning's -v1, -v2 ... for kept ones; without a
    # monitor, the newest takes the previous one's name over.
    both = _fit_both(tmp_path / "versions", epochs=3, filename="fixed", monitor="val_loss", save_top_k=-1)
    assert _observed(*both["rt"])[:2] == _observed(*both["pl"])[:2] == (
        ["fixed-v1.ckpt", "fixed-v2.ckpt", "fixed.ckpt"], "fixed-v1.ckpt")
    both = _fit_both(tmp_path / "replaced", epochs=1, filename="fixed", every_n_train_steps=1)
    assert _observed(*both["rt"])[0] == _observed(*both["pl"])[0] == ["fixed.ckpt"]
    assert torch.load(both["rt"][0].best_model_path, weights_only=True)["global_step"] == 2
    # save_weights_only: the weights, counters and hparams; no optimizer state, as Lightning's
    both = _fit_both(tmp_path / "weights", epochs=1, save_weights_only=True)
    files = {who: torch.load(os.path.join(d, os.listdir(d)[0]), weights_only=True) for who, (_, d) in both.items()}
    assert "optimizer_states" not in files["rt"] and "optimizer_states" not in files["pl"]
    assert {"state_dict", "epoch", "global_step"} <= set(files["rt"]) & set(files["pl"])
    assert torch.equal(files["rt"]["state_dict"]["net.weight"], files["pl"]["state_dict"]["net.weight"])


def test_a_named_file_is_the_committed_checkpoint_and_resumes_exactly(tmp_path):
    """The named file holds the run's sealed checkpoint (a hard link on local disk: no copy), so
    fit(ckpt_path=<named file>) resumes exactly; the run's own files that no name refers to are
    deleted with the names."""
    cb = rt.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "named"), monitor="val_loss", save_top_k=1)
    make_trainer(tmp_path / "a", max_epochs=3, enable_checkpointing=True, callbacks=[cb], name="a").fit(
        type("M", (Scripted, rt.Module), {})(), data(), data())
    assert os.listdir(tmp_path / "named") == ["epoch=1-step=4.ckpt"]
    best = cb.best_model_path
    source = os.path.join(tmp_path, "a", "a", "checkpoints", "step=000000004.ckpt")
    assert os.path.samefile(best, source)  # the run's checkpoint itself, linked
    assert rt.checkpoint.read_marker(best)["global_step"] == 4  # sealed: committed and checked
    assert sorted(os.listdir(tmp_path / "a" / "a" / "checkpoints")) == ["step=000000004.ckpt"]

    straight = type("M", (Scripted, rt.Module), {})()
    make_trainer(tmp_path / "b", max_epochs=3, name="b").fit(straight, data(), data())
    resumed = type("M", (Scripted, rt.Module), {})()
    make_trainer(tmp_path / "c", max_epochs=3, name="c").fit(resumed, data(), data(), ckpt_path=best)
    assert torch.equal(resumed.net.weight, straight.net.weight)


def test_two_ranks_agree_on_the_names_and_rank_zero_publishes_them(tmp_path):
    from multirank import GlooContext, run_ranks

    from raytrainer.loop.execute import execute

    def rank_fn(rank, world_size):
        cb = rt.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "named"), filename="{epoch}-{val_loss:.2f}",
                                          monitor="val_loss", save_top_k=1, save_last=True)
        trainer = make_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[cb])
        execute(trainer, "fit", type("M", (Scripted, rt.Module), {})(), None,
                {"train": data(16), "val": data()}, None, GlooContext(rank, world_size))
        return cb.best_model_path, cb.last_model_path, sorted(cb.best_k_models)
    ranks = run_ranks(rank_fn)
    assert ranks[0] == ranks[1]
    best, last, kept = ranks[0]
    assert sorted(os.listdir(tmp_path / "named")) == ["epoch=1-val_loss=0.25.ckpt", "last.ckpt"]
    assert (os.path.basename(best), os.path.basename(last), kept) == ("epoch=1-val_loss=0.25.ckpt", "last.ckpt", [best])
    assert sorted(torch.load(last, weights_only=True)["rank_states"]) == [0, 1]  # the run's 2-rank checkpoint
