"""launcher="ray": the same loop in Ray Train workers (real embedded Ray, gloo on CPU)."""
import hashlib
import json
import os
import signal

import pytest
import ray
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import raytrainer as rt

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


class Indexed(Dataset):
    """Sample i is (features, target, i): the index tells which worker saw which sample."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class SlowOnRank1(Indexed):
    """Loading is slow on rank 1 only: a straggler the profiler must name."""

    def __getitem__(self, i):
        import time

        import torch.distributed as dist
        if dist.is_initialized() and dist.get_rank() == 1:
            time.sleep(0.01)
        return super().__getitem__(i)


class Recorder(rt.Module):
    def __init__(self, out_dir=None, kill_at=None, fail=False):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.out_dir, self.kill_at, self.fail = out_dir, kill_at, fail
        self.seen = []

    def training_step(self, batch, batch_idx):
        if self.fail:
            raise ValueError("boom in training_step")  # the user's line the driver must show
        x, y, idx = batch if isinstance(batch, (list, tuple)) else (batch["x"], batch["y"], batch["i"])
        self.seen.extend(idx.tolist())
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("rank_mean", float(self.global_rank), on_step=False, on_epoch=True, sync_dist=True)
        self.log("rank_local", float(self.global_rank), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, idx = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)
        self.log("val_count", float(len(idx)), reduce_fx="sum", sync_dist=True)

    def prepare_data(self):
        self._note("prepare_data")

    def setup(self, stage):
        self._note("setup")

    def _note(self, hook):
        if self.out_dir:  # one line per call, from whichever worker process made it
            with open(os.path.join(self.out_dir, f"{hook}.calls"), "a") as f:
                f.write(f"{os.getpid()} {self.global_rank}\n")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.kill_at is not None and self.global_rank == 1 and self.global_step == self.kill_at:
            marker = os.path.join(self.out_dir, "killed")
            if not os.path.exists(marker):  # only the first attempt dies
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self):
        if self.out_dir:
            torch.save({"seen": self.seen, "steps": self.global_step},
                       os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class HookedRecorder(Recorder):
    """Lightning's step hooks on Ray workers: an LR warm-up in optimizer_step, a batch-transfer
    hook, configure_model, strategy.broadcast and all_gather; what each worker saw goes to its
    rank file."""

    def __init__(self, out_dir):
        super().__init__(out_dir=out_dir)
        self.hooked = {"lrs": [], "transfers": [], "configure_model": 0, "sanity": 0}

    def on_fit_start(self):
        self.hooked["broadcast"] = self.trainer.strategy.broadcast({"from": self.global_rank})

    def on_train_epoch_end(self):
        self.hooked["gathered"] = self.all_gather({"rank": torch.tensor([float(self.global_rank)])})

    def configure_model(self):
        self.hooked["configure_model"] += 1
        # what this worker was started with: a runtime_env (its own or inherited from the
        # controller) means a second Python start through Ray's setup_worker.py
        self.hooked["runtime_env"] = dict(ray.get_runtime_context().runtime_env)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.hooked["transfers"].append((self.trainer.training, dataloader_idx))
        self.hooked["sanity"] += self.trainer.sanity_checking
        return batch

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * min(1.0, (self.trainer.global_step + 1) / 2)
        self.hooked["lrs"].append(optimizer.param_groups[0]["lr"])
        optimizer.step(closure=optimizer_closure)

    def on_train_end(self):
        super().on_train_end()
        torch.save(self.hooked, os.path.join(self.out_dir, f"hooked{self.global_rank}.pt"))


def _trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 2)
    kw.setdefault("devices", 2)
    kw.setdefault("logger", False)
    return rt.Trainer(seed=0, storage_path=str(tmp_path), name="ray", enable_progress_bar=False, **kw)


def test_num_nodes_multiplies_the_workers_as_lightning_multiplies_processes():
    from raytrainer.runtime.ray_train import worker_layout
    assert worker_layout(rt.Trainer(devices=2, num_nodes=3, accelerator="cpu").cfg, 0) == (False, 6)
    assert worker_layout(rt.Trainer(devices="auto", accelerator="auto").cfg, 4) == (True, 4)


def test_ddp_two_workers_disjoint_shards_synced_metrics_weights_and_profile(ray_cluster, tmp_path):
    """Also profiled (one fit pays Ray's fixed cost for all): rank 1 loads its data slowly, and
    the simple profiler's table names it as the rank that waited longest for data. And its
    validation set of 101 samples (no even split on 2 workers) is evaluated exactly: every sample
    once, the loss what one process computes (tests/runtime/test_exact_evaluation_ray.py: test and
    predict)."""
    model = HookedRecorder(out_dir=str(tmp_path))
    os.makedirs(tmp_path / "logs" / "csv" / "version_0")  # an earlier run's
    logger = rt.loggers.CSVLogger(str(tmp_path / "logs"), name="csv")
    trainer = _trainer(tmp_path, max_epochs=1, profiler="simple", logger=logger)
    result = trainer.fit(
        model, DataLoader(SlowOnRank1(), batch_size=8, shuffle=True), DataLoader(Indexed(101), batch_size=10))
    assert result.metrics["val_count"] == 101
    with torch.no_grad():  # validation ran after the last step: the weights the caller holds
        one_process = nn.functional.mse_loss(model.net(Indexed(101).x), Indexed(101).y).item()
    assert result.metrics["val_loss"] == pytest.approx(one_process, abs=1e-5)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert sorted(r0["seen"] + r1["seen"]) == list(range(64))  # each sample exactly once
    assert not set(r0["seen"]) & set(r1["seen"])
    assert r0["steps"] == r1["steps"] == result.global_step == 4  # 32 samples per rank / 8
    assert result.metrics["rank_mean"] == pytest.approx(0.5)  # sync_dist: global mean of 0 and 1
    assert result.metrics["rank_local"] == 0.0                 # rank 0's own value
    # prepare_data once per node (one node here), setup in each worker process
    assert len((tmp_path / "prepare_data.calls").read_text().splitlines()) == 1
    setups = (tmp_path / "setup.calls").read_text().splitlines()
    assert sorted(line.split()[1] for line in setups) == ["0", "1"] and len({line.split()[0] for line in setups}) == 2
    committed = rt.load_checkpoint(result.last_checkpoint)["state_dict"]
    exported = torch.load(trainer.save_checkpoint(str(tmp_path / "final.ckpt")), weights_only=True)
    assert exported["global_step"] == 4 and sorted(exported["rank_states"]) == [0, 1]
    for k, v in model.state_dict().items():  # the caller's model holds the final weights
        assert torch.equal(v, committed[k]) and torch.equal(v, exported["state_dict"][k])
    wait = result.profile["slowest_rank_data_wait"]
    assert wait["rank"] == 1 and wait["seconds"] >= 32 * 0.01  # 32 samples on rank 1
    assert "slowest rank data wait: rank 1" in result.profile["table"]
    assert (tmp_path / "ray" / "profiler" / "simple.txt").exists()
    # The logger's next version was chosen on the driver: rank 0 wrote there, and the checkpoint
    # recorded it (a resume of this run writes on there)
    assert logger.log_dir == str(tmp_path / "logs" / "csv" / "version_1")
    assert sorted(os.listdir(tmp_path / "logs" / "csv")) == ["version_0", "version_1"]
    assert (tmp_path / "logs" / "csv" / "version_1" / "metrics.csv").exists()
    marker = rt.checkpoint.read_marker(result.last_checkpoint)
    assert marker["logger_versions"] == [{"logger": "CSVLogger", "name": "csv", "version": 1}]
    # Lightning's hooks ran on both workers: the warm-up, every batch through the transfer hook
    # (4 training, 2 sanity-check and this rank's validation batches), configure_model once
    for rank, val_batches in ((0, 6), (1, 5)):  # 101 samples in batches of 10: 11 batches, interleaved
        hooked = torch.load(tmp_path / f"hooked{rank}.pt")
        assert hooked["lrs"] == [0.025, 0.05, 0.05, 0.05] and hooked["configure_model"] == 1
        # the distributed helpers Lightning code calls, on real Ray workers
        assert hooked["broadcast"] == {"from": 0}
        assert torch.equal(hooked["gathered"]["rank"], torch.tensor([[0.0], [1.0]]))
        assert hooked["transfers"].count((True, 0)) == 4 and hooked["sanity"] == 2
        assert hooked["transfers"].count((False, 0)) == 2 + val_batches
        # the embedded cluster has the settings in its environment: neither the controller nor
        # the workers get a runtime_env for them (runtime/ray_internals.py)
        assert hooked["runtime_env"] == {}, hooked["runtime_env"]


def test_fsdp_worker_sigkill_resumes_bit_identical_from_sharded_checkpoints(ray_cluster, tmp_path):
    """FSDP2 on 2 workers with sharded (DCP) checkpoints, rank 1 SIGKILLed mid-epoch: the restarted
    workers load their shards and end bit-identical to the run never killed (FSDP with full
    checkpoints on 2 gloo ranks: the same loop, without a second Ray fit).
    (DDP's SIGKILL resume: test_ray_data_resume.py and test_chaos.py.)"""
    from multirank import fit_on_ranks

    from raytrainer.checkpoint import store as ckpt_io
    from raytrainer.config import TrainerConfig

    every_step = [rt.callbacks.ModelCheckpoint(every_n_train_steps=1, save_top_k=1)]
    data = DataLoader(Indexed(), batch_size=8, shuffle=True)

    def recorder():
        torch.manual_seed(0)
        return Recorder()

    # The uninterrupted reference: the same loop on 2 gloo ranks, FSDP with full checkpoints
    straight = fit_on_ranks(lambda: _trainer(tmp_path / "a", strategy="fsdp", callbacks=every_step,
                                             launcher="local", devices=1), recorder, lambda: data)
    # full, unsharded weights in the full checkpoint and in the model
    last = ckpt_io.latest_committed(TrainerConfig(storage_path=str(tmp_path / "a"), name="ray", launcher="local"))
    committed = rt.load_checkpoint(last)["state_dict"]
    assert {k: tuple(v.shape) for k, v in committed.items()} == {"net.weight": (1, 4), "net.bias": (1,)}
    assert all(torch.equal(v, committed[k]) for k, v in straight.items())

    torch.manual_seed(0)
    killed = Recorder(out_dir=str(tmp_path), kill_at=5)
    result = _trainer(tmp_path / "b", max_failures=1, strategy=rt.FSDPStrategy(state_dict_type="sharded"),
                      callbacks=every_step).fit(killed, data)
    assert (tmp_path / "killed").exists()  # the worker really died once
    assert result.global_step == 8
    # resumed from the step-4 checkpoint (the kill came before step 5's), not from scratch
    assert len(torch.load(tmp_path / "rank0.pt")["seen"]) == 4 * 8
    # the caller's model holds the full weights, those of the run never killed
    for (k, v), w in zip(straight.items(), killed.state_dict().values()):
        assert torch.equal(v, w), f"{k} differs after the restart"
    # the sharded checkpoint, assembled in this process from the ranks' shards, holds them too
    _check_sharded_checkpoint(tmp_path / "b", result.last_checkpoint, committed, data)


def _check_sharded_checkpoint(tmp_path, uri, committed, data):
    """Every rank wrote its own DCP shard file, no rank the full model; COMMIT.json lists them
    all with their hashes; the 2-rank checkpoint resumes in one process (launcher="local")."""
    folder = tmp_path / "ray" / "checkpoints" / uri.rstrip("/").rsplit("/", 1)[-1]
    files = json.loads((folder / "COMMIT.json").read_text())["files"]
    shards = {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"}
    assert set(files) == shards | {"state.pt", "rank-00000.pt", "rank-00001.pt"}
    assert not (folder / "model.pt").exists()
    for name in shards:
        blob = (folder / name).read_bytes()
        assert files[name] == {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    at_start = WeightsAtTrainStart()
    alone = Recorder()
    with pytest.warns(UserWarning, match=r"written by 2 worker\(s\) on 1: .* epoch 1 resumes after 8 batches per worker \(4 x 2 saved\)"):
        result = rt.Trainer(launcher="local", max_epochs=3, seed=0, storage_path=str(tmp_path / "local"), name="l",
                            logger=False, enable_progress_bar=False, callbacks=[at_start]).fit(alone, data, ckpt_path=uri)
    assert all(torch.equal(v, committed[k]) for k, v in at_start.weights.items())
    # Step 8 was batch 4 of epoch 1's 4 on each of two ranks: all 64 samples of epoch 1 were
    # trained on. Alone (8 batches an epoch) epoch 1 is therefore over — counting per rank would
    # have retrained 4 of its batches — and epoch 2 runs whole: every sample once, steps 9..16.
    assert result.global_step == 16
    assert sorted(alone.seen) == list(range(64))


class WeightsAtTrainStart(rt.Callback):
    def on_train_start(self, trainer, module):
        self.weights = {k: v.clone() for k, v in module.state_dict().items()}


def test_worker_exception_reaches_driver_with_type_message_and_line(ray_cluster, tmp_path):
    ray_variables = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    with pytest.raises(ValueError, match="boom in training_step") as info:
        _trainer(tmp_path).fit(Recorder(fail=True), DataLoader(Indexed(), batch_size=8))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Ray Train worker rank" in notes
    assert 'raise ValueError("boom in training_step")' in notes
    # Ray's settings were set for the run alone: the caller's environment is as it was.
    assert {k: v for k, v in os.environ.items() if k.startswith("RAY_")} == ray_variables


def test_ray_dataset_on_the_local_launcher(ray_cluster, tmp_path):
    """launcher="local" iterates a RayDataLoader in-process: every row once per epoch."""
    import ray.data
    ds = ray.data.from_items([{"x": [i / 50] * 4, "y": [4 * i / 50], "i": i} for i in range(50)])
    model = Recorder()
    result = rt.Trainer(launcher="local", max_epochs=2, storage_path=str(tmp_path), name="local-ray-data",
                        logger=False, enable_progress_bar=False).fit(
        model, rt.RayDataLoader(ds, batch_size=10, dtypes={"x": torch.float32, "y": torch.float32, "i": torch.int64}))
    assert result.global_step == 10
    assert sorted(model.seen) == sorted(list(range(50)) * 2)


class KillsTheController(Recorder):
    """Rank 0 kills Ray Train's controller process (as the OOM killer would) at its second step."""

    def training_step(self, batch, batch_idx):
        if self.global_rank == 0 and batch_idx == 1:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f.read().startswith(b"ray::TrainController"):
                            os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        return super().training_step(batch, batch_idx)


def test_a_dead_controller_leaves_no_placement_group_and_one_mailbox_serves_every_fit(ray_cluster, tmp_path):
    """raytrainer starts no placement-group cleaner actor per fit (Ray Train's costs a process):
    when the controller dies, the driver removes the workers' placement group itself, so their
    CPUs come back for the next fit. And the driver's mailbox actor is one for all its fits."""
    import time

    import ray
    from ray.util.placement_group import placement_group_table
    with pytest.raises(ray.exceptions.RayActorError):
        _trainer(tmp_path, max_epochs=1).fit(KillsTheController(), DataLoader(Indexed(), batch_size=8))
    assert {pg["state"] for pg in placement_group_table().values()} <= {"REMOVED"}
    deadline = time.monotonic() + 30  # the workers die with their controller, their CPUs come back
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    mailboxes = [name for name in ray.util.list_named_actors() if name.startswith("raytrainer-mailbox-")]
    assert mailboxes == [f"raytrainer-mailbox-{ray.get_runtime_context().get_worker_id()}"]
