"""rt.sweep on a real Ray Tune: ASHA early stopping, errored trials, PBT exploits, resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import raytrainer as rt
from helpers import TESTS_DIR
from sweep_models import Reg, RegData

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
HERE = str(TESTS_DIR)


def test_asha_sweep_stops_bad_trials_and_survives_a_crashing_one(ray_cluster, tmp_path):
    # best first, so ASHA has good results on record to stop the later, worse trials against
    lrs = [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, -1.0]
    trainer = rt.Trainer(max_epochs=8, storage_path=str(tmp_path), name="asha")
    t0 = time.time()
    sigint_before = signal.getsignal(signal.SIGINT)
    result = rt.sweep(Reg, RegData(), trainer, search_space={"lr": rt.tune.grid_search(lrs)},
                      metric="val_loss", mode="min", scheduler="asha", grace_period=1, reduction_factor=2)
    print(f"ASHA sweep of {len(lrs)} trials x 8 epochs: {time.time() - t0:.1f} s wall")
    # Tune leaves its own SIGINT handler installed after a run; sweep() puts the caller's back
    assert signal.getsignal(signal.SIGINT) is sigint_before
    table = result.table()
    print(result.summary())
    assert len(table) == len(lrs)
    status = dict(zip(table["config/lr"], table["status"]))
    assert status[-1.0] == "errored"                      # the crash did not kill the sweep
    assert status[3e-2] == "completed"
    assert sum(s == "early-stopped" for s in status.values()) >= 2
    assert result.best.config["lr"] == 3e-2 and result.best.best < 0.05
    ckpt = rt.load_checkpoint(result.best.checkpoint)     # a committed checkpoint of the best trial
    assert ckpt["hyper_parameters"]["lr"] == 3e-2
    assert result.best.checkpoint.startswith(str(tmp_path / "asha" / f"trial_{result.best.trial_id}"))
    errored = next(t for t in result.trials if t.status == "errored")
    assert "bad learning rate" in errored.error
    png = result.plot(str(tmp_path / "sweep.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # TensorBoard logs of every trial under one root
    assert len(list((tmp_path / "asha").glob("trial_*/tensorboard/events.out.tfevents.*"))) >= len(lrs) - 1


def test_pbt_exploit_continues_from_the_donors_checkpoint(ray_cluster, tmp_path, capfd, rt_log):
    """...and the exploiting trial keeps logging to its own W&B and MLflow runs (grouped under the
    sweep), never the donor's: the donor's checkpoint brings weights, not run identities."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from raytrainer.loggers import MLflowLogger, WandbLogger
    from wandb_files import offline_runs, wandb_records

    loggers = [WandbLogger(project="pbt", mode="offline"), MLflowLogger(experiment_name="pbt")]
    trainer = rt.Trainer(max_epochs=8, storage_path=str(tmp_path), name="pbt", logger=loggers,
                         callbacks=[rt.callbacks.ModelCheckpoint(save_top_k=-1)])  # keep what was cloned
    # one poor and one good start: the poor trial falls in PBT's lower quantile and exploits
    result = rt.sweep(Reg, RegData(), trainer, search_space={"lr": rt.tune.grid_search([1e-4, 3e-2]), "val_delay": 0.5},
                      metric="val_loss", mode="min", scheduler="pbt", perturbation_interval=1,
                      hyperparam_mutations={"lr": rt.tune.loguniform(1e-3, 1e-1)}, verbose=False)
    exploits = [(t, uri) for t in result.trials for uri in t.restores if f"/trial_{t.trial_id}/" not in uri]
    assert exploits, result.summary()
    for t, uri in exploits:  # continued from a donor's committed checkpoint...
        assert rt.load_checkpoint(uri)["global_step"] > 0
        assert t.checkpoint.startswith(str(tmp_path / "pbt" / f"trial_{t.trial_id}"))  # ...in its own dir
    last_step = max(rt.load_checkpoint(t.checkpoint)["global_step"] for t in result.trials)
    for t in result.trials:  # and nobody deleted anybody's checkpoints
        assert rt.load_checkpoint(t.checkpoint)["global_step"] > 0
        # its curve, each point at its training_iteration: an exploiter's continues from the
        # iteration of the donor's checkpoint (ahead of or behind its own), as Tune counts it.
        # An exploit on the very last result (PBT's timing decides) restores a finished state:
        # nothing is left to train, the trial reports that final result once more, and Tune
        # counts it as a 9th iteration.
        at_end = bool(t.restores) and rt.load_checkpoint(t.restores[-1])["global_step"] == last_step
        assert len(t.history_iterations) == len(t.history)
        assert t.history_iterations[-1] == t.iterations == (9 if at_end else 8), (t.restores, t.history_iterations)
        if not any(e is t for e, _ in exploits):
            # Never exploited; Tune may still pause it and restore it from its own newest
            # checkpoint (PBT's timing on 2 CPUs decides): its curve then holds every iteration
            # after that checkpoint's, none twice (restored from its final checkpoint, it reports
            # that result once more: iteration 9, as above). What Tune keeps of the curve before
            # the pause depends on that timing too (seen: all of it; none; all but the result it
            # paused on).
            own = [uri for uri in t.restores if f"/trial_{t.trial_id}/" in uri]
            first = 1 + (rt.load_checkpoint(own[-1])["global_step"] // (last_step // 8) if own else 0)
            its = t.history_iterations
            assert its == sorted(set(its)) and its[-1] == t.iterations, (t.restores, its)
            assert set(range(first, t.iterations + 1)) <= set(its), (t.restores, its)
    # quiet: no log line of Tune's about its restores (nor anything else) reaches the user, nor
    # (verbose=False) Tune's configuration box and its hint at a folder in Ray's temp directory;
    # the summary does, with the sweep's own logs
    printed = capfd.readouterr()
    assert not re.search(r"\b(WARNING|ERROR)\b", printed.out + printed.err), printed
    assert "Configuration for experiment" not in printed.out + printed.err, printed
    assert "tensorboard --logdir" not in printed.out + printed.err, printed
    assert "sweep done: 2 trials" in rt_log.text and f"tensorboard --logdir {tmp_path / 'pbt'}" in rt_log.text

    # W&B: every (re)start of a trial wrote to that trial's one run, in the sweep's group.
    ids = {}
    for t in result.trials:
        trial_dir = tmp_path / "pbt" / f"trial_{t.trial_id}"
        runs = offline_runs(trial_dir)
        assert runs and len({r["id"] for r in runs}) == 1, runs
        ids[t.trial_id] = runs[0]["id"]
        meta = {(rec.run.run_group, rec.run.display_name)
                for f in trial_dir.glob("wandb/offline-run-*/run-*.wandb")
                for rec in wandb_records(f) if rec.WhichOneof("record_type") == "run"}
        assert meta == {("pbt", f"trial_{t.trial_id}")}
    assert len(set(ids.values())) == len(result.trials)
    # MLflow: one store for the sweep, one FINISHED run per trial, the exploiter's steps all in its own.
    client = MlflowClient(f"sqlite:///{tmp_path / 'pbt'}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("pbt").experiment_id])
    assert sorted(r.info.run_name for r in found) == sorted(f"trial_{t.trial_id}" for t in result.trials)
    assert {r.info.status for r in found} == {"FINISHED"}
    exploiter = next(r for r in found if r.info.run_name == f"trial_{exploits[0][0].trial_id}")
    assert max(m.step for m in client.get_metric_history(exploiter.info.run_id, "val_loss")) > 0


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """The driver is SIGKILLed after some trials finished; resume=True keeps them."""
    script = os.path.join(HERE, "sweep_job.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, script, str(tmp_path), "0"], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while len(list((tmp_path / "sw").glob("trial_*/trial_result.json"))) < 2:
            assert first.poll() is None and time.time() < deadline, "first sweep ended or stalled"
            time.sleep(0.5)
        time.sleep(1.0)  # let Tune snapshot its experiment state
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finished = {p.parent.name for p in (tmp_path / "sw").glob("trial_*/trial_result.json")}
    starts_before = (tmp_path / "starts.log").read_text().split()
    out = subprocess.run([sys.executable, script, str(tmp_path), "1"], env=env, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    summary = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["completed"] == 4
    starts = (tmp_path / "starts.log").read_text().split()
    restarted = starts[len(starts_before):]
    finished_lrs = {summary["lr_by_trial"][name.removeprefix("trial_")] for name in finished}
    assert len(finished_lrs) >= 2
    assert not finished_lrs & {float(x) for x in restarted}, (finished_lrs, restarted)


@pytest.mark.timeout(420)
def test_two_worker_trials_run_ddp_stop_early_and_leave_nothing_behind(ray_cluster, tmp_path):
    """devices=2 per trial: each trial is a Ray Train run of two DDP workers started from its Tune
    actor; concurrency counts actor + workers (one at a time on 2 CPUs), ASHA still stops bad
    trials, and when the sweep ends no worker, placement group or CPU is left held."""
    import ray
    from ray.util import placement_group_table

    lrs = [3e-2, 3e-5]  # good first: the later, worse one is stopped against it
    trainer = rt.Trainer(devices=2, max_epochs=4, storage_path=str(tmp_path), name="ddp", logger=False)
    t0 = time.time()
    result = rt.sweep(Reg, RegData(), trainer, search_space={"lr": rt.tune.grid_search(lrs)},
                      metric="val_loss", mode="min", scheduler="asha", grace_period=1, reduction_factor=2)
    print(f"2-worker ASHA sweep of {len(lrs)} trials x 4 epochs: {time.time() - t0:.1f} s wall")
    table = result.table()
    status = dict(zip(table["config/lr"], table["status"]))
    iterations = dict(zip(table["config/lr"], table["iterations"]))
    assert status[3e-2] == "completed" and iterations[3e-2] == 4  # one Tune result per validation
    assert sum(s == "early-stopped" for s in status.values()) >= 1, result.summary()
    assert result.best.config["lr"] == 3e-2
    best_dir = result.best.checkpoint
    # written by both DDP workers (every rank's RNG in it), committed, under the trial's folder
    assert sorted(rt.load_checkpoint(best_dir)["rank_states"]) == [0, 1]
    assert best_dir.startswith(str(tmp_path / "ddp" / f"trial_{result.best.trial_id}"))
    # nothing left holding the cluster: every placement group removed, all CPUs free again
    deadline = time.time() + 30
    while time.time() < deadline:
        live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not live and ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            break
        time.sleep(0.5)
    assert not live, live
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
