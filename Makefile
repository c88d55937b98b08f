# The two newcomer commands: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Train a small TNT on the built-in digits (no download), evaluate it, and classify four test digits.
demo: $(STAMP)
	$(BIN)/tnt train -c recipes/digits.yaml --output runs/demo
	$(BIN)/tnt eval --model tnt_digits --checkpoint runs/demo/best.pt --data digits
	$(BIN)/python -m tnt_vision.data.digits_png runs/demo/samples 4
	$(BIN)/tnt predict --model tnt_digits --checkpoint runs/demo/best.pt runs/demo/samples/*.png

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
