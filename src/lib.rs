//! deploylock: a Kubernetes-native deployment lock.
//!
//! - [`crd`]: the `DeploymentLock` custom resource (the API).
//! - [`crdgen`]: the CRD manifest generated from those types.
//! - [`rules`]: the lock rules, pure functions deciding every transition.
//! - [`servertime`]: the API server's clock, measured to better than a second.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cli;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod error;
pub mod exec;
pub mod gitops;
pub mod rules;
pub mod servertime;
pub mod store;
