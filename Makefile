# crab-ops: two commands matter. `make demo` runs site.yml against the local lab; `make test` runs everything.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
MOLECULE_SCENARIOS := compose_logging healthcheck backup sqlite_pragmas

.PHONY: demo test bootstrap venv lab-up lab-down lab-status site site-check lint unit molecule molecule-site e2e clean

## demo: install what is missing, bring the lab up, apply site.yml twice, take a backup, prove it restores
demo: bootstrap lab-up
	bash scripts/demo.sh

## test: lint, unit tests, one Molecule scenario per role, lab end-to-end tests
test: bootstrap lint unit molecule e2e molecule-site

bootstrap:
	bash scripts/bootstrap.sh

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

lab-up: venv
	bash lab/lab.sh up

lab-down:
	bash lab/lab.sh down

lab-status:
	bash lab/lab.sh status

site: venv
	ansible-playbook site.yml

site-check: venv
	ansible-playbook site.yml --check --diff

lint: venv
	ruff check .
	ruff format --check .
	yamllint -s .
	ansible-lint

unit: venv
	pytest -q tests/unit

molecule: venv
	bash scripts/ensure-docker.sh
	bash lab/lab.sh images
	for s in $(MOLECULE_SCENARIOS); do molecule test -s $$s || exit 1; done

e2e: venv lab-up
	pytest -q tests/integration

## molecule-site: molecule/default, the whole site.yml over SSH on the lab, idempotence, testinfra
molecule-site: venv lab-up
	molecule test -s default --destroy never

clean: lab-down
	rm -rf $(VENV)
