"""Run by tests/test_sweep.py in its own process (the driver gets killed): a FIFO sweep of 4
trials, one at a time; argv: tmp_dir, resume (0/1). Prints one JSON line when done."""
import json
import sys

import raytrainer as rt
from sweep_models import Reg, RegData

tmp, resume = sys.argv[1], sys.argv[2] == "1"
trainer = rt.Trainer(max_epochs=3, storage_path=tmp, name="sw", logger=False)
result = rt.sweep(Reg, RegData(), trainer,
                  search_space={"lr": rt.tune.grid_search([1e-3, 2e-3, 3e-3, 4e-3]),
                                "start_log": f"{tmp}/starts.log"},
                  metric="val_loss", mode="min", scheduler="fifo", max_concurrent_trials=1,
                  resume=resume, verbose=False)
print(json.dumps({"completed": sum(t.status == "completed" for t in result.trials),
                  "lr_by_trial": {t.trial_id: t.config["lr"] for t in result.trials}}))
