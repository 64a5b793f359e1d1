"""Exact evaluation across ranks: every sample once, numbers equal to one process.

The ranks are real gloo ranks in forked processes (multirank.py), running the loop's own
``execute`` as a Ray Train worker would; the Ray path itself is covered by
tests/runtime/test_exact_evaluation_ray.py. The reference is always one process evaluating the
same 101 samples with the same weights.
"""
from __future__ import annotations

import pytest
import torch
from exact_eval_models import N, Classifier, assert_close, data, eval_loader, one_process
from helpers import make_trainer
from multirank import GlooContext, RankFailed, run_ranks
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

import raytrainer as rt
from raytrainer.loop.evaluate import merge_predictions
from raytrainer.loop.execute import execute
from raytrainer.loop.loaders import EvalShard

pytestmark = pytest.mark.timeout(120)

# ---------------------------------------------------------------- the sharding itself

@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_hold_every_batch_of_one_process_exactly_once(world_size):
    one = [list(b) for b in BatchSampler(SequentialSampler(range(N)), 10, False)]
    shards = [EvalShard(BatchSampler(SequentialSampler(range(N)), 10, False), world_size, r)
              for r in range(world_size)]
    placed = {}
    for rank, shard in enumerate(shards):
        batches = list(shard)
        assert len(batches) == len(shard)
        for local, indices in enumerate(batches):
            placed[shard.global_batch_idx(local)] = indices
    assert [placed[i] for i in range(len(one))] == one  # no batch twice, none missing, none padded
    assert sorted(len(s) for s in shards)[-1] - sorted(len(s) for s in shards)[0] <= 1


# ---------------------------------------------------------------- validate / test / predict on 2 ranks

def _evaluate_on_ranks(tmp_path, stage: str, n: int = N, **trainer_kwargs):
    def rank_fn(rank, world_size):
        trainer = make_trainer(tmp_path, **trainer_kwargs)
        kind = {"validate": "val", "test": "test", "predict": "predict"}[stage]
        out = execute(trainer, stage, Classifier(), None, {kind: eval_loader(n)}, None,
                      GlooContext(rank, world_size))
        return out
    return run_ranks(rank_fn)


def test_validate_and_test_on_two_ranks_equal_one_process(tmp_path):
    for stage, prefix in (("validate", "val"), ("test", "test")):
        outs = _evaluate_on_ranks(tmp_path, stage)
        expected = one_process(Classifier(), prefix)
        for out in outs:  # synced values are the same on every rank
            assert_close(out["metrics"], expected)


def test_a_rank_without_a_single_batch_neither_hangs_nor_counts(tmp_path):
    outs = _evaluate_on_ranks(tmp_path, "validate", n=5)  # one batch: rank 1 sees nothing
    for out in outs:
        assert_close(out["metrics"], {k: v for k, v in one_process(Classifier(), "val", n=5).items()
                                      if k != "val_acc"})
    assert outs[0]["metrics"]["val_acc"] == pytest.approx(one_process(Classifier(), "val", n=5)["val_acc"])


def test_predict_on_two_ranks_returns_every_batch_in_dataset_order(tmp_path):
    outs = _evaluate_on_ranks(tmp_path, "predict")
    merged = merge_predictions([out["predictions"] for out in outs])
    expected = [Classifier()(x) for x, _ in eval_loader()]
    assert len(merged) == len(expected) == 11
    assert all(torch.allclose(got["logits"], want) for got, want in zip(merged, expected))
    assert [int(got["rank"]) for got in merged] == [0, 1] * 5 + [0]  # both ranks did part of it


