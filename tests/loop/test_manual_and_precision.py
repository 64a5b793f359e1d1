"""Manual optimization (GAN-style, two optimizers) and mixed precision on CPU."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import raytrainer as rt
from helpers import LinearModel, flat_params, loader, make_trainer
from raytrainer.loop.precision import check_precision_supported


# ---------------------------------------------------------------- manual optimization

class GAN(rt.Module):
    """A least-squares GAN on 2-d points: D step then G step on every batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.g = nn.Linear(2, 2)
        self.d = nn.Linear(2, 1)
        self.stepped: list[str] = []

    @staticmethod
    def losses(g, d, x):
        z = x.flip(1) * 0.5  # deterministic "noise" so a hand loop can replay it
        fake = g(z)
        loss_d = ((d(x) - 1) ** 2).mean() + (d(fake.detach()) ** 2).mean()
        return z, loss_d

    def training_step(self, batch, batch_idx):
        x = batch[0]
        opt_g, opt_d = self.optimizers()
        z, loss_d = self.losses(self.g, self.d, x)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

        loss_g = ((self.d(self.g(z)) - 1) ** 2).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.log_dict({"loss_d": loss_d, "loss_g": loss_g}, prog_bar=True)

    def on_before_optimizer_step(self, optimizer):
        self.stepped.append("g" if optimizer.param_groups[0]["params"][0] is self.g.weight else "d")

    def configure_optimizers(self):
        return [torch.optim.SGD(self.g.parameters(), lr=0.05),
                torch.optim.SGD(self.d.parameters(), lr=0.1, momentum=0.9)]


def test_manual_optimization_gan_matches_hand_loop(tmp_path):
    model = GAN()
    g, d = copy.deepcopy(model.g), copy.deepcopy(model.d)
    g0, d0 = flat_params(model.g), flat_params(model.d)
    dl = loader(n=12, batch_size=4)
    trainer = make_trainer(tmp_path, max_epochs=2, log_every_n_steps=1)
    result = trainer.fit(model, dl)

    opt_g = torch.optim.SGD(g.parameters(), lr=0.05)
    opt_d = torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for x, _ in dl:
            z, loss_d = GAN.losses(g, d, x)
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = ((d(g(z)) - 1) ** 2).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()

    assert not torch.equal(g0, flat_params(model.g)) and not torch.equal(d0, flat_params(model.d))
    torch.testing.assert_close(flat_params(model.g), flat_params(g))
    torch.testing.assert_close(flat_params(model.d), flat_params(d))
    assert result.global_step == 12  # 6 batches x 2 optimizer steps
    assert model.stepped == ["d", "g"] * 6
    assert trainer.callback_metrics["loss_g"].item() == pytest.approx(loss_g.item(), rel=1e-5)
    assert trainer.progress_bar_metrics.keys() == {"loss_d", "loss_g"}


def test_manual_optimization_with_one_optimizer_and_module_clip_gradients(tmp_path):
    class Manual(LinearModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.norms = []

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()  # one optimizer: the handle itself, not a list
            loss = self.loss(batch) * 1000
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=0.1, gradient_clip_algorithm="norm")
            self.norms.append(torch.linalg.vector_norm(
                torch.cat([p.grad.reshape(-1) for p in self.parameters()])).item())
            opt.step()

    model = Manual()
    result = make_trainer(tmp_path, max_epochs=1).fit(model, loader(n=8, batch_size=4))
    assert result.global_step == 2
    assert model.norms == [pytest.approx(0.1, rel=1e-4)] * 2


def test_manual_optimization_without_stepping_keeps_weights_and_step(tmp_path):
    class NoStep(LinearModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.train_calls += 1
            self.manual_backward(self.loss(batch))

    model = NoStep()
    w0 = flat_params(model)
    result = make_trainer(tmp_path, max_epochs=2).fit(model, loader(n=8, batch_size=4))
    assert (model.train_calls, result.global_step) == (4, 0)
    assert torch.equal(w0, flat_params(model))


@pytest.mark.parametrize("kwargs,match", [
    ({"gradient_clip_val": 1.0}, r"gradient_clip_val=1\.0.*manual optimization"),
    ({"accumulate_grad_batches": 2}, r"accumulate_grad_batches=2.*manual optimization"),
])
def test_manual_optimization_rejects_automatic_only_arguments(tmp_path, kwargs, match):
    """Lightning raises here too: the loop would silently ignore these in manual optimization."""
    model = GAN()
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, **kwargs).fit(model, loader())
    assert model.stepped == []


# ---------------------------------------------------------------- precision

class _DtypeSpy:
    """Forward hook recording the output dtype of an nn.Linear (train and eval)."""

    def __init__(self, layer: nn.Module):
        self.dtypes: list[torch.dtype] = []
        layer.register_forward_hook(lambda mod, inp, out: self.dtypes.append(out.dtype))


