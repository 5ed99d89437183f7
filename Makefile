# cellfleet: `make up` stands up the lab, `make test` proves it. `make help` lists every target.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
PYTHON      ?= python3
BIN         := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_FORCE_COLOR ?= false
INVENTORY   ?= inventory/lab/hosts.yml
STAMP_DIR   := $(VENV)/.stamps
# Mitogen keeps one Python per host instead of starting one per task: about 5x faster under emulation.
# MITOGEN=0 runs plain Ansible.
MITOGEN     ?= 1
ifeq ($(MITOGEN),1)
export ANSIBLE_STRATEGY_PLUGINS := $(CURDIR)/$(VENV)/lib/python3.11/site-packages/ansible_mitogen/plugins/strategy
export ANSIBLE_STRATEGY := mitogen_linear
endif

HOST_PACKAGES := qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config \
	debootstrap e2fsprogs dnsmasq-base iproute2 socat netcat-openbsd openssh-client nftables \
	python3-venv python3-dev gcc postgresql chromium

PLAYBOOKS := $(filter-out playbooks/site.yml,$(wildcard playbooks/*.yml)) playbooks/site.yml \
	$(wildcard playbooks/lab/*.yml)

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  %-18s %s\n", $$1, $$2}'

# --- setup ------------------------------------------------------------------------------------------

.PHONY: host-deps
host-deps: ## Install the host packages the lab needs (apt)
	@missing=$$(dpkg-query -W -f='$${Package} $${db:Status-Abbrev}\n' $(HOST_PACKAGES) 2>/dev/null \
		| awk '$$2 != "ii" {print $$1}'; for p in $(HOST_PACKAGES); do \
		dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done | sort -u); \
	if [ -n "$$missing" ]; then \
		echo "[setup] installing host packages: $$missing"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP_DIR)/venv: requirements.txt | host-deps
	@echo "[setup] creating $(VENV) from requirements.txt"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -r requirements.txt
	@mkdir -p $(STAMP_DIR) && touch $@

$(STAMP_DIR)/collections: requirements.yml $(STAMP_DIR)/venv
	@$(BIN)/python scripts/check_collections.py requirements.yml
	@touch $@

$(STAMP_DIR)/app: app/pyproject.toml $(STAMP_DIR)/venv
	@echo "[setup] installing the cell server (app/) into $(VENV)"
	@$(BIN)/pip install -q --no-deps -e app
	@touch $@

$(STAMP_DIR)/labkit: tests/labkit/pyproject.toml $(STAMP_DIR)/venv
	@echo "[setup] installing the lab toolkit (tests/labkit/) into $(VENV)"
	@$(BIN)/pip install -q --no-deps -e tests/labkit
	@touch $@

.PHONY: venv
venv: $(STAMP_DIR)/collections $(STAMP_DIR)/app $(STAMP_DIR)/labkit ## Create .venv with pinned tools, the app, the lab toolkit, and check the collections

# The laptop's Sage: its own venv (2.5 GB), the app installed into it, so `cellserver serve --kernel sage` runs.
SAGE_VENV   ?= .venv-sage
export CELLFLEET_SAGE_PYTHON := $(CURDIR)/$(SAGE_VENV)/bin/python

$(SAGE_VENV)/.installed: app/requirements-sage.txt app/pyproject.toml requirements.txt | host-deps
	@echo "[setup] creating $(SAGE_VENV): passagemath from app/requirements-sage.txt (about a minute, 2.5 GB)"
	@$(PYTHON) -m venv $(SAGE_VENV)
	@$(SAGE_VENV)/bin/pip install -q --upgrade pip
	@$(SAGE_VENV)/bin/pip install -q -r app/requirements-sage.txt
	@# The app's own dependencies that Sage does not bring, at requirements.txt's pins (built from source if need be).
	@$(SAGE_VENV)/bin/pip install -q $$(grep -i '^sockjs-tornado==' requirements.txt)
	@$(SAGE_VENV)/bin/pip install -q --no-deps -e app
	@touch $@

.PHONY: sage
sage: $(SAGE_VENV)/.installed ## Create .venv-sage: passagemath and the app, for a local Sage cell server

.PHONY: serve
serve: venv ## Run a local cell server with the Python kernel on http://127.0.0.1:8888 (Ctrl-C stops it)
	@$(BIN)/cellserver serve

.PHONY: serve-sage
serve-sage: sage ## Run a local cell server with the Sage kernel on http://127.0.0.1:8888 (Ctrl-C stops it)
	@$(SAGE_VENV)/bin/cellserver serve --kernel sage

.PHONY: image
image: venv ## Build the golden image unless the cached one matches its recipe
	@$(BIN)/python images/build_image.py

# --- the lab ----------------------------------------------------------------------------------------

.PHONY: lab-host
lab-host: host-deps ## Start the lab namespace and libvirtd inside it
	@scripts/labhost up

.PHONY: lab
lab: image lab-host ## Clone and boot the lab VMs
	@echo "[lab] cloning and booting the lab VMs (first boot under emulation: about a minute)"
	@ansible-playbook -i $(INVENTORY) playbooks/lab/up.yml

.PHONY: converge
converge: venv ## Converge playbooks/site.yml on the lab
	@echo "[lab] converging playbooks/site.yml"
	@ansible-playbook -i $(INVENTORY) playbooks/site.yml

.PHONY: up
up: lab converge ## Build the image if needed, start the lab, converge it, print where to reach it
	@$(BIN)/python scripts/lab_info.py $(INVENTORY)

.PHONY: down
down: venv lab-host ## Remove the lab VMs, their disks and the lab namespace (the image cache stays)
	@ansible-playbook -i $(INVENTORY) playbooks/lab/down.yml
	@scripts/labhost down

# --- checks -----------------------------------------------------------------------------------------

.PHONY: lint
lint: venv ## ruff, yamllint, ansible-lint (production profile)
	@echo "[test] ruff"; ruff check . && ruff format --check .
	@echo "[test] yamllint"; yamllint --strict .
	@echo "[test] ansible-lint"; ansible-lint --profile production --strict

.PHONY: docs
docs: venv ## Regenerate each role's README.md from its meta/argument_specs.yml
	@python scripts/role_docs.py

.PHONY: syntax
syntax: venv ## ansible-playbook --syntax-check of every playbook
	@for playbook in $(PLAYBOOKS); do \
		echo "[test] syntax-check $$playbook"; \
		ansible-playbook -i $(INVENTORY) --syntax-check $$playbook >/dev/null; \
	done

.PHONY: unit
unit: venv sage ## pytest unit tests (modules, image builder, templates, role inputs) and the app's tests (Python and Sage)
	@pytest -q tests/unit
	@pytest -q -p no:cacheprovider app/tests

.PHONY: molecule
molecule: image lab-host ## Molecule scenario on real VMs: create, converge, idempotence, verify, destroy
	@cd tests && molecule test --scenario-name default

.PHONY: molecule-relabel
molecule-relabel: image lab-host ## SELinux relabel path: damaged labels, permissive relabel boot, enforcing (~6 min)
	@cd tests && molecule test --scenario-name selinux_relabel

VERIFY_LAB := pytest -q tests/infra --hosts='ansible://all' --ansible-inventory=$(INVENTORY) -p no:cacheprovider

.PHONY: verify
verify: venv ## testinfra suite against the running lab (after `make up`)
	@$(VERIFY_LAB)

.PHONY: verify-load
verify-load: venv ## Load and fault tests (full pool, log host down, reloads under a flood) on the lab; after `make up`
	@$(VERIFY_LAB) -m load --durations=0

.PHONY: test
test: lint syntax unit molecule ## Everything CI runs: lint, syntax, unit tests, molecule on real VMs

.PHONY: bench
bench: image lab-host ## Every benchmark against the lab, then docs/measurements.md + PNGs; after `make up` (65-95 min); BENCH_ARGS=--skip NAME
	@$(BIN)/python bench/report.py $(BENCH_ARGS)

.PHONY: bench-foundation
bench-foundation: image lab-host ## Foundation benchmarks (image build cold+cached, overlay, clone to SSH, converges); BENCH_ARGS=--skip-cold
	@$(BIN)/python bench/foundation.py $(BENCH_ARGS)

.PHONY: bench-permalinks
bench-permalinks: venv ## Permalink service on this machine: durable writes/s, reads/s, p50/p99
	@$(BIN)/python bench/permalinks.py

.PHONY: bench-service
bench-service: venv ## /service on this machine: print(1+1) at concurrency 1 and 8, fresh kernel each
	@$(BIN)/python bench/service.py

.PHONY: bench-service-sage
bench-service-sage: venv sage ## /service with the Sage kernel on this machine: print(1+1), factor at 1/8/32 clients, CPU s, PSS
	@$(BIN)/python bench/service_sage.py $(BENCH_ARGS)

.PHONY: bench-kernel-start
bench-kernel-start: venv sage ## Where a fresh Sage kernel's start goes: fork, ready, first computation, CPU, copied pages
	@$(SAGE_VENV)/bin/python bench/kernel_start.py --kernel sage $(BENCH_ARGS)

.PHONY: bench-sessions
bench-sessions: venv sage ## Kernel sessions, Sage kernel: POST /kernel to first reply, round trip, PSS of 50 idle sessions
	@$(BIN)/python bench/sessions.py $(BENCH_ARGS)

.PHONY: bench-sessions-lab
bench-sessions-lab: venv ## Kernel sessions through the lab's HAProxy+TLS: creation time, sessions held per cell; after `make up`
	@$(BIN)/python bench/sessions_lab.py $(BENCH_ARGS)

.PHONY: bench-service-pooled
bench-service-pooled: venv ## /service on the lab's cell1, kernels as pooled confined workers; after `make up`
	@$(BIN)/python bench/service_pooled.py $(BENCH_ARGS)

# The lab's HTTPS forward on this machine's loopback (lab_https_port in the lab inventory).
LAB_URL := https://127.0.0.1:$(shell awk '/^lab_https_port:/ {print $$2}' inventory/lab/group_vars/all/lab.yml)

.PHONY: embed-lab
embed-lab: venv ## The embed page in headless Chromium and upstream's client, through the lab's HAProxy; after `make up`
	@CELLFLEET_LAB_URL=$(LAB_URL) $(BIN)/pytest -q -p no:cacheprovider app/tests/test_embed.py \
		app/tests/test_sessions.py::test_upstreams_client_computes_factorial_2020_with_sage

.PHONY: cluster-test
cluster-test: venv ## Rolling update, add/remove a cell, a lost VM, all under load (0 failed); after `make up` (~40 min)
	@$(BIN)/pytest -q -s -p no:cacheprovider tests/cluster

.PHONY: bench-cluster
bench-cluster: venv ## Snapshot, clone-to-serving of a new cell (per step), removal, rolling update plot; after `make up`
	@$(BIN)/python bench/cluster_ops.py $(BENCH_ARGS)

.PHONY: bench-stack
bench-stack: venv ## Computations and permalink reads through HAProxy+TLS beside direct, on the lab; after `make up`
	@$(BIN)/python bench/stack.py $(BENCH_ARGS)

.PHONY: unit-security
unit-security: venv ## systemd-analyze security exposure of each cellfleet service on the lab; after `make up`
	@$(BIN)/python bench/unit_security.py

.PHONY: bench-workers
bench-workers: venv ## Worker pool costs on the lab's cell1 (launch, launch+python, reset); after `make up`
	@$(BIN)/python bench/worker_pool.py $(BENCH_ARGS)

.PHONY: chaos
chaos: venv ## Fault scenarios on the lab as tests (kill -9/SIGSTOP, VM loss, log host down, reloads, flood); after `make up` (about 45 min); CHAOS_ARGS='-k WORD'
	@$(BIN)/pytest -q -s -p no:cacheprovider tests/chaos $(CHAOS_ARGS); status=$$?; \
		$(BIN)/python bench/report.py --report-only; exit $$status

.PHONY: clean
clean: ## Remove the venv (the image cache in /var/cache/cellfleet stays)
	rm -rf $(VENV)
