"""Sharded checkpoints (strategy="fsdp_sharded") in-process: DCP files under the commit protocol.

The 2-worker run (kill, resume bit-identical, one-process load) is
tests/test_ray_train.py::test_worker_sigkill_resumes_bit_identical[fsdp_sharded]. Here, without
Ray: the file table, hash verification of every shard, no unpickling of arbitrary objects (DCP's
own reader would), retries, S3, and FSDP2 shards loaded in place in a one-rank process group.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex

import pytest
import torch
from torch import nn

import raytrainer as rt
from raytrainer.checkpoint import format as ckpt_format
from raytrainer.checkpoint import store as ckpt_io
from raytrainer.checkpoint.writer import CheckpointWriter, RetryPolicy
from raytrainer.loop.strategy import FSDP2Strategy

pytestmark = pytest.mark.timeout(60)

SHARDED = {"sharded/.metadata", "sharded/__0_0.distcp"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def _state(model: nn.Module, optimizer_states: list) -> dict:
    return {"state_dict": model.state_dict(), "optimizer_states": optimizer_states, "global_step": 7,
            "epoch": 1, "rank_state": {"rng": torch.arange(3)}}


def _fqn_optimizer_state(model: nn.Module) -> dict:
    """An SGD state keyed by parameter name, as get_optimizer_state_dict gives it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    return get_optimizer_state_dict(model, opt)


def _files(uri: str) -> dict:
    return json.loads(open(os.path.join(uri, ckpt_io.COMMIT_FILE)).read())["files"]


def _recommit(uri: str, name: str, data: bytes) -> None:
    """Replace ``name`` *and* fix its hash in COMMIT.json: a forged, valid marker."""
    with open(os.path.join(uri, name), "wb") as f:
        f.write(data)
    marker = json.loads(open(os.path.join(uri, ckpt_io.COMMIT_FILE)).read())
    marker["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with open(os.path.join(uri, ckpt_io.COMMIT_FILE), "w") as f:
        json.dump(marker, f)


@pytest.fixture
def saved(tmp_path):
    """A one-process sharded checkpoint (plain tensors: DCP without a process group)."""
    model = _model()
    optimizer = _fqn_optimizer_state(model)
    uri = str(tmp_path / "step=000000007")
    ckpt_io.save(uri, _state(model, [optimizer]), sharded=True)
    return uri, model, optimizer


def test_round_trip_layout_and_full_load(saved):
    uri, model, optimizer = saved
    assert set(_files(uri)) == SHARDED | {"state.pt", "rank-00000.pt"}
    assert not os.path.exists(os.path.join(uri, "model.pt"))
    state = rt.load_checkpoint(uri)
    assert state["global_step"] == 7 and torch.equal(state["rank_states"][0]["rng"], torch.arange(3))
    assert state["state_dict"].keys() == model.state_dict().keys()
    assert all(torch.equal(v, state["state_dict"][k]) for k, v in model.state_dict().items())
    loaded = state["optimizer_states"][0]
    assert loaded["param_groups"] == optimizer["param_groups"]
    assert all(torch.equal(v["momentum_buffer"], loaded["state"][k]["momentum_buffer"])
               for k, v in optimizer["state"].items())
    # the name-keyed optimizer state loads into a plain optimizer (a one-process resume)
    fresh = _model()
    opt = torch.optim.SGD(fresh.parameters(), lr=1.0, momentum=0.0)
    opt.load_state_dict(loaded)
    assert opt.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt.state[fresh[0].weight]["momentum_buffer"], optimizer["state"]["0.weight"]["momentum_buffer"])


_INFO = {"sha256": "0" * 64, "size": 1}


@pytest.mark.parametrize("names, valid", [
    (["model.pt", "state.pt", "rank-00000.pt"], True),
    (["state.pt", "rank-00000.pt", "sharded/.metadata", "sharded/__0_0.distcp", "sharded/__12_3.distcp"], True),
    (["model.pt", "state.pt", "sharded/.metadata", "sharded/__0_0.distcp"], False),  # both layouts
    (["state.pt", "sharded/__0_0.distcp"], False),                                   # shards, no index
    (["state.pt", "sharded/.metadata", "sharded/../model.pt"], False),
    (["state.pt", "sharded/.metadata", "sharded/__0_0.distcp.tmp"], False),
    (["state.pt", "sharded/.metadata.tmp", "sharded/__0_0.distcp"], False),
    (["sharded/.metadata", "sharded/__0_0.distcp"], False),                           # no state.pt
], ids=["full", "sharded", "both", "no-index", "traversal", "tmp-shard", "tmp-index", "no-state"])
def test_file_table_validation(names, valid):
    assert ckpt_format._valid_file_table({n: dict(_INFO) for n in names}) is valid


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_flipped_or_missing_shard_file_is_named(saved, name):
    uri, _, _ = saved
    path = os.path.join(uri, name)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(rt.CheckpointError, match=f"{name} is corrupted"):
        rt.load_checkpoint(uri)
    os.remove(path)
    with pytest.raises(rt.CheckpointError, match=f"missing {name}"):
        rt.load_checkpoint(uri)


