# deploylock — the two commands are `make demo` and `make test` (see README.md).
SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Where `cargo install` puts binaries (plugin-install).
CARGO_HOME_BIN ?= $(or $(CARGO_INSTALL_ROOT),$(CARGO_HOME),$(HOME)/.cargo)/bin
export DEPLOYLOCK_CACHE ?= $(HOME)/.cache/deploylock
CLUSTER_DIR ?= $(DEPLOYLOCK_CACHE)/cluster
# `make cluster-up NODE=2`: also run kube-controller-manager, kube-scheduler and
# that many nodes (kubelet + containerd + runc), so that pods run.
NODE ?=
# `make image IMAGE_BUILDER=docker` builds with docker (or podman) instead of buildah.
export IMAGE_BUILDER ?= buildah
TOOLS_BIN = $$(hack/build-tools.sh | tail -n 1)

.PHONY: help
help: ## Show the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Build (or reuse) the pinned kube-apiserver, kubectl, etcd and helm
	@hack/build-tools.sh >/dev/null

.PHONY: node-tools
node-tools: ## Also build (or reuse) kube-controller-manager, kube-scheduler and kubelet
	@hack/build-tools.sh --node >/dev/null

.PHONY: image
image: ## Build ghcr.io/deploylock/deploylock:0.1.0 from the Dockerfile; load it into a running node
	@$(if $(filter buildah,$(IMAGE_BUILDER)),hack/ensure-deps.sh --node;) \
	archive=$$(hack/image.sh deploylock | tail -n 1); \
	if [[ "$(IMAGE_BUILDER)" == buildah && -f "$(CLUSTER_DIR)/node-count" && "$$(cat "$(CLUSTER_DIR)/node-count")" != 0 ]]; then \
	  hack/cluster.sh load-image "$$archive" --dir $(CLUSTER_DIR); \
	else \
	  echo "built $$archive"; \
	fi

.PHONY: dist
dist: ## Release tarball of the static binaries (dist/deploylock-VERSION-x86_64-unknown-linux-musl.tar.gz + .sha256)
	@hack/ensure-deps.sh --node
	@hack/dist.sh dist

.PHONY: build
build: ## Build the deploylock binaries
	$(CARGO) build --release --bins

.PHONY: crds
crds: ## Regenerate crds/ from the Rust types
	@mkdir -p crds
	$(CARGO) run --quiet --bin crdgen > crds/deploymentlocks.deploylock.dev.yaml
	$(CARGO) run --quiet --bin crdgen notificationsubscriptions > crds/notificationsubscriptions.deploylock.dev.yaml
	$(CARGO) run --quiet --bin crdgen freezewindows > crds/freezewindows.deploylock.dev.yaml
	$(CARGO) run --quiet --bin crdgen environmentbindings > crds/environmentbindings.deploylock.dev.yaml
	@cp crds/deploymentlocks.deploylock.dev.yaml crds/notificationsubscriptions.deploylock.dev.yaml crds/freezewindows.deploylock.dev.yaml crds/environmentbindings.deploylock.dev.yaml charts/deploylock/crds/
	@echo "wrote crds/*.yaml and their copies in charts/deploylock/crds/"

.PHONY: completions
completions: ## Generate shell completions and the man page into dist/
	@mkdir -p dist/completions dist/man
	$(CARGO) build --quiet --bin deploylock
	target/debug/deploylock completion bash > dist/completions/deploylock.bash
	target/debug/deploylock completion zsh > dist/completions/_deploylock
	target/debug/deploylock completion fish > dist/completions/deploylock.fish
	target/debug/deploylock completion kubectl > dist/completions/kubectl_complete-deploylock
	@chmod +x dist/completions/kubectl_complete-deploylock
	target/debug/deploylock man --dir dist/man
	@echo "wrote dist/completions and dist/man (deploylock.1 and one page per action)"

.PHONY: plugin-install
plugin-install: ## Install deploylock and the kubectl plugin (kubectl deploylock, with its completion) into ~/.cargo/bin
	$(CARGO) install --path . --bins --locked
	$(CARGO_HOME_BIN)/deploylock completion kubectl > $(CARGO_HOME_BIN)/kubectl_complete-deploylock
	@chmod +x $(CARGO_HOME_BIN)/kubectl_complete-deploylock

.PHONY: bench
bench: ## Benchmarks against baselines on the local control plane; writes docs/benchmarks.md (minutes)
	@hack/build-tools.sh >/dev/null
	$(CARGO) bench --bench lockbench

.PHONY: torture
torture: ## Long randomized mutual-exclusion test with faults (TORTURE_SECONDS, default 720)
	@hack/build-tools.sh >/dev/null
	$(CARGO) bench --bench torture

.PHONY: test
test: ## Format check, clippy -D warnings, unit and integration tests (real control plane and node)
	@hack/ensure-deps.sh --node
	@hack/build-tools.sh --node >/dev/null
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace --lib --bins --tests

.PHONY: cluster-up
cluster-up: ## Start the local control plane (etcd + kube-apiserver; NODE=N: and N nodes) and print the KUBECONFIG line
	@$(if $(NODE),hack/ensure-deps.sh --node && )hack/cluster.sh up --dir $(CLUSTER_DIR) $(if $(NODE),--nodes $(NODE))

.PHONY: cluster-down
cluster-down: ## Stop the local cluster (its nodes' containers, mounts and processes too)
	@hack/cluster.sh down --dir $(CLUSTER_DIR)

.PHONY: install
install: ## Install the CRD, ClusterRoles and the admission policy (enforcement on) into the current kubeconfig's cluster
	@kubectl=$$(command -v kubectl || echo "$(TOOLS_BIN)/kubectl"); hack/install.sh "$$kubectl"

.PHONY: demo
demo: ## The main job: build what is missing, start the control plane, install the CRD, take a lock and show it
	@hack/demo.sh $(CLUSTER_DIR)
