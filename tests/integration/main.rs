//! Integration tests against a real kube-apiserver and etcd started by the
//! project itself (see testkit/, which support.rs hands the binaries). One test binary, so the control plane
//! starts once for all of them.

mod admission;
mod chart;
mod chart_on_node;
mod cli;
mod completion;
mod controller;
mod crd_api;
mod envbinding;
mod example_tools;
mod examples;
mod examples_gate;
mod examples_on_node;
mod exec;
mod flux_gate;
mod freeze;
mod gate;
mod gitops;
mod hostile;
mod install;
mod multienv;
mod node;
mod notify;
mod queue;
mod receiver;
mod support;
mod torture_short;
mod windows;
