"""LightningModule conveniences users call: all_gather, logger/loggers, freeze/unfreeze, dtype
(side by side with pytorch-lightning in one process; all_gather on 2 real gloo ranks)."""
from __future__ import annotations

import pytest
import torch
from helpers import LinearModel, loader, make_trainer
from multirank import GlooContext, run_ranks

import raytrainer as rt
from raytrainer.loop.execute import execute

pytestmark = pytest.mark.timeout(120)


class Gathers(LinearModel):
    def __init__(self):
        super().__init__()
        self.gathered = []

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        rank = torch.tensor([float(self.global_rank)])
        self.gathered.append(self.all_gather({"rank": rank, "pair": (rank, 2 * rank)}))
        together = self.all_gather(loss, sync_grads=True)  # (world,) and differentiable
        return together.sum()


def test_all_gather_in_one_process_returns_the_data_as_lightning_does(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    model = Gathers()
    make_trainer(tmp_path, max_steps=1).fit(model, loader())

    class Theirs(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer, self.gathered = torch.nn.Linear(2, 1), []

        def training_step(self, batch, batch_idx):
            self.gathered.append(self.all_gather({"rank": torch.tensor([0.0])}))
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    theirs = Theirs()
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False, default_root_dir=str(tmp_path)).fit(theirs, loader())
    assert model.gathered[0]["rank"].shape == theirs.gathered[0]["rank"].shape == (1,)


def test_all_gather_on_two_ranks_stacks_every_ranks_data_and_carries_gradients(tmp_path):
    def rank_fn(rank, world_size):
        model = Gathers()
        execute(make_trainer(tmp_path, max_steps=2), "fit", model, None, {"train": loader(n=8)}, None,
                GlooContext(rank, world_size))
        return model.gathered, [p.grad is not None for p in model.parameters()]
    for gathered, has_grads in run_ranks(rank_fn):
        assert torch.equal(gathered[0]["rank"], torch.tensor([[0.0], [1.0]]))
        assert torch.equal(gathered[0]["pair"][1], torch.tensor([[0.0], [2.0]]))
        assert all(has_grads)  # the gathered loss was differentiable


def test_logger_freeze_unfreeze_and_dtype(tmp_path):
    seen = {}

    class Model(LinearModel):
        def on_fit_start(self):
            seen["logger"], seen["loggers"] = self.logger, self.loggers

    csv = rt.loggers.CSVLogger()
    trainer = make_trainer(tmp_path, logger=csv)
    model = Model()
    assert model.logger is None and model.loggers == [] and model.dtype == torch.float32
    trainer.fit(model, loader())
    assert seen["logger"] is csv and seen["loggers"] == [csv]
    model.freeze()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert model.double().dtype == torch.float64


class GanCode:
    """Lightning's GAN template reduced: two optimizers stepped by hand, each step with only its
    network's parameters requiring grad (toggle_optimizer), the handles being real optimizers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gen, self.disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        self.automatic_optimization = False
        self.seen = []

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        self.seen.append((isinstance(opt_g, torch.optim.Adam), isinstance(opt_d, torch.optim.SGD)))
        self.toggle_optimizer(opt_g)
        self.seen.append(([p.requires_grad for p in self.gen.parameters()],
                          [p.requires_grad for p in self.disc.parameters()]))
        g_loss = self.disc(self.gen(batch[0])).mean()
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        with self.toggled_optimizer(opt_d):
            d_loss = torch.nn.functional.mse_loss(self.disc(self.gen(batch[0]).detach()), batch[1])
            self.manual_backward(d_loss)
            opt_d.step()
            opt_d.zero_grad()
        self.seen.append([p.requires_grad for p in self.parameters()])

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), lr=0.01), torch.optim.SGD(self.disc.parameters(), lr=0.1)


def test_toggle_optimizer_and_optimizer_handles_as_in_lightning(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    ours = type("Ours", (GanCode, rt.Module), {})()
    theirs = type("Theirs", (GanCode, pl.LightningModule), {})()
    trainer = make_trainer(tmp_path)
    trainer.fit(ours, loader(8))
    pl_trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)
    pl_trainer.fit(theirs, loader(8))
    assert ours.seen == theirs.seen and ours.seen[1] == ([True, True], [False, False])
    assert (trainer.global_step, len(ours.seen)) == (pl_trainer.global_step, len(theirs.seen)) == (4, 6)  # manual: each optimizer step counts
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b)


class Renamed(LinearModel):
    """A layer renamed since the checkpoint was written: on_load_checkpoint renames the keys
    before the weights load (Lightning's order)."""

    def __init__(self):
        super().__init__()
        self.renamed = self.layer
        del self.layer
        self.order = []

    def loss(self, batch):
        return torch.nn.functional.mse_loss(self.renamed(batch[0]), batch[1])

    def on_load_checkpoint(self, checkpoint):
        self.order.append("on_load_checkpoint")
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith("layer.")]:
            sd["renamed." + key[len("layer."):]] = sd.pop(key)


def test_on_load_checkpoint_runs_before_the_weights_load(tmp_path):
    trainer = make_trainer(tmp_path, enable_checkpointing=True)
    old = LinearModel()
    trainer.fit(old, loader())
    new = Renamed()
    make_trainer(tmp_path, name="eval").validate(new, loader(), ckpt_path=trainer.checkpoint_callback.last_model_path
                                                  or trainer.checkpoint_callback.best_model_path, verbose=False)
    assert new.order == ["on_load_checkpoint"]
    torch.testing.assert_close(new.renamed.weight, old.layer.weight)
