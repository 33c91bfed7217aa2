# pacs-ai: the commands in the README. Each target does its own set-up
# (scripts/setup.sh is idempotent and quiet when everything is in place).
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test lint format bench setup clean

## run: start the node with the embedded defaults (SQLite, filesystem broker; no servers)
run:
	@bash scripts/setup.sh venv
	$(BIN)/pacs-ai run

## test: the whole suite (installs dcmtk, dicom3tools, PostgreSQL, Redis if missing)
test:
	@bash scripts/setup.sh all
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

## lint: ruff (lint and format check) and mypy
lint:
	@bash scripts/setup.sh venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## format: apply ruff's formatting and safe fixes
format:
	@bash scripts/setup.sh venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: ingest benchmark, pacs-ai's listener vs dcmtk storescp (BENCH_ARGS="--slices 100")
bench:
	@bash scripts/setup.sh system venv
	$(BIN)/python -m bench.ingest $(BENCH_ARGS)

## setup: everything `make test` needs, without running anything
setup:
	@bash scripts/setup.sh all

## clean: tool caches (keeps .venv and the data dir)
clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
