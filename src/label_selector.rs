//! The schema of a label-selector field (a metav1 `LabelSelector`), shared by
//! the kinds that select by label: bounded, so the CEL rules stay cheap, and
//! checked as the API server checks selectors.
//!
//! A field using it says `#[schemars(default, schema_with = ...)]`:
//! `schema_with` hides the `Option` from schemars, which would otherwise make
//! the field required.

/// A label key: an optional DNS-subdomain prefix and '/', then a name of at
/// most 63 characters.
pub const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A label value: empty, or at most 63 characters.
pub const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";

/// The schema of the selector field `field` (its name in messages) that
/// selects `subject`s (for descriptions: "a lock", "a namespace"):
/// label keys and values well-formed, In and NotIn with values, Exists and
/// DoesNotExist without.
pub fn schema(field: &str, subject: &str) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "properties": {
            "matchLabels": {
                "description": format!("Labels {subject} must carry, each with exactly this value."),
                "type": "object",
                "maxProperties": 32,
                "additionalProperties": {
                    "type": "string",
                    "maxLength": 63,
                    "pattern": LABEL_VALUE_PATTERN,
                },
                "x-kubernetes-validations": [{
                    "rule": format!("self.all(key, key.matches('{}'))", LABEL_KEY_PATTERN.replace('\\', "\\\\")),
                    "message": format!("{field}.matchLabels: every key must be a label key (an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.')"),
                }],
            },
            "matchExpressions": {
                "description": format!("Requirements {subject}'s labels must all meet."),
                "type": "array",
                "maxItems": 16,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 317,
                            "pattern": LABEL_KEY_PATTERN,
                        },
                        "operator": {
                            "description": "In, NotIn, Exists or DoesNotExist.",
                            "type": "string",
                            "enum": ["In", "NotIn", "Exists", "DoesNotExist"],
                        },
                        "values": {
                            "type": "array",
                            "maxItems": 64,
                            "items": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
                        },
                    },
                    "x-kubernetes-validations": [{
                        "rule": "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                        "message": format!("{field}: In and NotIn need values, Exists and DoesNotExist take none"),
                    }],
                },
            },
        },
        "x-kubernetes-map-type": "atomic",
    })
}
