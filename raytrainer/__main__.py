"""``python -m raytrainer fit --config run.yaml``: the same as the ``raytrainer`` command."""
from raytrainer.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
