"""``raytrainer fit|validate|test|predict|sweep --config run.yaml``: the command line (main.py),
YAML files and overrides (config_files.py), classes named in them (objects.py), the sweep
section (sweep.py)."""
