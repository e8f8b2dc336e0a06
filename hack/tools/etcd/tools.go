//go:build tools

// Package tools pins etcd, the storage behind deploylock's local kube-apiserver.
package tools

import _ "go.etcd.io/etcd/server/v3"
