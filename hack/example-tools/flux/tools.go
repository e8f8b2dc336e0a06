//go:build tools

// Package tools pins the controller's main package in this module.
package tools

import _ "github.com/fluxcd/kustomize-controller"
