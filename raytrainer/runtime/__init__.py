"""Where a run executes: local.py (this process) and ray_train.py (Ray Train workers), with what
both need before they start (preflight.py). The only rooms that import ray.train; Ray's private
API is reached through ray_internals.py alone."""
