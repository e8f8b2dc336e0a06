//! deploylock's test kit, shared by the integration tests and the benches:
//! the real local control plane (`hack/cluster.sh`) with its identities and
//! kubeconfigs, runners for `deploylock`, kubectl and the controller, the
//! fault-injecting proxy, the notification receiver and the torture engine.
//!
//! Cargo tells only the package's own tests and benches where its binaries
//! are, so they hand them in: `testkit::cluster(testkit::binaries!())`.

mod cluster;
mod fault;
pub mod receiver;
pub mod torture;
pub mod torture_gate;
pub mod torture_hostile;
pub mod torture_notify;

pub use cluster::*;
pub use fault::{Fault, FaultProxy};
