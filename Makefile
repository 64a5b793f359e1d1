# Two commands on a fresh machine:  `make run`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch first and pinned: on a CPU-only machine torch==2.13.0 resolves to a local CPU wheel;
# installing it before the project keeps pip from resolving torch to a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
# The tested versions of everything else (see its header): a fresh machine resolves in seconds.
PIP_C   := -c constraints.txt

.PHONY: setup run test test-fast bench lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q $(PIP_C) -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: a real example training run (digits classifier) on an embedded local Ray.
run: $(STAMP)
	$(BIN)/python examples/digits.py

# Two phases, one after the other: the in-process tests on every core (pytest-xdist; they were
# 196 s in one process here, 130 s in two), then the tests that start or use Ray, in one process
# with one Ray for all (never two Ray-heavy processes at once: on 2 cores each slows the other).
# pytest's exit 5 means "no tests collected": not a failure of the suite itself.
JOBS    ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not ray" -n $(JOBS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -q -p no:cacheprovider -m ray || [ $$? -eq 5 ]

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not ray" -n $(JOBS) || [ $$? -eq 5 ]

bench: $(STAMP)
	$(BIN)/python -m pip install -q $(PIP_C) -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py

# Re-pin constraints.txt to this venv after a dependency change (run `make test` first).
lock: $(STAMP)
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|pip|setuptools|wheel)==' | grep -v '^#'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) raytrainer_runs .pytest_cache
