//! The notification receiver lives in the test kit.

pub use testkit::receiver::*;