def _precision_fit(tmp_path, precision, steps=6):
    model = LinearModel(lr=0.05)
    spy = _DtypeSpy(model.layer)
    w0 = flat_params(model)
    trainer = make_trainer(tmp_path, precision=precision, max_steps=steps, max_epochs=None,
                           limit_val_batches=1)
    trainer.fit(model, loader(n=8, batch_size=2), loader(n=4, batch_size=2))
    return model, trainer, spy, w0


def test_bf16_mixed_runs_matmuls_in_bf16_and_keeps_fp32_weights(tmp_path):
    model, trainer, spy, w0 = _precision_fit(tmp_path, "bf16-mixed")
    assert trainer.precision == "bf16-mixed"
    assert len(spy.dtypes) == 6 + 1  # 6 training forwards, 1 validation forward
    assert set(spy.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(w0, flat_params(model))
    assert trainer.callback_metrics["val_loss"].dtype == torch.float32


def test_32_true_runs_in_fp32(tmp_path):
    _, _, spy, _ = _precision_fit(tmp_path, "32")  # Lightning's short form
    assert set(spy.dtypes) == {torch.float32}


def test_16_mixed_on_cpu_uses_fp16_and_a_grad_scaler(tmp_path):
    try:
        check_precision_supported("16-mixed", "cpu")
    except ValueError as e:
        pytest.skip(str(e))
    model, trainer, spy, w0 = _precision_fit(tmp_path, 16, steps=8)
    assert trainer.precision == "16-mixed"
    assert set(spy.dtypes) == {torch.float16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(w0, flat_params(model))
    scaler = trainer._run.precision.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() > 0


def test_16_mixed_gradients_seen_by_hooks_are_unscaled(tmp_path):
    """on_before_optimizer_step sees true gradients: the same as an fp32 run's, up to fp16 error."""
    try:
        check_precision_supported("16-mixed", "cpu")
    except ValueError as e:
        pytest.skip(str(e))
    from helpers import GradsBeforeStep

    # Small outputs and targets: scaled by GradScaler's initial 2**16 the fp16 gradients stay
    # finite, so the first step is not skipped.
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 0.01 * x.sum(1, keepdim=True)),
                                     batch_size=4)
    grads = {}
    for precision in ("32-true", "16-mixed"):
        cb = GradsBeforeStep()
        model = LinearModel()
        with torch.no_grad():
            model.layer.weight.mul_(0.01)
            model.layer.bias.mul_(0.01)
        make_trainer(tmp_path / precision, precision=precision, max_steps=1, max_epochs=None,
                     callbacks=[cb]).fit(model, dl)
        grads[precision] = torch.cat([g.reshape(-1) for g in cb.grads[0]])
    assert grads["32-true"].abs().max() > 1e-3
    torch.testing.assert_close(grads["16-mixed"], grads["32-true"], rtol=2e-2, atol=1e-4)


def test_manual_optimization_under_bf16(tmp_path):
    model = GAN()
    spy = _DtypeSpy(model.d)
    g0 = flat_params(model.g)
    result = make_trainer(tmp_path, precision="bf16-mixed").fit(model, loader(n=8, batch_size=4))
    assert result.global_step == 4
    assert set(spy.dtypes) == {torch.bfloat16}
    assert not torch.equal(g0, flat_params(model.g))


def test_16_mixed_clips_unscaled_gradients(tmp_path):
    """Clipping after unscale: the stepped gradients have the clip norm, not 1/65536 of it."""
    try:
        check_precision_supported("16-mixed", "cpu")
    except ValueError as e:
        pytest.skip(str(e))
    from helpers import SpySGD

    spy = {}

    def factory(params):
        spy["opt"] = SpySGD(params, lr=1e-3)
        return spy["opt"]

    model = LinearModel(optimizer_factory=factory)
    make_trainer(tmp_path, precision="16-mixed", gradient_clip_val=0.5, max_steps=8, max_epochs=None).fit(
        model, loader(n=16, batch_size=2))
    assert spy["opt"].grads  # GradScaler skips steps whose gradients overflowed, not all of them
    for grads in spy["opt"].grads:
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])).item()
        assert norm == pytest.approx(0.5, rel=1e-3)  # the raw norms are > 1 here


def test_manual_optimization_gan_under_16_mixed(tmp_path):
    try:
        check_precision_supported("16-mixed", "cpu")
    except ValueError as e:
        pytest.skip(str(e))
    model = GAN()
    spy = _DtypeSpy(model.g)
    g0, d0 = flat_params(model.g), flat_params(model.d)
    trainer = make_trainer(tmp_path, precision="16-mixed", max_epochs=3)
    result = trainer.fit(model, loader(n=8, batch_size=4))
    assert result.global_step == 12
    assert set(spy.dtypes) == {torch.float16}
    assert not torch.equal(g0, flat_params(model.g)) and not torch.equal(d0, flat_params(model.d))
    assert trainer._run.precision.scaler.get_scale() > 0
