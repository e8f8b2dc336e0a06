//! Parsing and checking of user input, before anything is sent: a bad value
//! gets one clear line and the cluster is not touched.

use std::collections::BTreeMap;

use chrono::Duration;
use serde_json::Value;

use crate::crd::{
    MAX_DURATION_SECONDS, MAX_METADATA_ENTRIES, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN,
    MAX_NAME_LEN, MAX_REASON_LEN, MIN_DURATION_SECONDS,
};
use crate::environment::{Environment, InvalidEnvironment, MAX_DNS_LABEL_LEN, is_dns_label};

/// A namespace is a DNS-1123 label. It becomes part of every request's path,
/// so anything else (`../kube-system`, `BAD NS`) is refused before a request.
pub fn namespace(name: &str) -> Result<String, String> {
    if is_dns_label(name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "invalid namespace {name:?}: a namespace is a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most {MAX_DNS_LABEL_LEN} characters"
        ))
    }
}

/// An environment name must be a DNS-1123 label: it is the object's name.
pub fn environment(name: &str) -> Result<Environment, String> {
    name.parse()
        .map_err(|err: InvalidEnvironment| err.to_string())
}

/// `--duration`: a bare number is minutes (the seed's unit); `90m`, `2h`,
/// `1h30m` are accepted too. Bounded to what the API server accepts.
pub fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let parsed = if let Ok(minutes) = text.parse::<i64>() {
        Some(Duration::minutes(minutes.clamp(-1, MAX_DURATION_SECONDS)))
    } else if text.starts_with('-') {
        Some(Duration::minutes(-1))
    } else {
        humantime::parse_duration(text)
            .ok()
            .and_then(|d| Duration::from_std(d).ok())
    };
    let Some(duration) = parsed else {
        return Err(format!(
            "invalid duration {text:?}: give minutes (30) or a number with a unit (90m, 2h)"
        ));
    };
    let seconds = duration.num_seconds();
    if !(MIN_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&seconds) {
        return Err(format!(
            "duration {text:?} is out of range: a lock lasts from 1 minute to 7 days (10080 minutes)"
        ));
    }
    // Whole seconds only, as stored.
    Ok(Duration::seconds(seconds))
}

/// A reason: required, not blank, bounded.
pub fn reason(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(
            "--reason must not be empty: say why, e.g. --reason \"Deploying version 2.1.0\"".into(),
        );
    }
    if trimmed.chars().count() > MAX_REASON_LEN {
        return Err(format!(
            "--reason is too long: at most {MAX_REASON_LEN} characters"
        ));
    }
    displayable("--reason", trimmed)?;
    Ok(trimmed.to_string())
}

/// Free text others see as written (`kubectl get` columns, chat
/// notifications): the admission policy refuses control characters, so
/// the CLI says so before sending anything.
fn displayable(flag: &str, text: &str) -> Result<(), String> {
    if crate::crd::is_display_text(text) {
        return Ok(());
    }
    Err(format!(
        "{flag} may not contain control characters (newlines, tabs, ESC), bidirectional formatting characters or line separators: others see it as written"
    ))
}

/// A short label (`--owner`, `--deployment-id`).
pub fn label(flag: &str, text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.chars().count() > MAX_NAME_LEN {
        return Err(format!("{flag} must be 1 to {MAX_NAME_LEN} characters"));
    }
    displayable(flag, trimmed)?;
    Ok(trimmed.to_string())
}

/// `--metadata`: a JSON object. Values are stored as strings, like
/// annotations; a non-string value is kept as its JSON text.
pub fn metadata(text: &str) -> Result<BTreeMap<String, String>, String> {
    let value: Value = serde_json::from_str(text).map_err(|err| {
        format!(
            "--metadata is not valid JSON ({err}): give an object, e.g. '{{\"version\":\"2.1.0\"}}'"
        )
    })?;
    let Value::Object(object) = value else {
        return Err("--metadata must be a JSON object, e.g. '{\"version\":\"2.1.0\"}'".into());
    };
    if object.len() > MAX_METADATA_ENTRIES {
        return Err(format!(
            "--metadata has {} keys: at most {MAX_METADATA_ENTRIES} are allowed",
            object.len()
        ));
    }
    let mut entries = BTreeMap::new();
    for (key, value) in object {
        if !metadata_key_is_valid(&key) {
            return Err(format!(
                "--metadata key {key:?} is invalid: use 1-{MAX_METADATA_KEY_LEN} letters, digits, '-', '_', '.', '/', starting and ending with a letter or digit"
            ));
        }
        let value = match value {
            Value::String(text) => text,
            other => other.to_string(),
        };
        if value.chars().count() > MAX_METADATA_VALUE_LEN {
            return Err(format!(
                "--metadata value of {key:?} is too long: at most {MAX_METADATA_VALUE_LEN} characters"
            ));
        }
        entries.insert(key, value);
    }
    Ok(entries)
}

