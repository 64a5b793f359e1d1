"""Checkpoint integrity: atomic commit, verified and safe loading, retention, save schedules.

Everything runs in-process (``launcher="local"``) on local disk, and on ``memory://`` where the
behaviour is storage-independent. Assertions are about what is on storage: which ``step=....ckpt``
files exist, which are committed (sealed), and what loading them does.
"""
from __future__ import annotations

import io
import os
import shlex
import time
import uuid

import fsspec
import pytest
import torch
from torch import nn

import raytrainer as rt
from raytrainer.checkpoint import format as ckpt_format
from raytrainer.checkpoint import sealed
from raytrainer.checkpoint import store as ckpt_io
from raytrainer import storage

from helpers import LinearModel, ScriptedValModel, as_legacy_folder, flat_params, loader

# loader(): 10 samples, batch_size 4 -> 3 optimizer steps per epoch; validation after each epoch
# is saved at the step boundary step=3, 6, 9, ... (no "-epoch_end" suffix).


def _step(n: int, epoch_end: bool = False, sharded: bool = False) -> str:
    return ckpt_format.checkpoint_dir_name(n, epoch_end, sharded)


def _trainer(storage_path, callbacks=(), name="run", **kwargs) -> rt.Trainer:
    kwargs.setdefault("max_epochs", 3)
    kwargs.setdefault("logger", False)
    return rt.Trainer(launcher="local", storage_path=str(storage_path), name=name,
                      enable_progress_bar=False, accelerator="cpu", seed=0,
                      callbacks=list(callbacks), **kwargs)


def _root(storage_path, name="run") -> str:
    return storage.join(storage.normalize(str(storage_path)), name, "checkpoints")


def _folders(storage_path, name="run") -> list[str]:
    """Names of what is in the checkpoints folder (committed or not)."""
    fs, path = storage.filesystem(_root(storage_path, name))
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def _committed(storage_path, name="run") -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in ckpt_io.list_committed(_root(storage_path, name))]


def _uri(storage_path, folder, name="run") -> str:
    return storage.join(_root(storage_path, name), folder)


