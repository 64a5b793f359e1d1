"""Run by tests/test_multinode.py in its own process: a simulated Ray cluster
(ray.cluster_utils.Cluster: a 0-CPU head and three 1-CPU nodes), 2 DDP workers spread over
nodes, an uninterrupted reference (the same loop on 2 gloo ranks), then two scenarios, each
printing one JSON line:

    kill    the node of rank 1 dies without notice mid-run (checkpoints every step); training
            resumes on the spare node
    drain   a fresh spare is added; rank 1's node is first drained as preempted (Ray's notice, as a
            spot reclaim gives): a just-in-time checkpoint, then the node goes

    multinode_job.py TMP
"""
import json
import os
import sys
import threading
import time

import ray
import torch
from ray.cluster_utils import Cluster
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import raytrainer as rt

KILL_AT = 6
DRAIN_AT = 8  # mid-epoch 1 (6 steps per epoch)
DRAIN = False


class Net(rt.Module):
    def __init__(self, marker_dir=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.marker_dir = marker_dir

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_start(self):
        if self.marker_dir:  # which node each rank runs on, per attempt
            node = ray.get_runtime_context().get_node_id()
            with open(os.path.join(self.marker_dir, f"nodes-{self.global_rank}-{time.time_ns()}"), "w") as f:
                f.write(f"{node} {self.global_step}")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if DRAIN and self.marker_dir:
            if self.global_rank == 1 and self.global_step == DRAIN_AT:
                flag = os.path.join(self.marker_dir, "drain-my-node")
                if not os.path.exists(flag + ".done"):
                    with open(flag, "w") as f:
                        f.write(ray.get_runtime_context().get_node_id())
            # Train on slowly once the drain is requested, until the just-in-time checkpoint is
            # there (Ray's watcher polls every 0.2 s; on a loaded machine it can take seconds).
            # Then rank 1 waits to be taken down with its node: without that wait a fast
            # machine finishes the last steps before the node is gone, and nothing is resumed.
            drained = os.path.exists(os.path.join(self.marker_dir, "drain-my-node"))
            seen = os.path.exists(os.path.join(self.marker_dir, "jit-checkpoint"))
            if drained and not seen:  # slow steps (up to 4 s each) until the checkpoint is seen
                jit = os.path.join(self.marker_dir, "jit-checkpoint")
                deadline = time.monotonic() + 4
                while time.monotonic() < deadline and not os.path.exists(jit):
                    time.sleep(0.05)
            elif seen and self.global_rank == 1 and _on_drained_node(self.marker_dir):
                time.sleep(60)
            else:
                time.sleep(0.05)
            return
        if self.marker_dir and self.global_rank == 1 and self.global_step == KILL_AT:
            flag = os.path.join(self.marker_dir, "remove-my-node")
            if not os.path.exists(flag + ".done"):
                with open(flag, "w") as f:
                    f.write(ray.get_runtime_context().get_node_id())
                time.sleep(60)  # wait here to be taken down with the node

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _on_drained_node(marker_dir):
    with open(os.path.join(marker_dir, "drain-my-node")) as f:
        return f.read().strip() == ray.get_runtime_context().get_node_id()


def node_remover(cluster, marker_dir, stop):
    flag = os.path.join(marker_dir, "remove-my-node")
    while not stop.is_set():
        if os.path.exists(flag):
            node_id = open(flag).read().strip()
            for node in list(cluster.worker_nodes):
                if node.node_id == node_id:
                    open(flag + ".done", "w").close()
                    cluster.remove_node(node, allow_graceful=False)
                    return
        time.sleep(0.1)


def node_drainer(cluster, marker_dir, run_dir, stop):
    """Drain rank 1's node as preempted, wait for the just-in-time checkpoint, remove the node."""
    from ray.core.generated import autoscaler_pb2

    from raytrainer.checkpoint import store as ckpt_io
    flag = os.path.join(marker_dir, "drain-my-node")
    while not stop.is_set() and not os.path.exists(flag):
        time.sleep(0.05)
    if stop.is_set():
        return
    node_id = open(flag).read().strip()
    open(flag + ".done", "w").close()
    gcs = ray._raylet.GcsClient(address=cluster.address)
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot instance reclaimed", int(time.time() * 1000) + 60_000)
    assert accepted, why
    deadline = time.time() + 60
    while time.time() < deadline and not stop.is_set():
        mid_epoch = [u for u in ckpt_io.list_committed(os.path.join(run_dir, "checkpoints")) if "-epoch_end" not in u]
        if mid_epoch:
            with open(os.path.join(marker_dir, "jit-checkpoint"), "w") as f:
                f.write(mid_epoch[-1])
            break
        time.sleep(0.05)
    for node in list(cluster.worker_nodes):
        if node.node_id == node_id:
            cluster.remove_node(node, allow_graceful=False)
            open(os.path.join(marker_dir, "remove-my-node.done"), "w").close()


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)


