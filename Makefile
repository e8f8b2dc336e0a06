# deploylock — the two commands are `make demo` and `make test` (see README.md).
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
export DEPLOYLOCK_CACHE ?= $(HOME)/.cache/deploylock
CLUSTER_DIR ?= $(DEPLOYLOCK_CACHE)/cluster
TOOLS_BIN = $$(hack/build-tools.sh | tail -n 1)

.PHONY: help
help: ## Show the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Build (or reuse) the pinned kube-apiserver, kubectl, etcd and helm
	@hack/build-tools.sh >/dev/null

.PHONY: build
build: ## Build the deploylock binaries
	$(CARGO) build --release --bins

.PHONY: crds
crds: ## Regenerate crds/ from the Rust types
	@mkdir -p crds
	$(CARGO) run --quiet --bin crdgen > crds/deploymentlocks.deploylock.dev.yaml
	@echo "wrote crds/deploymentlocks.deploylock.dev.yaml"
	$(CARGO) run --quiet --bin crdgen notificationsubscriptions > crds/notificationsubscriptions.deploylock.dev.yaml
	@echo "wrote crds/notificationsubscriptions.deploylock.dev.yaml (the chart links to it)"

.PHONY: completions
completions: ## Generate shell completions and the man page into dist/
	@mkdir -p dist/completions dist/man
	$(CARGO) build --quiet --bin deploylock
	target/debug/deploylock completion bash > dist/completions/deploylock.bash
	target/debug/deploylock completion zsh > dist/completions/_deploylock
	target/debug/deploylock completion fish > dist/completions/deploylock.fish
	target/debug/deploylock man > dist/man/deploylock.1
	@echo "wrote dist/completions and dist/man/deploylock.1"

.PHONY: plugin-install
plugin-install: ## Install deploylock and the kubectl plugin (kubectl deploylock) into ~/.cargo/bin
	$(CARGO) install --path . --bins --locked

.PHONY: bench
bench: ## Benchmarks against baselines on the local control plane; writes docs/benchmarks.md (minutes)
	@hack/build-tools.sh >/dev/null
	$(CARGO) bench --bench lockbench

.PHONY: torture
torture: ## Long randomized mutual-exclusion test with faults (TORTURE_SECONDS, default 720)
	@hack/build-tools.sh >/dev/null
	$(CARGO) bench --bench torture

.PHONY: test
test: ## Format check, clippy -D warnings, unit and integration tests (real control plane)
	@hack/ensure-deps.sh
	@hack/build-tools.sh >/dev/null
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --lib --bins --tests

.PHONY: cluster-up
cluster-up: ## Start the local control plane (etcd + kube-apiserver) and print the KUBECONFIG line
	@hack/cluster.sh up --dir $(CLUSTER_DIR)

.PHONY: cluster-down
cluster-down: ## Stop the local control plane
	@hack/cluster.sh down --dir $(CLUSTER_DIR)

.PHONY: install
install: ## Install the CRD, ClusterRoles and the admission policy (enforcement on) into the current kubeconfig's cluster
	@kubectl=$$(command -v kubectl || echo "$(TOOLS_BIN)/kubectl"); hack/install.sh "$$kubectl"

.PHONY: demo
demo: ## The main job: build what is missing, start the control plane, install the CRD, take a lock and show it
	@hack/demo.sh $(CLUSTER_DIR)