def _read(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    return fs.cat_file(path)


def _write(uri: str, data: bytes) -> None:
    fs, path = storage.filesystem(uri)
    fs.pipe_file(path, data)


def _exists(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.exists(path)


class StartStep(rt.Callback):
    """Records the global step each fit starts at (after any resume)."""

    def __init__(self):
        self.starts: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.starts.append(trainer.global_step)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    """A storage_path on local disk or in fsspec's (process-global) memory filesystem."""
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    prefix = f"integrity-{uuid.uuid4().hex[:10]}"
    yield f"memory://{prefix}"
    fs = fsspec.filesystem("memory")
    for key in [k for k in fs.store if k.lstrip("/").startswith(prefix)]:
        fs.store.pop(key, None)
    fs.pseudo_dirs[:] = [d for d in fs.pseudo_dirs if not d.lstrip("/").startswith(prefix)]


def _every_step(**kwargs):
    return rt.callbacks.ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, **kwargs)


# ---------------------------------------------------------------- atomic commit

class InjectedFailure(Exception):
    pass


@pytest.fixture
def no_retry_delay(monkeypatch):
    """Commit retries without waiting (a persistent failure fails fast)."""
    from raytrainer.checkpoint.writer import RetryPolicy
    monkeypatch.setattr(RetryPolicy, "delays", lambda self: iter([0.0] * (self.attempts - 1)))


@pytest.mark.parametrize("async_checkpoint", [True, False], ids=["async", "sync"])
def test_interrupted_save_is_never_resumed_from(store, monkeypatch, no_retry_delay, async_checkpoint):
    """A save that dies while writing step 3's file (every retry fails, as when the process is
    killed there) leaves at most a temp file, never a file under the checkpoint's name: "last"
    picks the previous committed one, and step 3 is refused as missing."""
    real, calls = ckpt_io.write_atomically, []

    def dying_write(fs, path, data):
        calls.append(path)
        if path.endswith(_step(3)):
            fs.pipe_file(f"{path}.tmp-0dead0ff", data[: len(data) // 2])  # what a killed writer leaves
            raise InjectedFailure("simulated crash while writing the checkpoint")
        real(fs, path, data)

    monkeypatch.setattr(ckpt_io, "write_atomically", dying_write)
    with pytest.raises(Exception, match="simulated crash while writing the checkpoint"):
        _trainer(store, [_every_step()], max_steps=5, async_checkpoint=async_checkpoint).fit(
            LinearModel(), loader(shuffle=True))
    monkeypatch.setattr(ckpt_io, "write_atomically", real)
    assert calls and all(not c.endswith(_step(4)) and not c.endswith(_step(5)) for c in calls)

    torn = _uri(store, _step(3))
    assert _folders(store) == [_step(1), _step(2), f"{_step(3)}.tmp-0dead0ff"]
    assert _committed(store) == [_step(1), _step(2)]
    with pytest.raises(rt.CheckpointError, match="does not exist"):
        rt.load_checkpoint(torn)
    with pytest.raises(rt.CheckpointError, match="does not exist"):
        _trainer(store, [_every_step()], max_steps=5).fit(LinearModel(), loader(shuffle=True), ckpt_path=torn)

    # "last" resumes from step 2 (the dead temp file is not a checkpoint) and ends exactly like a
    # run that never crashed.
    starts = StartStep()
    resumed = LinearModel()
    result = _trainer(store, [_every_step(), starts], max_steps=5, async_checkpoint=async_checkpoint).fit(
        resumed, loader(shuffle=True), ckpt_path="last")
    assert starts.starts == [2]
    assert result.global_step == 5
    assert _committed(store) == [_step(n) for n in range(1, 6)]  # step 3 re-saved, committed now
    # the next fit removed the dead writer's temp file (local disk: object stores have none)
    assert (f"{_step(3)}.tmp-0dead0ff" in _folders(store)) == store.startswith("memory://")

    straight = LinearModel()
    _trainer(store, [_every_step()], name="straight", max_steps=5).fit(straight, loader(shuffle=True))
    assert torch.equal(flat_params(straight), flat_params(resumed))


# ---------------------------------------------------------------- verified load

@pytest.fixture
def fitted(store):
    """A run with committed checkpoints at steps 3 and 6; returns (store, [uri3, uri6])."""
    _trainer(store, [rt.callbacks.ModelCheckpoint(save_top_k=-1)], max_epochs=2).fit(
        LinearModel(), loader(), loader())
    assert _committed(store) == [_step(3), _step(6)]
    return store, [_uri(store, _step(3)), _uri(store, _step(6))]


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_flipped_byte_is_detected_and_named(fitted, where):
    store, (_, last) = fitted
    data = bytearray(_read(last))
    data[int(len(data) * where)] ^= 0x01  # in a tensor, the pickled structure, or the archive's index
    _write(last, bytes(data))

    with pytest.raises(rt.CheckpointError, match=f"{_step(6)}.*corrupted"):
        rt.load_checkpoint(last)
    # Resuming from it fails loudly too, naming the file (never a silent fresh start).
    with pytest.raises(rt.CheckpointError, match=_step(6)):
        _trainer(store, max_epochs=3).fit(LinearModel(), loader(), loader(), ckpt_path="last")


def test_truncated_and_missing_files_are_detected(fitted):
    store, (first, last) = fitted
    data = _read(last)
    _write(last, data[: len(data) // 2])  # a copy cut short: its seal is gone
    assert ckpt_io.read_marker(last) is None and _committed(store) == [_step(3)]
    with pytest.raises(rt.CheckpointError, match="not a committed raytrainer checkpoint"):
        rt.load_checkpoint(last)
    fs, path = storage.filesystem(first)
    fs.rm(path)
    with pytest.raises(rt.CheckpointError, match="does not exist"):
        rt.load_checkpoint(first)


@pytest.mark.parametrize("garbage", [b"", b'{"raytrainer_commit": 1, "sha2', b"\x00\xff\xfe garbage",
                                     b"[1, 2, 3]", b'"committed"', b'{"sha256": "00", "size": 10}'],
                         ids=["empty", "truncated", "binary", "list", "string", "no-key"])
def test_torn_commit_seal_is_not_committed_and_skipped_by_last(fitted, garbage):
    """The archive intact, its seal (the zip comment) replaced: not a checkpoint."""
    store, (first, last) = fitted
    data = _read(last)
    meta = sealed.read_seal(data[-sealed.tail_size():])
    body = data[: meta["size"] + 20]  # up to the end record's comment-length field
    _write(last, body + len(garbage).to_bytes(2, "little") + garbage)
    assert torch.load(io.BytesIO(_read(last)), weights_only=True)["global_step"] == 6  # still a valid archive
    assert ckpt_io.read_marker(last) is None
    with pytest.raises(rt.CheckpointError, match="not a committed raytrainer checkpoint"):
        rt.load_checkpoint(last)
    assert ckpt_io.latest_committed(_trainer(store).cfg) == first
    starts = StartStep()
    _trainer(store, [starts], max_epochs=3).fit(LinearModel(), loader(), loader(), ckpt_path="last")
    assert starts.starts == [3]


def test_a_seal_copied_from_another_checkpoint_does_not_match(fitted):
    _, (first, last) = fitted
    theirs = _read(first)
    seal_of_first = theirs[sealed.read_seal(theirs[-sealed.tail_size():])["size"]:]
    ours = _read(last)
    _write(last, ours[: sealed.read_seal(ours[-sealed.tail_size():])["size"]] + seal_of_first)
    with pytest.raises(rt.CheckpointError, match="corrupted"):
        rt.load_checkpoint(last)


def test_the_folder_format_before_ckpt_files_still_loads_resumes_and_is_verified(fitted):
    """Checkpoints written before .ckpt files (folders with model.pt, state.pt, rank files and
    COMMIT.json) load with a deprecation warning, resume, and keep their hash checks."""
    store, (first, last) = fitted
    if store.startswith("memory://"):
        pytest.skip("the folder is rewritten on local disk (tests/helpers.py)")
    folder = as_legacy_folder(last)
    assert _committed(store) == [_step(3), _step(6, sharded=True)]
    with pytest.warns(DeprecationWarning, match="the format before .ckpt files"):
        assert rt.load_checkpoint(folder)["global_step"] == 6
    starts = StartStep()
    _trainer(store, [starts], max_epochs=3).fit(LinearModel(), loader(), loader(), ckpt_path="last")
    assert starts.starts == [6]

    data = bytearray(_read(f"{folder}/model.pt"))
    data[len(data) // 2] ^= 0x01
    _write(f"{folder}/model.pt", bytes(data))
    with pytest.raises(rt.CheckpointError, match="model.pt is corrupted"):
        rt.load_checkpoint(folder)
    _write(f"{folder}/{ckpt_io.COMMIT_FILE}", b'{"format_version": 1, "fi')
    assert ckpt_io.read_marker(folder) is None
    with pytest.raises(rt.CheckpointError, match="not committed"):
        rt.load_checkpoint(folder)


# ---------------------------------------------------------------- weights_only: no code execution

class _Payload:
    """Unpickling this runs a shell command that creates ``path``: proof of code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


def _malicious(path) -> bytes:
    buf = io.BytesIO()
    torch.save({"global_step": 6, "innocent": torch.zeros(2), "evil": _Payload(path)}, buf)
    return buf.getvalue()


def test_payload_would_execute_without_weights_only(tmp_path):
    """Control: the payload is live (an unsafe load runs it), so the refusal below means something."""
    marker = tmp_path / "control-pwned"
    torch.load(io.BytesIO(_malicious(marker)), weights_only=False)
    assert marker.exists()


def test_malicious_pickle_with_a_valid_seal_is_refused(fitted, tmp_path):
    store, (_, last) = fitted
    marker = tmp_path / "pwned"
    _write(last, sealed.seal(_malicious(marker), {"global_step": 6, "epoch": 1}))  # the seal matches
    assert ckpt_io.read_marker(last)["global_step"] == 6  # committed, as far as the seal says

    with pytest.raises(rt.CheckpointError, match="weights_only") as err:
        rt.load_checkpoint(last)
    assert _step(6) in str(err.value)
    with pytest.raises(rt.CheckpointError, match="weights_only"):
        _trainer(store, max_epochs=3).fit(LinearModel(), loader(), loader(), ckpt_path="last")
    with pytest.raises(rt.CheckpointError, match="weights_only"):
        _trainer(store).validate(LinearModel(), loader(), ckpt_path=last, verbose=False)
    assert not marker.exists(), "the pickle payload ran"


# ---------------------------------------------------------------- a checkpoint of another model

class WiderModel(LinearModel):
    def __init__(self):
        super().__init__(features=3)


class RenamedModel(LinearModel):
    def __init__(self):
        super().__init__()
        self.head = self.layer
        del self.layer

    def forward(self, x):
        return self.head(x)


def test_checkpoint_of_another_model_names_shapes(fitted):
    store, (_, last) = fitted
    with pytest.raises(rt.CheckpointError) as err:
        _trainer(store).validate(WiderModel(), loader(features=3), ckpt_path=last, verbose=False)
    msg = str(err.value)
    assert "WiderModel" in msg and "shape mismatch" in msg
    assert "layer.weight: checkpoint (1, 2) vs model (1, 3)" in msg
    with pytest.raises(rt.CheckpointError, match=r"layer\.weight: checkpoint \(1, 2\) vs model \(1, 3\)"):
        _trainer(store, max_epochs=3).fit(WiderModel(), loader(features=3), ckpt_path=last)


def test_checkpoint_of_another_model_names_keys(fitted):
    store, (_, last) = fitted
    with pytest.raises(rt.CheckpointError) as err:
        _trainer(store).test(RenamedModel(), loader(), ckpt_path=last, verbose=False)
    msg = str(err.value)
    assert "missing keys ['head.bias', 'head.weight']" in msg
    assert "unexpected keys ['layer.bias', 'layer.weight']" in msg


# ---------------------------------------------------------------- retention (ModelCheckpoint)

def _fit_scripted(tmp_path, values, trainer_kwargs=None, **ckpt_kwargs):
    ckpt = rt.callbacks.ModelCheckpoint(monitor="val_loss", **ckpt_kwargs)
    trainer = _trainer(tmp_path, [ckpt], max_epochs=len(values), **(trainer_kwargs or {}))
    result = trainer.fit(ScriptedValModel(values), loader(), loader())
    return ckpt, result


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1] if path else ""


def test_topk_min_keeps_the_k_best(tmp_path):
    ckpt, result = _fit_scripted(tmp_path, [3.0, 1.0, 2.0, 0.5, 5.0], save_top_k=2)
    assert _folders(tmp_path) == [_step(6), _step(12)]
    assert _committed(tmp_path) == [_step(6), _step(12)]
    assert _name(ckpt.best_model_path) == _step(12) and ckpt.best_model_score == 0.5
    assert {_name(p): s for p, s in ckpt.best_k_models.items()} == {_step(6): 1.0, _step(12): 0.5}
    assert ckpt.last_model_path == ""
    assert _name(result.best_checkpoint) == _step(12)


def test_topk_tie_with_the_worst_kept_keeps_the_older(tmp_path):
    """A new score equal to the k-th best is not an improvement: the older checkpoint stays."""
    ckpt, _ = _fit_scripted(tmp_path, [1.0, 2.0, 2.0, 2.0], save_top_k=2)
    assert _folders(tmp_path) == [_step(3), _step(6)]
    assert _name(ckpt.best_model_path) == _step(3) and ckpt.best_model_score == 1.0


def test_topk_tie_for_best_keeps_the_older_as_best(tmp_path):
    ckpt, _ = _fit_scripted(tmp_path, [2.0, 1.0, 1.0], save_top_k=3)
    assert _folders(tmp_path) == [_step(3), _step(6), _step(9)]
    assert _name(ckpt.best_model_path) == _step(6) and ckpt.best_model_score == 1.0


def test_topk_evicts_the_oldest_of_equal_worst(tmp_path):
    """Two kept checkpoints tie for worst: the oldest is evicted (Lightning's order)."""
    ckpt, _ = _fit_scripted(tmp_path, [2.0, 2.0, 1.0], save_top_k=2)
    assert _folders(tmp_path) == [_step(6), _step(9)]
    assert _name(ckpt.best_model_path) == _step(9)


def test_topk_mode_max(tmp_path):
    ckpt, _ = _fit_scripted(tmp_path, [1.0, 3.0, 2.0, 0.0, 3.0], save_top_k=1, mode="max")
    assert _folders(tmp_path) == [_step(6)]
    assert _name(ckpt.best_model_path) == _step(6) and ckpt.best_model_score == 3.0


def test_save_last_is_kept_outside_topk(tmp_path):
    ckpt, result = _fit_scripted(tmp_path, [1.0, 2.0, 3.0], save_top_k=1, save_last=True)
    # step 6 was 'last' after epoch 1 and deleted once step 9 took over; step 3 is the best.
    assert _folders(tmp_path) == [_step(3), _step(9)]
    assert _name(ckpt.best_model_path) == _step(3) and ckpt.best_model_score == 1.0
    assert _name(ckpt.last_model_path) == _step(9)
    assert (_name(result.best_checkpoint), _name(result.last_checkpoint)) == (_step(3), _step(9))


@pytest.mark.parametrize("async_checkpoint", [True, False], ids=["async", "sync"])
def test_evicted_files_are_deleted_only_after_the_new_commit(tmp_path, monkeypatch, async_checkpoint):
    deletions = []
    real_delete = ckpt_io.delete

    def spying_delete(uri, storage_options=None):
        newest = ckpt_io.list_committed(_root(tmp_path))[-1]
        # At deletion time the checkpoint that replaces it is already committed on storage.
        deletions.append((_name(uri), _name(newest), ckpt_io.read_marker(newest) is not None))
        real_delete(uri, storage_options)

    monkeypatch.setattr(ckpt_io, "delete", spying_delete)
    _fit_scripted(tmp_path, [3.0, 2.0, 1.0, 4.0], {"async_checkpoint": async_checkpoint},
                  save_top_k=1, save_last=True)
    # epoch 1: step 6 beats step 3 (evicted, and no longer last); epoch 2: step 9 beats step 6;
    # epoch 3: step 12 is only 'last', step 9 stays as the best.
    assert deletions == [(_step(3), _step(6), True), (_step(6), _step(9), True)]
    assert _folders(tmp_path) == [_step(9), _step(12)]


def test_two_checkpoint_callbacks_saving_at_one_boundary_both_retain(tmp_path):
    best = rt.callbacks.ModelCheckpoint(monitor="val_loss", save_top_k=1)
    last = rt.callbacks.ModelCheckpoint(monitor="val_loss", mode="max", save_top_k=0, save_last=True)
    _trainer(tmp_path, [best, last], max_epochs=3, async_checkpoint=False).fit(
        ScriptedValModel([3.0, 2.0, 1.0]), loader(), loader())
    assert _name(best.best_model_path) == _name(last.last_model_path) == _step(9)
    assert _folders(tmp_path) == [_step(9)]


def test_save_top_k_all(tmp_path):
    ckpt, result = _fit_scripted(tmp_path, [3.0, 1.0, 2.0], save_top_k=-1)
    assert _folders(tmp_path) == [_step(3), _step(6), _step(9)]
    assert _name(ckpt.best_model_path) == _step(6)
    assert [_name(u) for u in result.checkpoints] == [_step(3), _step(6), _step(9)]


def test_save_top_k_zero_with_save_last_keeps_only_last(tmp_path):
    ckpt, _ = _fit_scripted(tmp_path, [3.0, 1.0, 2.0], save_top_k=0, save_last=True)
    assert _folders(tmp_path) == [_step(9)]
    assert (ckpt.best_model_path, ckpt.best_model_score) == ("", None)
    assert _name(ckpt.last_model_path) == _step(9)


def test_save_top_k_zero_without_last_saves_nothing(tmp_path):
    _fit_scripted(tmp_path, [3.0, 1.0], save_top_k=0)
    assert _folders(tmp_path) == []


# ---------------------------------------------------------------- when to save

def test_every_n_train_steps(tmp_path):
    ckpt = rt.callbacks.ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)
    _trainer(tmp_path, [ckpt], max_epochs=3).fit(LinearModel(), loader(), loader())
    assert _folders(tmp_path) == [_step(2), _step(4), _step(6), _step(8)]


def test_every_n_epochs(tmp_path):
    ckpt = rt.callbacks.ModelCheckpoint(every_n_epochs=2, save_top_k=-1)
    _trainer(tmp_path, [ckpt], max_epochs=5).fit(LinearModel(), loader(), loader())
    assert _folders(tmp_path) == [_step(6), _step(12)]


class SlowModel(LinearModel):
    def training_step(self, batch, batch_idx):
        time.sleep(0.03)
        return super().training_step(batch, batch_idx)


def test_train_time_interval_elapsed_saves_each_step(tmp_path):
    ckpt = rt.callbacks.ModelCheckpoint(train_time_interval=0.001, save_top_k=-1)
    _trainer(tmp_path, [ckpt], max_steps=4).fit(SlowModel(), loader(), loader())
    assert _folders(tmp_path) == [_step(n) for n in (1, 2, 3, 4)]


def test_train_time_interval_not_elapsed_saves_nothing(tmp_path):
    import datetime

    ckpt = rt.callbacks.ModelCheckpoint(train_time_interval=datetime.timedelta(hours=1), save_top_k=-1)
    _trainer(tmp_path, [ckpt], max_steps=4).fit(SlowModel(), loader(), loader())
    assert _folders(tmp_path) == []


def test_save_on_train_epoch_end(tmp_path):
    ckpt = rt.callbacks.ModelCheckpoint(monitor="val_loss", save_on_train_epoch_end=True, save_top_k=-1)
    _trainer(tmp_path, [ckpt], max_epochs=2).fit(ScriptedValModel([2.0, 1.0]), loader(), loader())
    assert _folders(tmp_path) == [_step(3, True), _step(6, True)]
    assert ckpt.best_model_path.endswith("step=000000006-epoch_end.ckpt") and ckpt.best_model_score == 1.0


def test_no_validation_saves_at_epoch_end(tmp_path):
    ckpt = rt.callbacks.ModelCheckpoint(save_top_k=-1)
    _trainer(tmp_path, [ckpt], max_epochs=2).fit(LinearModel(), loader())
    assert _folders(tmp_path) == [_step(3, True), _step(6, True)]


# ---------------------------------------------------------------- ckpt_path for evaluation

@pytest.mark.parametrize("stage", ["validate", "test"])
def test_ckpt_path_best_loads_the_best_weights(tmp_path, stage):
    ckpt, _ = _fit_scripted(tmp_path, [1.0, 2.0, 3.0], save_top_k=1, save_last=True)
    best, last = ckpt.best_model_path, ckpt.last_model_path
    assert (_name(best), _name(last)) == (_step(3), _step(9))
    best_sd = rt.load_checkpoint(best)["state_dict"]
    last_sd = rt.load_checkpoint(last)["state_dict"]
    assert not torch.equal(best_sd["layer.weight"], last_sd["layer.weight"])

    model = LinearModel(seed=123)  # fresh weights, and a new Trainer: "best" is read from storage
    seen = {}

    class Peek(rt.Callback):
        def on_validation_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

        on_test_start = on_validation_start

    trainer = _trainer(tmp_path, [Peek()], enable_checkpointing=False)
    out = getattr(trainer, stage)(model, loader(), ckpt_path="best", verbose=False)[0]
    for key, value in best_sd.items():
        assert torch.equal(seen[key], value), key
        assert torch.equal(model.state_dict()[key], value), key
    if stage == "test":
        x, y = loader().dataset.tensors
        with torch.no_grad():
            expected = nn.functional.mse_loss(x @ best_sd["layer.weight"].T + best_sd["layer.bias"], y)
        # batch-size-weighted mean over the loader's batches equals the full-data MSE
        assert out["test_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_ckpt_path_best_without_a_monitor_is_an_error(tmp_path):
    _trainer(tmp_path, [rt.callbacks.ModelCheckpoint(save_top_k=0, save_last=True)], max_epochs=1).fit(
        LinearModel(), loader(), loader())
    with pytest.raises(ValueError, match="ckpt_path='best'"):
        _trainer(tmp_path, enable_checkpointing=False).validate(LinearModel(), loader(), ckpt_path="best")


@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_missing_ckpt_path_names_the_path(store, stage):
    missing = storage.join(storage.normalize(store), "nope", "checkpoints", _step(42))
    trainer = _trainer(store, enable_checkpointing=False, max_epochs=1)
    with pytest.raises(rt.CheckpointError, match="does not exist") as err:
        if stage == "fit":
            trainer.fit(LinearModel(), loader(), ckpt_path=missing)
        else:
            getattr(trainer, stage)(LinearModel(), loader(), ckpt_path=missing, verbose=False)
    assert missing in str(err.value)


# ---------------------------------------------------------------- storage failures: retry, then raise

@pytest.fixture
def recorded_backoff(monkeypatch):
    """The retry waits of checkpoint commits, recorded instead of slept: the real default
    RetryPolicy runs, and the test takes no time."""
    import types

    from raytrainer.checkpoint import writer as checkpoint_writer
    waits: list[float] = []
    monkeypatch.setattr(checkpoint_writer, "time", types.SimpleNamespace(
        sleep=waits.append, perf_counter=time.perf_counter))
    return waits


def _failing(monkeypatch, name: str, times: int | None, at: str) -> list[str]:
    """Make writing checkpoint ``name`` raise OSError: the first ``times`` attempts, or always
    (None); ``at`` "write" (the bytes never reach storage) or "rename" (a local temp file is
    written, then its rename fails; on object stores, the one PUT fails)."""
    calls: list[str] = []
    real_write = ckpt_io.write_atomically

    def flaky(fs, path, data):
        if path.endswith(name):
            calls.append(path)
            if times is None or len(calls) <= times:
                if at == "rename" and type(fs).__name__ == "LocalFileSystem":
                    def failing_mv(*args, **kwargs):
                        raise OSError(f"simulated storage outage #{len(calls)}")
                    original, fs.mv = fs.mv, failing_mv
                    try:
                        return real_write(fs, path, data)
                    finally:
                        fs.mv = original
                raise OSError(f"simulated storage outage #{len(calls)}")
        return real_write(fs, path, data)

    monkeypatch.setattr(ckpt_io, "write_atomically", flaky)
    return calls


@pytest.mark.parametrize("at", ["write", "rename"])
@pytest.mark.parametrize("async_checkpoint", [True, False], ids=["async", "sync"])
def test_transient_storage_failure_is_retried_with_backoff_and_commits(
        store, monkeypatch, rt_log, recorded_backoff, async_checkpoint, at):
    """Step 2's commit fails twice, then storage recovers: the commit is retried after 0.5 s and
    1 s (the default exponential backoff), lands, and training goes on; a failed rename leaves no
    temp file behind."""
    calls = _failing(monkeypatch, _step(2), times=2, at=at)
    result = _trainer(store, [_every_step()], max_steps=4, async_checkpoint=async_checkpoint).fit(
        LinearModel(), loader(shuffle=True))

    assert result.global_step == 4  # training finished
    assert len(calls) == 3          # two failures, then the attempt that succeeded
    assert recorded_backoff == [0.5, 1.0]
    assert _committed(store) == [_step(n) for n in range(1, 5)] == _folders(store)  # no temp file left
    state = rt.load_checkpoint(_uri(store, _step(2)))  # hash verified: the retry wrote it whole
    assert state["global_step"] == 2
    out = rt_log.text
    retries = [line for line in out.splitlines() if "retrying in" in line]
    assert len(retries) == 2, out
    assert all(_step(2) in line and "OSError: simulated storage outage" in line for line in retries)
    assert "retrying in 0.5s" in retries[0] and "retrying in 1.0s" in retries[1]

    # The retried checkpoint resumes exactly: from step 2 to 4 equals the straight run.
    resumed = LinearModel()
    _trainer(store, name="resumed", max_steps=4, enable_checkpointing=False).fit(
        resumed, loader(shuffle=True), ckpt_path=_uri(store, _step(2)))
    straight = LinearModel()
    _trainer(store, name="straight", max_steps=4, enable_checkpointing=False).fit(straight, loader(shuffle=True))
    assert torch.equal(flat_params(resumed), flat_params(straight))


@pytest.mark.parametrize("at", ["write", "rename"])
@pytest.mark.parametrize("async_checkpoint", [True, False], ids=["async", "sync"])
def test_permanent_failure_of_the_final_checkpoint_raises_at_fit_end(
        store, monkeypatch, rt_log, recorded_backoff, async_checkpoint, at):
    """The *last* save of a fit never commits: fit raises CheckpointUploadError naming it (a
    synchronous commit at the save; an asynchronous one when fit waits for it after the loop has
    ended: never dropped), and the previous
    checkpoint, which retention would have deleted once step 3 committed, is still there and
    loadable. (A permanent failure mid-fit, raised at the next save, is
    test_interrupted_save_is_never_resumed_from.)"""
    from raytrainer.checkpoint.writer import CheckpointUploadError

    class TrainEnd(rt.Callback):
        ended = False

        def on_train_end(self, trainer, pl_module):
            TrainEnd.ended = True

    calls = _failing(monkeypatch, _step(3), times=None, at=at)
    keep_one = rt.callbacks.ModelCheckpoint(every_n_train_steps=1, save_top_k=1)
    with pytest.raises(CheckpointUploadError) as err:
        _trainer(store, [keep_one, TrainEnd()], max_steps=3, async_checkpoint=async_checkpoint).fit(
            LinearModel(), loader(shuffle=True))
    msg = str(err.value)
    assert _uri(store, _step(3)) in msg and "failed after 5 attempts" in msg
    assert "OSError: simulated storage outage" in msg
    assert len(calls) == 5 and recorded_backoff == [0.5, 1.0, 2.0, 4.0]
    assert TrainEnd.ended == async_checkpoint  # async: the loop finished, the failure surfaced after
    assert rt_log.text.count("retrying in") == 4

    # step 1 was evicted after step 2 committed; step 2 survives step 3's failed commit.
    assert _committed(store) == [_step(2)]
    assert rt.load_checkpoint(_uri(store, _step(2)))["global_step"] == 2
    assert _folders(store) == [_step(2)]  # nothing of step 3, not even a temp file
    with pytest.raises(rt.CheckpointError, match="does not exist"):
        rt.load_checkpoint(_uri(store, _step(3)))
    monkeypatch.undo()  # storage works again: "last" resumes from step 2
    starts = StartStep()
    result = _trainer(store, [starts], max_steps=3, enable_checkpointing=False).fit(
        LinearModel(), loader(shuffle=True), ckpt_path="last")
    assert starts.starts == [2] and result.global_step == 3
