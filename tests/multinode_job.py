"""Run by tests/test_multinode.py in its own process: a simulated 3-node Ray cluster
(ray.cluster_utils.Cluster), 2 DDP workers spread over nodes, the node of rank 1 removed
mid-run, training resumed on the remaining (spare) node. Prints one JSON line."""
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
                f.write(node)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.marker_dir and self.global_rank == 1 and self.global_step == KILL_AT:
            flag = os.path.join(self.marker_dir, "remove-my-node")
            if not os.path.exists(flag + ".done"):
                with open(flag, "w") as f:
                    f.write(ray.get_runtime_context().get_node_id())
                time.sleep(60)  # wait here to be taken down with the node

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


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


def fit(tmp, name, marker_dir=None, max_failures=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    model = Net(marker_dir)
    trainer = rt.Trainer(devices=2, max_epochs=2, seed=0, storage_path=tmp, name=name, logger=False,
                         enable_progress_bar=False, max_failures=max_failures,
                         resources_per_worker={"CPU": 1},
                         callbacks=[rt.callbacks.ModelCheckpoint(every_n_train_steps=1)])
    return model, trainer.fit(model, data)


def main(tmp):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        straight, _ = fit(tmp, "straight")
        marker_dir = os.path.join(tmp, "markers")
        os.makedirs(marker_dir)
        stop = threading.Event()
        threading.Thread(target=node_remover, args=(cluster, marker_dir, stop), daemon=True).start()
        t0 = time.time()
        resumed, result = fit(tmp, "killed", marker_dir, max_failures=2)
        stop.set()
        nodes = {}
        for name in sorted(os.listdir(marker_dir), key=lambda n: int(n.rsplit("-", 1)[1]) if n.startswith("nodes") else 0):
            if name.startswith("nodes-"):
                nodes.setdefault(name.split("-")[1], []).append(open(os.path.join(marker_dir, name)).read())
        identical = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
        print(json.dumps({"identical": identical, "global_step": result.global_step,
                          "node_removed": os.path.exists(os.path.join(marker_dir, "remove-my-node.done")),
                          "nodes_by_rank": nodes, "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
                          "killed_run_s": round(time.time() - t0, 1)}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
