# Two entry points for a fresh machine: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vidshift demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Both benchmarks at sizes a laptop CPU finishes in a few minutes; on a GPU node run them without options
# (benchmarks/README.md). They print tables and assert nothing.
bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py --videos 4 --frames-per-video 32
	$(BIN)/python benchmarks/train.py --scale 0.25 --arrays pooled

clean:
	rm -rf $(VENV) demo_out
