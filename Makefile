# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create or refresh .venv/ and install the pinned set once; a second run installs nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-sync clean-venv

$(STAMP): setup.cfg pyproject.toml requirements/lock.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check --no-deps -r requirements/lock.txt
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -c "import avatar.face.mediapipe_loader as m; m.import_face_mesh()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/avatar animate --image assets/samples/portrait.jpg --audio assets/samples/speech.flac \
		--output out/demo.mp4 --report out/demo_report.json

test: $(STAMP)
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.frontends
	$(PY) -m benchmarks.motion
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.realtime

# Held-out lip sync of the whole engine with its baselines (about 10 minutes on 2 cores).
bench-sync: $(STAMP)
	$(PY) -m benchmarks.sync

clean-venv:
	rm -rf $(VENV)
