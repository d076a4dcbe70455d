# `make demo` runs the main job, `make test` the test suite; both create .venv on first use.
VENV ?= .venv
STAMP := $(VENV)/.editlab-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/editlab demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
