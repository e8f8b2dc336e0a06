//go:build tools

// Package tools pins helm, used to lint and install deploylock's chart.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