fn metadata_key_is_valid(key: &str) -> bool {
    let alphanumeric = |c: char| c.is_ascii_alphanumeric();
    !key.is_empty()
        && key.len() <= MAX_METADATA_KEY_LEN
        && key.starts_with(alphanumeric)
        && key.ends_with(alphanumeric)
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_numbers_are_minutes_and_units_are_accepted() {
        assert_eq!(duration("30"), Ok(Duration::minutes(30)));
        assert_eq!(duration("90m"), Ok(Duration::minutes(90)));
        assert_eq!(duration("2h"), Ok(Duration::hours(2)));
        assert_eq!(duration("1h 30m"), Ok(Duration::minutes(90)));
        assert_eq!(duration("10080"), Ok(Duration::days(7)));
    }

    #[test]
    fn durations_out_of_range_or_malformed_are_refused() {
        for bad in [
            "0",
            "-5",
            "abc",
            "100000",
            "30s",
            "8d",
            "",
            "9223372036854775807",
        ] {
            let err = duration(bad).expect_err(bad);
            assert!(err.contains("duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn environments_are_dns_labels() {
        let parsed = |name: &str| environment(name).map(|env| env.to_string());
        assert_eq!(parsed("production"), Ok("production".into()));
        assert_eq!(parsed("eu-west-1"), Ok("eu-west-1".into()));
        for bad in [
            "Bad Name!",
            "",
            "-prod",
            "prod-",
            "Prod",
            "a.b",
            &"x".repeat(64),
        ] {
            assert!(environment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn namespaces_are_dns_labels() {
        for good in ["default", "kube-system", "team-a1", "a", &"n".repeat(63)] {
            assert_eq!(namespace(good), Ok(good.to_string()), "{good}");
        }
        for bad in [
            "",
            "BAD NS",
            "../kube-system",
            "kube-system/..",
            "a/b",
            "a.b",
            "Default",
            "-ns",
            "ns-",
            "ns\u{1b}[2J",
            "ns\n",
            "n\u{e9}",
            "%2e%2e",
            &"n".repeat(64),
        ] {
            let err = namespace(bad).expect_err(bad);
            assert!(err.starts_with("invalid namespace"), "{bad}: {err}");
            assert!(err.contains("DNS-1123 label"), "{bad}: {err}");
        }
    }

    #[test]
    fn metadata_must_be_a_bounded_object() {
        let parsed = metadata(r#"{"version":"2.1.0","replicas":3,"canary":true}"#).expect("valid");
        assert_eq!(parsed.get("version").map(String::as_str), Some("2.1.0"));
        assert_eq!(parsed.get("replicas").map(String::as_str), Some("3"));
        assert_eq!(parsed.get("canary").map(String::as_str), Some("true"));
        assert!(
            metadata("[1,2]")
                .expect_err("array")
                .contains("JSON object")
        );
        assert!(
            metadata("{not json")
                .expect_err("malformed")
                .contains("not valid JSON")
        );
        let too_many: String = format!(
            "{{{}}}",
            (0..33)
                .map(|i| format!("\"k{i}\":1"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(
            metadata(&too_many)
                .expect_err("too many")
                .contains("at most 32")
        );
        let long_value = format!("{{\"k\":\"{}\"}}", "x".repeat(1025));
        assert!(
            metadata(&long_value)
                .expect_err("long")
                .contains("too long")
        );
        assert!(
            metadata(r#"{"bad key":"v"}"#)
                .expect_err("key")
                .contains("invalid")
        );
    }

    #[test]
    fn reasons_must_say_something() {
        assert_eq!(reason("  Deploying 2.1.0 "), Ok("Deploying 2.1.0".into()));
        assert!(reason("   ").is_err());
        assert!(reason(&"x".repeat(1025)).is_err());
        assert!(reason("Deploying\n2.1.0").is_err());
        assert!(reason("Deploying \u{1b}[2J2.1.0").is_err());
        assert!(reason("D\u{e9}ploiement \u{1f680}").is_ok());
        assert!(label("--owner", "team\u{202e}x").is_err());
    }
}