def trainer(tmp, name, max_failures=0, devices=2, launcher="ray"):
    return rt.Trainer(devices=devices, max_epochs=2, seed=0, storage_path=tmp, name=name, logger=False,
                      enable_progress_bar=False, max_failures=max_failures, launcher=launcher,
                      resources_per_worker={"CPU": 1} if launcher == "ray" else None,
                      log_every_n_steps=1,
                      # drain mode: epoch-end checkpoints only, so the just-in-time one shows
                      callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=None if DRAIN else 1)])


def model(marker_dir=None):
    torch.manual_seed(0)
    return Net(marker_dir)


def fit(tmp, name, marker_dir=None, max_failures=0):
    module = model(marker_dir)
    return module, trainer(tmp, name, max_failures).fit(module, loader())


def reference(tmp) -> dict:
    """The uninterrupted run's weights: the same loop on 2 gloo ranks (checkpoint settings do
    not change the weights), before the cluster starts: seconds, not a Ray fit."""
    from multirank import fit_on_ranks
    return fit_on_ranks(lambda: trainer(tmp, "straight", devices=1, launcher="local"), model, loader)


def main(tmp):
    global DRAIN
    # Ray's drain watcher and our check poll fast (default 5 s); the nodes inherit this env.
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.2"
    # Run from the test suite, this process inherits the session's embedded-Ray setting that
    # turns the watcher off (one node: nothing to preempt); a cluster needs it on.
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"
    # A removed node is declared dead after missed health checks: 5 x 3 s by default, during
    # which the restarted workers can be placed on the dead node and wait. 3 x 1 s here (a dead
    # raylet refuses the check at once; a live one answers in milliseconds).
    os.environ["RAY_health_check_period_ms"] = "1000"
    os.environ["RAY_health_check_failure_threshold"] = "3"
    straight = reference(tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        for scenario in ("kill", "drain"):
            DRAIN = scenario == "drain"
            if DRAIN:  # a fresh spare for the node the first scenario removed
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
            print(json.dumps({"scenario": scenario, **run_scenario(cluster, tmp, scenario, straight)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_scenario(cluster, tmp, scenario, straight) -> dict:
    marker_dir = os.path.join(tmp, f"markers-{scenario}")
    os.makedirs(marker_dir)
    stop = threading.Event()
    if DRAIN:
        run_dir = os.path.join(tmp, scenario)
        threading.Thread(target=node_drainer, args=(cluster, marker_dir, run_dir, stop), daemon=True).start()
    else:
        threading.Thread(target=node_remover, args=(cluster, marker_dir, stop), daemon=True).start()
    t0 = time.time()
    resumed, result = fit(tmp, scenario, marker_dir, max_failures=2)
    stop.set()
    nodes, start_steps = {}, {}
    for name in sorted(os.listdir(marker_dir), key=lambda n: int(n.rsplit("-", 1)[1]) if n.startswith("nodes") else 0):
        if name.startswith("nodes-"):
            node, start_step = open(os.path.join(marker_dir, name)).read().split()
            nodes.setdefault(name.split("-")[1], []).append(node)
            start_steps.setdefault(name.split("-")[1], []).append(int(start_step))
    identical = all(torch.equal(a, b) for a, b in zip(straight.values(), resumed.state_dict().values()))
    return {"identical": identical, "global_step": result.global_step,
            "node_removed": os.path.exists(os.path.join(marker_dir, "remove-my-node.done")),
            "nodes_by_rank": nodes, "start_steps": start_steps, "jit_checkpoint": _read(os.path.join(marker_dir, "jit-checkpoint")),
            "committed": [os.path.basename(u) for u in _committed(os.path.join(tmp, scenario))],
            "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]), "run_s": round(time.time() - t0, 1)}


def _read(path):
    return open(path).read() if os.path.exists(path) else None


def _committed(run_dir):
    from raytrainer.checkpoint import store as ckpt_io
    return ckpt_io.list_committed(os.path.join(run_dir, "checkpoints"))


if __name__ == "__main__":
    main(sys.argv[1])
