"""Ray Data input pipeline: parquet files -> ``ray.data.read_parquet`` -> ``rt.RayDataLoader`` ->
2 DDP workers on an embedded local Ray, each iterating its own shard of the rows read from the files.

    python examples/ray_data_parquet.py [--devices 2] [--max-epochs 10] [--data-dir DIR]

A synthetic tabular regression (8 float columns ``x0..x7`` and a target ``y = x @ w +
0.5 sin(2 x0) + noise``, noise std 0.1) is written with pyarrow as 8 training files of 1,024 rows
and one validation file of 1,024 rows, into a temporary folder or ``--data-dir`` (reused when it
already holds them). A small MLP learns it.

Expected (seed 0, 2 CPU cores): final ``val_loss`` < 0.05 after 10 epochs (the noise floor is
0.01; predicting the mean scores 3.3; the same model and batches in one process reach 0.019), the
same value recomputed in this process from the returned weights (``driver_val_mse``), and
``launcher=ray workers=2`` in the first output line. Row order inside each worker's local shuffle
buffer is not seeded, so the loss varies a little from run to run.

Only ``launcher="ray"``: raytrainer's in-process launcher does not iterate an ``rt.RayDataLoader``
(Ray Datasets are handed to Ray Train, which shards them across workers). On a multi-node cluster
the files must be readable from every node: ``--data-dir`` on shared storage (or an ``s3://``
prefix written by another job).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn

import raytrainer as rt

FEATURES = [f"x{i}" for i in range(8)]
TRAIN_FILES, ROWS_PER_FILE, VAL_ROWS = 8, 1024, 1024


def synthetic_table(rows: int, seed: int):
    """``rows`` rows of 8 standard-normal features and a target with a nonlinear term."""
    import pyarrow as pa

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, len(FEATURES), generator=g)
    w = torch.linspace(-1.0, 1.0, len(FEATURES))  # the same true weights for every file
    y = x @ w + 0.5 * torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(rows, generator=g)
    columns = {name: pa.array(x[:, i].numpy()) for i, name in enumerate(FEATURES)}
    columns["y"] = pa.array(y.numpy())
    return pa.table(columns)  # float32 columns: what the model consumes, no cast needed


def write_dataset(data_dir: str) -> tuple[str, str]:
    """Write ``train/part-0000{0..7}.parquet`` and ``val/part-00000.parquet`` unless present."""
    import pyarrow.parquet as pq

    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    for folder, files, rows, seed in ((train_dir, TRAIN_FILES, ROWS_PER_FILE, 0), (val_dir, 1, VAL_ROWS, 1000)):
        os.makedirs(folder, exist_ok=True)
        for i in range(files):
            path = os.path.join(folder, f"part-{i:05d}.parquet")
            if not os.path.exists(path):
                pq.write_table(synthetic_table(rows, seed + i), path)
    return train_dir, val_dir


class ParquetData(rt.DataModule):
    """Ray Datasets over parquet folders.

    ``ray_datasets = True`` tells the Ray launcher to call ``*_dataloader()`` on the driver, after
    it has started (or connected to) Ray and before the workers start: Ray Train must own the
    datasets to shard them. Each worker then iterates its shard as dicts of tensors.
    """

    ray_datasets = True

    def __init__(self, train_dir: str, val_dir: str, batch_size: int = 64):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        import ray.data
        # Read and decode the files once and keep the rows in Ray's object store: every epoch
        # then iterates memory (a lazy read_parquet restarts a streaming read per epoch, seconds
        # each on 2 cores). Drop .materialize() for data larger than the cluster's memory.
        ds = ray.data.read_parquet(self.hparams.train_dir).materialize()
        # Ray keeps float64 for numpy float64 columns; these are float32 already, the dtype makes
        # that explicit. A local shuffle buffer mixes rows across the files each worker reads.
        return rt.RayDataLoader(ds, batch_size=self.hparams.batch_size, dtypes=torch.float32,
                                local_shuffle_buffer_size=4 * self.hparams.batch_size)

    def val_dataloader(self):
        import ray.data
        # Not split: every worker evaluates the whole (small) validation set; with sync_dist the
        # logged mean is that same value.
        return rt.RayDataLoader(ray.data.read_parquet(self.hparams.val_dir).materialize(), batch_size=256,
                                dtypes=torch.float32)


class TabularMLP(rt.Module):
    def __init__(self, hidden: int = 64, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(len(FEATURES), hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)

    def _loss(self, batch: dict) -> torch.Tensor:
        # A Ray Data batch is a dict of column -> tensor (batch_size,): stack the feature columns.
        x = torch.stack([batch[name] for name in FEATURES], dim=1)
        return nn.functional.mse_loss(self(x), batch["y"])

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def driver_mse(model: TabularMLP, val_dir: str) -> float:
    """The validation MSE of ``model`` computed here, reading the parquet file with pyarrow (no
    Ray): checks the weights that came back from the workers."""
    import pyarrow.parquet as pq

    table = pq.read_table(val_dir)
    x = torch.stack([torch.tensor(table[name].to_numpy()) for name in FEATURES], dim=1)
    y = torch.tensor(table["y"].to_numpy())
    model.eval()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--data-dir", default=None, help="where the parquet files go (default: a temp dir)")
    p.add_argument("--storage-path", default="./raytrainer_runs")
    p.add_argument("--name", default="ray-data-parquet")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rt-parquet-") as tmp:
        train_dir, val_dir = write_dataset(args.data_dir or tmp)
        trainer = rt.Trainer(
            launcher="ray", devices=args.devices, max_epochs=args.max_epochs, seed=0,
            log_every_n_steps=10, storage_path=args.storage_path, name=args.name,
            callbacks=[rt.callbacks.ModelCheckpoint(monitor="val_loss", save_top_k=1, save_last=True)])
        model = TabularMLP()
        result = trainer.fit(model, datamodule=ParquetData(train_dir, val_dir, args.batch_size))
        check = driver_mse(model, val_dir)
    print(f"ray_data_parquet: epochs={result.current_epoch} steps={result.global_step} "
          f"train_loss={result.metrics.get('train_loss', float('nan')):.4f} "
          f"val_loss={result.metrics.get('val_loss', float('nan')):.4f} driver_val_mse={check:.4f}")
    print(f"  best checkpoint: {result.best_checkpoint}\n  logs: {result.log_dir}")
    return {"fit": result, "driver_val_mse": check}


if __name__ == "__main__":
    main()