class _Payload:
    """Unpickling this runs a shell command that creates ``path``: proof of code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


def test_malicious_metadata_with_valid_hash_is_refused(saved, tmp_path):
    """DCP's .metadata is a pickle; torch 2.13's reader runs pickle.load on it (the control)."""
    from torch.distributed.checkpoint import FileSystemReader
    uri, _, _ = saved
    control, marker = tmp_path / "control-pwned", tmp_path / "pwned"
    _recommit(uri, "sharded/.metadata", pickle.dumps(_Payload(control)))
    with pytest.raises(Exception):
        FileSystemReader(os.path.join(uri, "sharded")).read_metadata()
    assert control.exists(), "control: DCP's own reader unpickles .metadata"

    _recommit(uri, "sharded/.metadata", pickle.dumps(_Payload(marker)))
    with pytest.raises(rt.CheckpointError, match=r"refusing to load .*sharded/\.metadata: .*system is not allowed"):
        rt.load_checkpoint(uri)
    assert not marker.exists(), "the pickle payload ran"


def test_malicious_small_value_is_refused_by_weights_only(tmp_path):
    """Non-tensor entries (learning rates, ...) are torch.save'd by DCP; torch 2.13's planner loads
    them with weights_only=False, ours with weights_only=True."""
    model, marker = _model(), tmp_path / "pwned"
    uri = str(tmp_path / "step=000000007")
    evil = {"state": {}, "param_groups": [{"lr": 0.1, "evil": _Payload(marker), "params": ["0.weight"]}]}
    ckpt_io.save(uri, _state(model, [evil]), sharded=True)
    with pytest.raises(rt.CheckpointError, match="weights_only"):
        rt.load_checkpoint(uri)
    assert not marker.exists(), "the pickle payload ran"


def test_shard_upload_failure_is_retried(tmp_path, monkeypatch):
    import fsspec.implementations.local as local
    real, failed = local.LocalFileSystem.pipe_file, []

    def flaky(self, path, *args, **kwargs):
        if str(path).endswith(".distcp") and not failed:
            failed.append(path)
            raise ConnectionError("injected")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "pipe_file", flaky)
    model, uri = _model(), str(tmp_path / "step=000000007")
    writer = CheckpointWriter(asynchronous=False, policy=RetryPolicy(attempts=2, base_delay_s=0.0))
    ckpt_io.save(uri, _state(model, []), sharded=True, writer=writer)
    assert failed and set(_files(uri)) == SHARDED | {"state.pt", "rank-00000.pt"}
    assert torch.equal(rt.load_checkpoint(uri)["state_dict"]["2.bias"], model[2].bias)


def test_sharded_checkpoint_on_s3(s3_env):
    model = _model()
    uri = f"{s3_env}/run/checkpoints/step=000000007"
    ckpt_io.save(uri, _state(model, [_fqn_optimizer_state(model)]), sharded=True)
    assert set(ckpt_io.require_committed(uri)["files"]) == SHARDED | {"state.pt", "rank-00000.pt"}
    state = rt.load_checkpoint(uri)
    assert all(torch.equal(v, state["state_dict"][k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- FSDP2 shards, one-rank group

@pytest.fixture
def one_rank_group():
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fsdp(model: nn.Module) -> FSDP2Strategy:
    strategy = FSDP2Strategy(model, torch.device("cpu"), sharded=True)
    strategy.setup()
    strategy.set_optimizers([torch.optim.Adam(model.parameters(), lr=0.01)])
    return strategy


def test_fsdp_shards_save_and_load_in_place(tmp_path, one_rank_group):
    strategy = _fsdp(_model())
    opt = strategy.optimizers[0]
    strategy.step_fn("forward")(torch.ones(2, 3)).sum().backward()
    opt.step()
    uri = str(tmp_path / "step=000000001")
    ckpt_io.save(uri, {"state_dict": strategy.checkpoint_model_state(), "global_step": 1,
                       "optimizer_states": strategy.checkpoint_optimizer_states(), "rank_state": {}}, sharded=True)
    assert set(_files(uri)) == SHARDED | {"state.pt", "rank-00000.pt"}
    # clones: on CPU the gathered full state of a one-rank group shares the live tensors' storage
    saved_weights = {k: v.clone() for k, v in strategy.model_state_dict().items()}
    saved_opt = {k: v["exp_avg"].clone() for k, v in strategy.optimizer_state_dicts()[0]["state"].items()}

    strategy.step_fn("forward")(torch.ones(2, 3)).sum().backward()
    opt.step()  # the live state moves on
    assert not torch.equal(strategy.model_state_dict()["0.weight"], saved_weights["0.weight"])
    state = ckpt_io.load(uri, strategy=strategy)
    strategy.load_model_state_dict(state["state_dict"])
    strategy.load_optimizer_state_dicts(state["optimizer_states"])
    now, now_opt = strategy.model_state_dict(), strategy.optimizer_state_dicts()
    assert all(torch.equal(v, now[k]) for k, v in saved_weights.items())
    assert all(torch.equal(v, now_opt[0]["state"][k]["exp_avg"]) for k, v in saved_opt.items())

    other = _fsdp(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)))
    with pytest.raises(rt.CheckpointError,
                       match=r"does not fit Sequential: shape mismatch .*0\.weight: checkpoint \(4, 3\) vs model \(5, 3\)"):
        ckpt_io.load(uri, strategy=other)


def test_strategy_argument_forms():
    assert rt.Trainer(strategy=rt.FSDPStrategy(state_dict_type="sharded"), logger=False).cfg.strategy == "fsdp_sharded"
    assert rt.Trainer(strategy=rt.FSDPStrategy(), logger=False).cfg.strategy == "fsdp"
    assert rt.Trainer(strategy="fsdp_sharded", logger=False).cfg.strategy == "fsdp_sharded"
    with pytest.raises(rt.ConfigError, match=r"FSDPStrategy\(state_dict_type='shard'\) is invalid: expected one of "
                                             r"\['full', 'sharded'\]"):
        rt.FSDPStrategy(state_dict_type="shard")
    assert pickle.loads(pickle.dumps(rt.FSDPStrategy("sharded"))).name == "fsdp_sharded"
