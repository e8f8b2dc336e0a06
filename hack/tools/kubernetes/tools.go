//go:build tools

// Package tools pins the Kubernetes commands deploylock's local cluster runs:
// the control plane (kube-apiserver, kubectl) and, for the node
// (hack/cluster.sh up --node), kube-controller-manager, kube-scheduler and kubelet.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
