# The project's two entry points (README): `make demo` installs and runs the main job; `make test` installs what
# the tests need and runs them (.ci/run calls it).
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install install-dev demo test

# torch first, and only if absent: a plain `pip install torch` (or a newer pin) pulls several GB of CUDA wheels,
# while `torch==2.13.0` takes the CPU build these machines keep locally. An existing torch (a GPU image's) is kept.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	@# an editable install skips setup.py's .pth (lazymerge/lm_eval_plugin.py): `lm_eval --model lazymerge` needs it
	$(PY) -c "from lazymerge.lm_eval_plugin import write_pth; print(write_pth())"

install-dev: install
	$(PIP) -e ".[dev]"
	@# the A/B page's browser test drives Debian's Chromium (a test tool's own browser download fails here)
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will skip"; }

# options pass through: make demo ARGS="--port 8080 --seeds 3"
demo: install
	$(PY) -m lazymerge.cli demo $(ARGS)

test: install-dev
	$(PY) -m pytest -p no:cacheprovider tests
