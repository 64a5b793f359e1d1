"""The one training loop and what a run holds (never imports ray): execute.py runs a stage,
fit.py and evaluate.py are the loops, run.py the state they drive."""
