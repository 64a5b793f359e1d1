"""Exact evaluation and prediction on 2 Ray Train workers: torch loaders and Ray Datasets, every
sample once, numbers equal to one process (the loop's side: tests/loop/test_exact_evaluation.py)."""
import signal

import pytest
import torch
from exact_eval_models import N, Classifier, assert_close, data, eval_loader, one_process, ray_rows

import raytrainer as rt

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

DTYPES = {"x": torch.float32, "y": torch.int64}


def test_two_workers_test_and_predict_exactly_over_101_samples(ray_cluster, tmp_path):
    """Validation inside a 2-worker fit: test_ray_train.py's DDP test (one fit for both)."""
    import ray.data
    trainer = rt.Trainer(devices=2, seed=0, storage_path=str(tmp_path), name="exact", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False)
    model = Classifier()
    # test on a Ray Dataset and a torch loader at once: Ray's split of evaluation data drops no row
    # and repeats none; the two loaders' values are kept apart (name/dataloader_idx_N, Lightning's),
    # the torchmetrics accuracy computed over both (it syncs itself across the workers)
    tested = trainer.test(model, [rt.RayDataLoader(ray.data.from_items(ray_rows()), batch_size=10, dtypes=DTYPES),
                                  eval_loader()])
    assert len(tested) == 2 and "test_count/dataloader_idx_1" in tested[1]
    for idx, got in enumerate(tested):
        assert_close({k.replace(f"/dataloader_idx_{idx}", ""): v for k, v in got.items()}, one_process(model, "test"))

    # predict on both workers, a torch loader and a Ray Dataset: in dataset order on the driver
    by_loader, by_dataset = trainer.predict(model, [eval_loader(), rt.RayDataLoader(
        ray.data.from_items(ray_rows()), batch_size=10, dtypes=DTYPES)])
    with torch.no_grad():
        expected = model(data().tensors[0])
    for predictions in (by_loader, by_dataset):
        assert torch.allclose(torch.cat([p["logits"] for p in predictions]), expected, atol=1e-6)
        ranks = torch.cat([p["rank"].reshape(1).expand(len(p["logits"])) for p in predictions])
        assert set(ranks.tolist()) == {0, 1}  # both workers did part of the work
    assert len(by_loader) == 11 and [len(p["logits"]) for p in by_loader][-1] == 1  # one process's batches
    assert sum(len(p["logits"]) for p in by_dataset) == N
    # Ray Train's SIGINT handler served during test()/predict() only: Ctrl-C is the user's again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