def test_validation_inside_fit_is_exact_under_ddp_and_fsdp(tmp_path):
    for strategy in ("ddp", "fsdp"):
        def rank_fn(rank, world_size, strategy=strategy):
            trainer = make_trainer(tmp_path / strategy, strategy=strategy)
            model = Classifier()
            out = execute(trainer, "fit", model, None,
                          {"train": DataLoader(data(40, seed=1), batch_size=8), "val": eval_loader()}, None,
                          GlooContext(rank, world_size))
            return out["metrics"], trainer.strategy.model_state_dict()
        (metrics, weights), _ = run_ranks(rank_fn)
        model = Classifier()
        model.load_state_dict(weights)  # validation ran after the last step: these weights
        assert_close(metrics, one_process(model, "val"))


# ---------------------------------------------------------------- what goes wrong, clearly

class RankOwnKeys(Classifier):
    def validation_step(self, batch, batch_idx):
        self.log(f"only_on_rank{self.global_rank}", 1.0, sync_dist=True)


def test_different_keys_on_different_ranks_is_an_error_naming_them_not_a_hang(tmp_path):
    def rank_fn(rank, world_size):
        trainer = make_trainer(tmp_path)
        execute(trainer, "validate", RankOwnKeys(), None, {"val": eval_loader()}, None,
                GlooContext(rank, world_size))
    with pytest.raises(RankFailed) as info:
        run_ranks(rank_fn, timeout_s=30)
    message = str(info.value.__cause__)
    assert isinstance(info.value.__cause__, ValueError)
    assert "rank 0: only_on_rank0" in message and "rank 1: only_on_rank1" in message
    assert "validation_step" in message


class RecordsIndices(Classifier):
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.seen += batch[0][:, 0].tolist()


def test_use_distributed_sampler_false_keeps_the_users_own_sharding(tmp_path):
    x = data().tensors[0][:, 0].tolist()

    def rank_fn(rank, world_size):
        trainer = make_trainer(tmp_path, use_distributed_sampler=False)
        mine = list(range(rank * 60, min(N, rank * 60 + 60)))  # the user's split: 60 / 41
        loader = DataLoader(data(), batch_size=7, sampler=mine)
        model = RecordsIndices()
        out = execute(trainer, "validate", model, None, {"val": loader}, None, GlooContext(rank, world_size))
        return out["metrics"], model.seen
    (m0, seen0), (_, seen1) = run_ranks(rank_fn)
    assert seen0 == x[:60] and seen1 == x[60:]
    assert m0["val_count"] == N
    assert m0["val_loss"] == pytest.approx(one_process(Classifier(), "val")["val_loss"], abs=1e-5)


def test_a_shuffled_evaluation_loader_is_read_in_order_across_ranks_with_a_warning():
    loader = DataLoader(data(), batch_size=10, shuffle=True)
    from raytrainer.loop.loaders import shard_eval_loader
    with pytest.warns(UserWarning, match="read in order"):
        shards = [shard_eval_loader(loader, 2, r) for r in range(2)]
    seen = sorted(i for s in shards for b in s.batch_sampler for i in b)
    assert seen == list(range(N))


def test_a_rank_without_validation_batches_keeps_step_with_the_others_in_fit(tmp_path):
    """The notebook's case: a validation set of one batch on 2 ranks. Rank 1 evaluates nothing,
    yet decides as rank 0 does (ModelCheckpoint saves after the validation, not at the epoch's
    end): both report the largest shard in num_val_batches, and the fit does not hang."""
    def rank_fn(rank, world_size):
        trainer = make_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[
            rt.callbacks.ModelCheckpoint(monitor="val_acc", mode="max", save_last=True)])
        model = Classifier()
        out = execute(trainer, "fit", model, None, {"train": DataLoader(data(40, seed=1), batch_size=8),
                                                     "val": eval_loader(batch_size=N)}, None,
                      GlooContext(rank, world_size))
        return out["metrics"], trainer.num_val_batches, trainer.strategy.model_state_dict()
    (m0, sizes0, weights), (m1, sizes1, _) = run_ranks(rank_fn)
    assert sizes0 == sizes1 == [1]
    model = Classifier()
    model.load_state_dict(weights)
    assert_close(m0, one_process(model, "val"))
    assert m1["val_count"] == N
