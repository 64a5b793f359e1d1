"""Preemption: SIGTERM / Ctrl-C stop at the next step with a committed checkpoint, and the same
command re-run with ckpt_path="last" ends bit-identical to a run that was never stopped."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import raytrainer as rt
from raytrainer.checkpoint import store as ckpt_io
from raytrainer.config import TrainerConfig

from helpers import TESTS_DIR, LinearModel, loader, make_trainer

pytestmark = pytest.mark.timeout(120)
JOB = TESTS_DIR / "preempt_job.py"


class SignalAt(rt.Callback):
    def __init__(self, step, signum=signal.SIGTERM, times=1):
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            for _ in range(self.times):
                # To the main thread itself: the handler runs before the next signal is sent. A
                # process-directed kill may land on another thread (the checkpoint writer) and, on a
                # loaded machine, two of them coalesce into one before Python sees the first.
                signal.pthread_kill(threading.main_thread().ident, self.signum)


def _fit(tmp_path, max_steps, callbacks=(), ckpt_path=None):
    torch.manual_seed(0)
    model = LinearModel()
    trainer = make_trainer(tmp_path, max_steps=max_steps, max_epochs=-1, enable_checkpointing=True,
                           callbacks=list(callbacks))
    trainer.fit(model, loader(40, shuffle=True), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_commits_a_checkpoint_at_the_next_step_and_resume_is_exact(tmp_path, signum, code):
    straight, _ = _fit(tmp_path / "straight", 23)
    before = signal.getsignal(signum)
    with pytest.raises(rt.Preempted) as info:
        _fit(tmp_path / "run", 23, [SignalAt(7, signum)])
    assert signal.getsignal(signum) is before  # handlers restored after the fit
    err = info.value
    assert (err.code, err.global_step, err.reason) == (code, 7, signal.Signals(signum).name)
    # mid-epoch (10 batches per epoch), committed and the newest: what ckpt_path="last" finds
    cfg = TrainerConfig(storage_path=str(tmp_path / "run"), name="run", launcher="local")
    assert err.checkpoint == ckpt_io.latest_committed(cfg)
    assert err.checkpoint.endswith("step=000000007.ckpt")
    assert ckpt_io.load(err.checkpoint)["loops"]["batches_done"] == 7
    assert "ckpt_path='last'" in str(err)
    resumed, trainer = _fit(tmp_path / "run", 23, ckpt_path="last")
    assert trainer.global_step == 23
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_second_signal_aborts_at_once(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, 23, [SignalAt(5, signal.SIGINT, times=2)])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    cfg = TrainerConfig(storage_path=str(tmp_path), name="run", launcher="local")
    assert ckpt_io.latest_committed(cfg) is None  # aborted before any checkpoint


def test_without_checkpointing_the_stop_says_so(tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_steps=20, max_epochs=-1, callbacks=[SignalAt(3)])
    with pytest.raises(rt.Preempted) as info:
        trainer.fit(LinearModel(), loader(40))
    assert info.value.checkpoint is None and info.value.global_step == 3
    assert "no checkpoint" in str(info.value)


def _run_job(tmp_path, name, max_steps, signal_after_step=None, *extra, signum=signal.SIGTERM, to_worker=False):
    """Run preempt_job.py; after ``signal_after_step`` send ``signum`` to the script (the driver)
    or, ``to_worker``, SIGTERM to the rank-1 Ray worker process."""
    progress, weights = tmp_path / f"{name}.progress", tmp_path / f"{name}.pt"
    progress.unlink(missing_ok=True)
    Path(f"{progress}.rank1").unlink(missing_ok=True)
    cmd = [sys.executable, str(JOB), str(tmp_path / "runs"), name, str(max_steps), str(progress),
           str(weights), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=JOB.parent)
    if signal_after_step is not None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            steps = progress.read_text().split() if progress.exists() else []
            if steps and int(steps[-1]) >= signal_after_step:
                if to_worker:
                    os.kill(int(Path(f"{progress}.rank1").read_text().split()[0]), signal.SIGTERM)
                else:
                    proc.send_signal(signum)
                break
            time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out, weights, progress


def test_sigterm_to_the_script_then_the_same_command_resumes_exactly(tmp_path):
    code, out, weights, _ = _run_job(tmp_path, "straight", 30)
    assert code == 0, out
    reference = torch.load(weights)

    code, out, weights, progress = _run_job(tmp_path, "run", 30, signal_after_step=9)
    assert code == 143, out  # 128 + SIGTERM: the scheduler sees a terminated job
    assert "SIGTERM" in out and "Traceback" not in out
    stopped_at = int(progress.read_text().split()[-1])
    assert 9 <= stopped_at < 30 and not weights.exists()
    cfg = TrainerConfig(storage_path=str(tmp_path / "runs"), name="run", launcher="local")
    assert ckpt_io.latest_committed(cfg).endswith(f"step={stopped_at:09d}.ckpt")

    code, out, weights, progress = _run_job(tmp_path, "run", 30)  # the very same command
    assert code == 0, out
    assert int(progress.read_text().split()[0]) == stopped_at + 1  # no step replayed
    for key, value in torch.load(weights).items():
        assert torch.equal(value, reference[key]), key


@pytest.fixture(scope="module")
def ray_reference(tmp_path_factory):
    """The final weights of preempt_job.py's fit on 2 workers for 48 steps, never interrupted:
    the same loop on 2 gloo ranks (a few seconds; a Ray job of it costs 30)."""
    import preempt_job
    from multirank import fit_on_ranks

    tmp_path = tmp_path_factory.mktemp("ray_reference")

    def module():
        torch.manual_seed(0)
        return preempt_job.Net()

    return fit_on_ranks(lambda: preempt_job.trainer(str(tmp_path), "straight", 48, "local", 1, 0, callbacks=[]),
                        module, preempt_job.loader)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_sigterm_to_a_worker_without_restarts_then_ctrl_c_to_the_driver_then_resume_exactly(
        ray_cluster, ray_reference, tmp_path, monkeypatch):
    """One run stopped twice, then finished by the same command, as a scheduler would see it:

    1. SIGTERM to the rank-1 worker process with max_failures=0: nothing would restart the
       workers, so the fit stops with the checkpoint committed and the script exits 143
       (Preempted), like a SIGTERM to the driver;
    2. the same command resumes there; Ctrl-C (SIGINT; SIGTERM takes the same path) to the driver:
       the two DDP workers agree on a step, commit its checkpoint, return; exit 130. Ray Train's
       own SIGINT handler (abort, no checkpoint) must not take over;
    3. the same command resumes there and ends with the weights of a run never interrupted."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    cfg = TrainerConfig(storage_path=str(tmp_path / "runs"), name="run", launcher="ray")
    # 48 steps of >= 50 ms: each stop must reach the workers well before the end
    code, out, _, progress = _run_job(tmp_path, "run", 48, 9, "ray", "2", "0", to_worker=True)
    assert code == 143, out
    assert "training stopped on SIGTERM" in out and "Traceback" not in out, out
    first_stop = int(progress.read_text().split()[-1])
    assert ckpt_io.latest_committed(cfg).endswith(f"step={first_stop:09d}.ckpt") and first_stop < 40

    code, out, weights, progress = _run_job(tmp_path, "run", 48, first_stop + 6, "ray", "2", signum=signal.SIGINT)
    assert code == 130, out
    assert "training stopped on SIGINT" in out and "Traceback" not in out
    steps = [int(s) for s in progress.read_text().split()]
    assert steps[0] == first_stop + 1  # resumed where the worker's SIGTERM stopped it
    committed = ckpt_io.latest_committed(cfg)
    stopped_at = ckpt_io.load(committed)["global_step"]
    # ranks agree every log_every_n_steps (2) steps; both workers' RNG states are in it
    assert stopped_at % 2 == 0 and first_stop + 6 <= stopped_at < 48, out
    assert steps[-1] == stopped_at  # no step after the agreed one
    assert sorted(ckpt_io.load(committed)["rank_states"]) == [0, 1]

    code, out, weights, progress = _run_job(tmp_path, "run", 48, None, "ray", "2")
    assert code == 0, out
    assert int(progress.read_text().split()[0]) == stopped_at + 1
    for key, value in torch.load(weights).items():
        assert torch.equal(value, ray_reference[key]), key


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sigterm_to_one_ray_worker_commits_then_ray_restarts_the_group_with_no_step_lost(ray_cluster, ray_reference, tmp_path, monkeypatch):
    """SIGTERM to the rank-1 worker process (a pod eviction, not the driver): both ranks commit a
    checkpoint at the next agreed step, the workers end, Ray restarts them (max_failures=1) from
    that checkpoint. Every step runs exactly once and the weights equal the uninterrupted run's."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.get_runtime_context().gcs_address)
    code, out, weights, progress = _run_job(tmp_path, "run", 48, 9, "ray", "2", "1", to_worker=True)
    assert code == 0, out
    assert "got SIGTERM" in out and "committed a just-in-time checkpoint" in out, out
    steps = [int(s) for s in progress.read_text().split()]
    assert steps == list(range(1, 49)), steps  # none replayed, none skipped
    pids = Path(f"{progress}.rank1").read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # rank 1 ran in a new process after the restart
    jit = re.search(r"SIGTERM to the worker of rank 1: committed a just-in-time checkpoint (\S+)", out)
    jit_step = ckpt_io.require_committed(jit.group(1))["global_step"]
    assert 10 <= jit_step < 48 and jit_step % 2 == 0, out  # ranks agree every 2 steps
    for key, value in torch.load(weights).items():
        assert torch.equal(value, ray_reference[key]), key
