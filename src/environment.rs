//! An environment's name: the name of its DeploymentLock, so a DNS-1123
//! label. The one definition of that rule (namespaces follow it too).

use std::fmt;
use std::str::FromStr;

/// Longest DNS-1123 label: an environment's or a namespace's name.
pub const MAX_DNS_LABEL_LEN: usize = 63;

/// A DNS-1123 label, as the CRD's schema states it.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Most environments one notification subscription or freeze window names.
pub const MAX_NAMED_ENVIRONMENTS: usize = 64;

/// The schema of a list of environment names, at most
/// [`MAX_NAMED_ENVIRONMENTS`] (bounded, so the API server's CEL cost estimate
/// of any later rule stays small).
pub fn names_schema() -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": MAX_NAMED_ENVIRONMENTS,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_DNS_LABEL_LEN,
            "pattern": DNS_LABEL_PATTERN,
        },
    })
}

/// Whether `name` is a DNS-1123 label: 1 to [`MAX_DNS_LABEL_LEN`] lowercase
/// letters, digits and '-', starting and ending with a letter or digit
/// ([`DNS_LABEL_PATTERN`]).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_DNS_LABEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The name of an environment, checked: it goes into every request's path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Environment(String);

/// A name that is not a DNS-1123 label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid environment {0:?}: use lowercase letters, digits and '-', starting and ending with a letter or digit, at most {MAX_DNS_LABEL_LEN} characters (e.g. production)"
)]
pub struct InvalidEnvironment(pub String);

impl Environment {
    /// The environment actions act on when no -e is given.
    pub fn production() -> Self {
        Environment("production".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Environment {
    type Err = InvalidEnvironment;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if is_dns_label(name) {
            Ok(Environment(name.to_string()))
        } else {
            Err(InvalidEnvironment(name.to_string()))
        }
    }
}

impl TryFrom<String> for Environment {
    type Error = InvalidEnvironment;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        if is_dns_label(&name) {
            Ok(Environment(name))
        } else {
            Err(InvalidEnvironment(name))
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Environment {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Environment {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Environment {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environments_are_dns_labels() {
        for good in ["production", "eu-west-1", "a", "0", &"x".repeat(63)] {
            let parsed: Environment = good.parse().unwrap_or_else(|err| panic!("{err}"));
            assert_eq!(parsed.to_string(), good);
        }
        // More names in cli::input's tests.
        for bad in ["", "../x", "UPPER", "n\u{e9}", "-x", &"x".repeat(64)] {
            let err = bad.parse::<Environment>().expect_err(bad);
            assert!(err.to_string().starts_with("invalid environment"), "{err}");
            assert!(Environment::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }
}
