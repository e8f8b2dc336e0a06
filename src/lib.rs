//! deploylock: a Kubernetes-native deployment lock.
//!
//! - [`crd`]: the `DeploymentLock` custom resource (the API).
//! - [`crdgen`]: the CRD manifest generated from those types.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod crd;
pub mod crdgen;
