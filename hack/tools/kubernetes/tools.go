//go:build tools

// Package tools pins the Kubernetes commands deploylock's local control plane runs.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
