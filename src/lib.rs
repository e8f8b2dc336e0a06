//! deploylock: a Kubernetes-native deployment lock.
//!
//! - [`crd`]: the `DeploymentLock` custom resource (the API).
//! - [`crdgen`]: the CRD manifest generated from those types.
//! - [`environment`]: an environment's name (a DNS-1123 label).
//! - [`rules`]: the lock rules, pure functions deciding every transition.
//! - [`servertime`]: the API server's clock, measured to better than a second.
//! - [`store`]: the Kubernetes I/O applying the rules; [`queue`]: waiting for the lock.
//! - [`multienv`]: several environments at once (lock order, lock group ID).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cli;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod envbinding;
pub mod environment;
pub mod error;
pub mod exec;
pub mod gitops;
pub mod label_selector;
pub mod multienv;
pub mod notify;
pub mod queue;
pub mod rules;
pub mod servertime;
pub mod signals;
pub mod store;
#[cfg(test)]
mod testdata;
pub mod windows;
