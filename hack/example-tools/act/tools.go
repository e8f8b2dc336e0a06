//go:build tools

// Package tools pins act's main package in this module.
package tools

import _ "github.com/nektos/act"
