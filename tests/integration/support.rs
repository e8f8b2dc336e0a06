//! The test kit (testkit/), given this package's binaries: every test file
//! uses `crate::support` as before.

pub use testkit::*;

/// The shared control plane, started on first use.
pub fn cluster() -> &'static TestCluster {
    testkit::cluster(testkit::binaries!())
}
