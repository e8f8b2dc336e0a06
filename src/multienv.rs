//! Several environments at once (`-e a -e b`, `--all-environments`): the
//! pure pieces. Locks are always taken in one total order, by environment
//! name, so two acquirers of overlapping sets never wait for each other in a
//! cycle (no deadlock); the holdings of one acquisition share a lock group ID.

use crate::environment::Environment;

// The lock of the namespace-wide freeze (config/admission/stop-the-line.yaml)
// is not an environment: never one of `--all-environments`, never one of a set.
use crate::crd::STOP_THE_LINE;

/// The environments in the order their locks are taken: sorted by name,
/// each once (`-e a -e a` is `-e a`).
pub fn lock_order(environments: &[Environment]) -> Vec<Environment> {
    let mut ordered = environments.to_vec();
    ordered.sort();
    ordered.dedup();
    ordered
}

/// The environments `--all-environments` acts on, from the names of the
/// namespace's DeploymentLocks: every one but stop-the-line, in lock order.
pub fn all_environments<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Environment> {
    let environments: Vec<Environment> = names
        .into_iter()
        .filter(|name| *name != STOP_THE_LINE)
        .filter_map(|name| name.parse().ok())
        .collect();
    lock_order(&environments)
}

/// A fresh lock group ID (a UUID: within the schema's 64 characters of
/// letters, digits and '-').
pub fn new_group_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The values of a list variable of `exec`'s command (DEPLOYLOCK_ENVIRONMENT,
/// DEPLOYLOCK_LOCK_ID, DEPLOYLOCK_FENCING_TOKEN with several environments):
/// space-separated, in lock order. No item holds a space (environments are
/// DNS labels, lock IDs letters, digits and '-', tokens numbers).
pub fn space_separated<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|item| item.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envs(names: &[&str]) -> Vec<Environment> {
        names
            .iter()
            .map(|name| {
                name.parse()
                    .unwrap_or_else(|err| panic!("{name} is not an environment: {err}"))
            })
            .collect()
    }

    /// Two acquirers naming the same environments in any order take them in
    /// the same order: the condition for never waiting in a cycle.
    #[test]
    fn every_permutation_gives_the_same_lock_order() {
        let expected = envs(&["a", "b", "c"]);
        for names in [
            ["a", "b", "c"],
            ["a", "c", "b"],
            ["b", "a", "c"],
            ["b", "c", "a"],
            ["c", "a", "b"],
            ["c", "b", "a"],
        ] {
            assert_eq!(lock_order(&envs(&names)), expected, "{names:?}");
        }
        // By name, not by length or insertion: "prod" < "production" < "staging".
        assert_eq!(
            lock_order(&envs(&["staging", "production", "prod"])),
            envs(&["prod", "production", "staging"])
        );
    }

    /// A repeated environment is acted on once.
    #[test]
    fn duplicates_are_dropped() {
        assert_eq!(lock_order(&envs(&["b", "a", "b", "a"])), envs(&["a", "b"]));
        assert_eq!(lock_order(&envs(&["a", "a"])), envs(&["a"]));
        assert!(lock_order(&[]).is_empty());
    }

    /// --all-environments: every lock of the namespace but stop-the-line.
    #[test]
    fn all_environments_leaves_out_stop_the_line() {
        assert_eq!(
            all_environments(["staging", "stop-the-line", "production"]),
            envs(&["production", "staging"])
        );
        assert!(all_environments(["stop-the-line"]).is_empty());
    }

    #[test]
    fn group_ids_fit_the_schema() {
        let id = new_group_id();
        assert!(id.len() <= crate::crd::MAX_ID_LEN, "{id}");
        assert!(
            id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{id}"
        );
        assert_ne!(id, new_group_id());
    }

    #[test]
    fn list_variables_are_space_separated() {
        assert_eq!(space_separated(envs(&["a", "b"])), "a b");
        assert_eq!(space_separated([41_i64, 7]), "41 7");
        assert_eq!(space_separated(Vec::<String>::new()), "");
    }
}
