//! Unit and property tests of the gating decision: over initial states
//! (suspended or not, automated or not, sync options present or not, bound
//! or not), lock histories (held, by the deployer, released, expired, a
//! status not yet current, deleted), a person's edits, controllers that stop
//! between deciding and writing, and stale writes from a former leader.

use super::*;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const LOCK_NAMESPACE: &str = "deploy";
const ENVIRONMENT: &str = "production";
const DEPLOYER: &str = "system:serviceaccount:argocd:deploy-hook";

fn lock(holder: Option<(&str, &str)>, generation: i64, status: Option<(&str, i64, &str)>) -> Value {
    let mut lock = json!({
        "apiVersion": "deploylock.dev/v1", "kind": "DeploymentLock",
        "metadata": {"name": ENVIRONMENT, "namespace": LOCK_NAMESPACE, "generation": generation},
        "spec": {"environment": ENVIRONMENT},
    });
    if let Some((lock_id, user)) = holder {
        lock["spec"]["holder"] = json!({
            "lockId": lock_id, "user": user, "owner": user, "type": "manual",
            "reason": "migration", "acquiredAt": "2026-11-27T10:00:00Z",
            "expiresAt": "2026-11-27T11:00:00Z", "durationSeconds": 3600,
        });
    }
    if let Some((lock_id, observed, state)) = status {
        lock["status"] = json!({"lockId": lock_id, "observedGeneration": observed, "state": state});
    }
    lock
}

fn kustomization(suspend: Option<bool>) -> Value {
    let mut object = json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "app", "namespace": "flux-system", "resourceVersion": "1",
                     "labels": {ENVIRONMENT_LABEL: ENVIRONMENT},
                     "annotations": {LOCK_NAMESPACE_ANNOTATION: LOCK_NAMESPACE}},
        "spec": {"interval": "1m", "path": "./deploy", "prune": true,
                 "sourceRef": {"kind": "GitRepository", "name": "app"}},
    });
    if let Some(suspend) = suspend {
        object["spec"]["suspend"] = json!(suspend);
    }
    object
}

#[test]
fn holding_follows_the_workload_gate_rule() {
    assert_eq!(holding_of(&lock(None, 1, None)), None);
    // Status not yet current for the holding: held.
    assert!(holding_of(&lock(Some(("a", "bob")), 2, None)).is_some());
    assert!(holding_of(&lock(Some(("a", "bob")), 2, Some(("a", 1, "Expired")))).is_some());
    assert!(holding_of(&lock(Some(("b", "bob")), 2, Some(("a", 2, "Available")))).is_some());
    assert!(holding_of(&lock(Some(("a", "bob")), 2, Some(("a", 2, "Locked")))).is_some());
    assert!(holding_of(&lock(Some(("a", "bob")), 2, Some(("a", 2, "ForceLocked")))).is_some());
    assert_eq!(
        holding_of(&lock(Some(("a", "bob")), 2, Some(("a", 2, "Expired")))),
        None
    );
}

#[test]
fn a_kustomization_a_person_suspended_stays_suspended() {
    let held = lock(Some(("a", "bob")), 2, Some(("a", 2, "Locked")));
    let mut object = kustomization(Some(true));
    let change = decide(GitOpsKind::Kustomization, &object, Some(&held)).expect("gated");
    assert_eq!(change.action, Action::Gated);
    assert!(!change.changes_field);
    apply_merge_patch(&mut object, &change.patch);
    assert_eq!(
        decide(GitOpsKind::Kustomization, &object, Some(&held)),
        None
    );
    let change = decide(GitOpsKind::Kustomization, &object, None).expect("restored");
    assert_eq!(change.action, Action::Restored);
    apply_merge_patch(&mut object, &change.patch);
    assert_eq!(object, {
        let mut expected = kustomization(Some(true));
        expected["metadata"]["annotations"] = json!({LOCK_NAMESPACE_ANNOTATION: LOCK_NAMESPACE});
        expected
    });
}

#[test]
fn the_deployers_holding_and_unbound_objects_are_left_alone() {
    let mut object = kustomization(None);
    object["metadata"]["annotations"][DEPLOYER_ANNOTATION] = json!(format!("ci, {DEPLOYER}"));
    let by_deployer = lock(Some(("a", DEPLOYER)), 2, None);
    assert_eq!(
        decide(GitOpsKind::Kustomization, &object, Some(&by_deployer)),
        None
    );
    let by_bob = lock(Some(("a", "bob")), 2, None);
    assert!(decide(GitOpsKind::Kustomization, &object, Some(&by_bob)).is_some());
    let mut unbound = kustomization(None);
    unbound["metadata"]["labels"] = json!({});
    assert_eq!(
        decide(GitOpsKind::Kustomization, &unbound, Some(&by_bob)),
        None
    );
}

#[test]
fn the_patch_is_conditional_and_touches_only_the_field_and_the_annotation() {
    let mut object = json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
        "metadata": {"name": "web", "namespace": LOCK_NAMESPACE, "resourceVersion": "42",
                     "labels": {ENVIRONMENT_LABEL: ENVIRONMENT}},
        "spec": {"project": "default", "syncPolicy": {
            "automated": {"prune": true, "selfHeal": true},
            "syncOptions": ["CreateNamespace=true"], "retry": {"limit": 3}}},
    });
    let held = lock(Some(("a", "bob")), 2, None);
    let change = decide(GitOpsKind::Application, &object, Some(&held)).expect("gated");
    assert_eq!(change.patch["metadata"]["resourceVersion"], json!("42"));
    assert_eq!(
        change.patch["spec"],
        json!({"syncPolicy": {"automated": null}})
    );
    let before = object.clone();
    apply_merge_patch(&mut object, &change.patch);
    assert_eq!(
        object["spec"]["syncPolicy"],
        json!({"syncOptions": ["CreateNamespace=true"], "retry": {"limit": 3}})
    );
    let change = decide(GitOpsKind::Application, &object, None).expect("restored");
    apply_merge_patch(&mut object, &change.patch);
    object["metadata"]["annotations"] = Value::Null;
    let mut expected = before;
    expected["metadata"]["annotations"] = Value::Null;
    assert_eq!(object, expected);
}

#[test]
fn removing_the_label_while_gated_restores_and_a_handover_keeps_the_original() {
    let bob = lock(Some(("a", "bob")), 2, None);
    let mut object = kustomization(Some(false));
    let change = decide(GitOpsKind::Kustomization, &object, Some(&bob)).expect("gated");
    apply_merge_patch(&mut object, &change.patch);
    // Taken over by carol (a new holding): still gated, same original.
    let carol = lock(Some(("b", "carol")), 3, None);
    let change = decide(GitOpsKind::Kustomization, &object, Some(&carol)).expect("handed over");
    assert_eq!(change.action, Action::HandedOver);
    assert!(!change.changes_field);
    assert_eq!(
        change.saved.as_ref().and_then(|saved| saved.value.clone()),
        Some(json!(false))
    );
    apply_merge_patch(&mut object, &change.patch);
    // The label removed: no longer bound, restored although the lock is held.
    object["metadata"]["labels"] = json!({});
    let change = decide(GitOpsKind::Kustomization, &object, None).expect("restored");
    assert_eq!(change.action, Action::Restored);
    assert!(change.note.contains("no longer bound"), "{}", change.note);
    apply_merge_patch(&mut object, &change.patch);
    assert_eq!(object["spec"]["suspend"], json!(false));
    assert_eq!(saved_of(&object), SavedState::Absent);
}

/// Someone who may edit the object names the current holder a deployer:
/// the object is restored (the annotation is the object's own word), and
/// the note says why instead of claiming the lock is free.
#[test]
fn a_deployer_named_while_gated_is_not_reported_as_a_free_lock() {
    let bob = lock(Some(("a", "bob")), 2, None);
    let mut object = kustomization(None);
    let change = decide(GitOpsKind::Kustomization, &object, Some(&bob)).expect("gated");
    apply_merge_patch(&mut object, &change.patch);
    object["metadata"]["annotations"][DEPLOYER_ANNOTATION] = json!("bob");
    let change = decide(GitOpsKind::Kustomization, &object, Some(&bob)).expect("restored");
    assert_eq!(change.action, Action::Restored);
    assert!(
        change.note.contains("is held by bob") && change.note.contains(DEPLOYER_ANNOTATION),
        "{}",
        change.note
    );
    assert!(!change.note.contains("no longer locked"), "{}", change.note);
}

#[test]
fn an_unreadable_saved_state_is_never_taken_for_a_release() {
    let mut object = kustomization(Some(true));
    object["metadata"]["annotations"][SAVED_ANNOTATION] = json!("{not json");
    let change = decide(GitOpsKind::Kustomization, &object, None).expect("abandoned");
    assert_eq!(change.action, Action::Abandoned);
    assert!(change.patch.get("spec").is_none());
    let held = lock(Some(("a", "bob")), 2, None);
    let change = decide(GitOpsKind::Kustomization, &object, Some(&held)).expect("gated");
    assert_eq!(
        change.saved.and_then(|saved| saved.value),
        Some(json!(true))
    );
}

// ---------------------------------------------------------------------------
// Property: any history converges to "gated while held by another, exactly
// restored otherwise", touching nothing else.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    /// A new holding (status not yet current).
    Acquire {
        by_deployer: bool,
    },
    /// The controller's status catches up with the holding (Locked).
    StatusLocked,
    /// The holding expires (status Expired, current).
    Expire,
    Release,
    DeleteLock,
    /// A person sets the gated field (None: removes it).
    Edit(Option<Value>),
    /// A person changes something else in the spec.
    EditOther,
    /// A controller decides and writes.
    Reconcile,
    /// A controller decides, then stops (SIGKILL) before writing, or keeps
    /// the write for later (a former leader's late request).
    DecideOnly,
    /// The kept write arrives (refused if the object moved on).
    LateWrite,
}

#[derive(Clone, Debug)]
struct World {
    kind: GitOpsKind,
    object: Value,
    lock: Option<Value>,
    holdings: u32,
    generation: i64,
    late: Option<Change>,
    /// What the field must be once no lock gates it.
    desired: Option<Value>,
    resource_version: u64,
}

impl World {
    fn new(
        kind: GitOpsKind,
        original: Option<Value>,
        sync_options: bool,
        retry: bool,
        with_deployer: bool,
    ) -> World {
        let mut object = match kind {
            GitOpsKind::Application => json!({
                "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
                "metadata": {"name": "web", "namespace": "argocd"},
                "spec": {"project": "default", "destination": {"namespace": "shop"}},
            }),
            _ => {
                let mut object = kustomization(None);
                object["kind"] = json!(kind.kind());
                object
            }
        };
        object["metadata"]["resourceVersion"] = json!("1");
        object["metadata"]["labels"] = json!({ENVIRONMENT_LABEL: ENVIRONMENT, "team": "shop"});
        object["metadata"]["annotations"] =
            json!({LOCK_NAMESPACE_ANNOTATION: LOCK_NAMESPACE, "note": "x"});
        if with_deployer {
            object["metadata"]["annotations"][DEPLOYER_ANNOTATION] = json!(DEPLOYER);
        }
        if kind == GitOpsKind::Application && (sync_options || retry) {
            object["spec"]["syncPolicy"] = json!({});
            if sync_options {
                object["spec"]["syncPolicy"]["syncOptions"] =
                    json!(["CreateNamespace=true", "ServerSideApply=true"]);
            }
            if retry {
                object["spec"]["syncPolicy"]["retry"] =
                    json!({"limit": 5, "backoff": {"duration": "5s"}});
            }
        }
        let mut world = World {
            kind,
            object,
            lock: None,
            holdings: 0,
            generation: 1,
            late: None,
            desired: original.clone(),
            resource_version: 1,
        };
        world.set_field(original);
        world.resource_version = 1;
        world.object["metadata"]["resourceVersion"] = json!("1");
        world
    }

    fn bump(&mut self) {
        self.resource_version += 1;
        self.object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
    }

    fn set_field(&mut self, value: Option<Value>) {
        // A person replaces the value (kubectl edit), not merges into it.
        apply_merge_patch(&mut self.object, &nested(self.kind.field(), Value::Null));
        if let Some(value) = value {
            apply_merge_patch(&mut self.object, &nested(self.kind.field(), value));
        }
        self.bump();
    }

    fn field(&self) -> Option<Value> {
        field_value(&self.object, self.kind.field())
    }

    fn holding(&self) -> Option<(String, String)> {
        let lock = self.lock.as_ref()?;
        let holder = lock.pointer("/spec/holder")?;
        Some((
            holder["lockId"].as_str()?.into(),
            holder["user"].as_str()?.into(),
        ))
    }

    fn gated_by_lock(&self) -> bool {
        let with_deployer = self
            .object
            .pointer(&format!(
                "/metadata/annotations/{}",
                DEPLOYER_ANNOTATION.replace('/', "~1")
            ))
            .is_some();
        self.lock
            .as_ref()
            .and_then(holding_of)
            .is_some_and(|holding| !(with_deployer && holding.user == DEPLOYER))
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::Acquire { by_deployer } => {
                self.holdings += 1;
                self.generation += 1;
                let id = format!("h{}", self.holdings);
                let user = if *by_deployer { DEPLOYER } else { "bob" };
                let status = self
                    .lock
                    .as_ref()
                    .and_then(|lock| lock.get("status").cloned());
                let mut next = lock(Some((&id, user)), self.generation, None);
                if let Some(status) = status {
                    next["status"] = status;
                }
                self.lock = Some(next);
            }
            Step::StatusLocked | Step::Expire => {
                if let Some((id, user)) = self.holding() {
                    let state = if matches!(step, Step::Expire) {
                        "Expired"
                    } else {
                        "Locked"
                    };
                    self.lock = Some(lock(
                        Some((&id, &user)),
                        self.generation,
                        Some((&id, self.generation, state)),
                    ));
                }
            }
            Step::Release => {
                if self.lock.is_some() {
                    self.generation += 1;
                    self.lock = Some(lock(None, self.generation, None));
                }
            }
            Step::DeleteLock => self.lock = None,
            Step::Edit(value) => {
                let saved = match saved_of(&self.object) {
                    SavedState::Readable(saved) => Some(saved),
                    _ => None,
                };
                // Setting the gated value under a saved state cannot be told
                // from the controller's own gating: the saved value stands.
                self.desired = match saved {
                    Some(saved) if self.kind.is_gated(value.as_ref()) => saved.value,
                    _ => value.clone(),
                };
                self.set_field(value.clone());
            }
            Step::EditOther => {
                self.object["spec"]["interval"] = json!(format!("{}m", self.resource_version));
                self.bump();
            }
            Step::Reconcile => {
                if let Some(change) = decide(self.kind, &self.object, self.lock.as_ref()) {
                    self.write(&change);
                }
            }
            Step::DecideOnly => self.late = decide(self.kind, &self.object, self.lock.as_ref()),
            Step::LateWrite => {
                if let Some(change) = self.late.take() {
                    self.write(&change);
                }
            }
        }
    }

    /// The API server's side: a merge patch whose resourceVersion is not
    /// the object's is refused (409).
    fn write(&mut self, change: &Change) {
        if change.patch["metadata"]["resourceVersion"] != self.object["metadata"]["resourceVersion"]
        {
            return;
        }
        let mut patch = change.patch.clone();
        if let Some(metadata) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.remove("resourceVersion");
        }
        apply_merge_patch(&mut self.object, &patch);
        // A restore records the person's value as the desired one from now
        // on (KeptEdit keeps it; Restored brings back what was desired).
        self.bump();
    }

    /// Runs the controller until it has nothing to do; fails past 2 writes.
    fn converge(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..3 {
            match decide(self.kind, &self.object, self.lock.as_ref()) {
                None => return Ok(()),
                Some(change) => self.write(&change),
            }
        }
        Err(TestCaseError::fail(format!(
            "no fixpoint after 3 writes: {:?}",
            self.object
        )))
    }
}

fn field_values(kind: GitOpsKind) -> BoxedStrategy<Option<Value>> {
    match kind {
        GitOpsKind::Application => prop_oneof![
            Just(None),
            Just(Some(json!({}))),
            Just(Some(json!({"prune": true}))),
            Just(Some(
                json!({"prune": true, "selfHeal": true, "allowEmpty": false})
            )),
            Just(Some(json!({"enabled": false, "selfHeal": true}))),
        ]
        .boxed(),
        _ => prop_oneof![
            Just(None),
            Just(Some(json!(false))),
            Just(Some(json!(true)))
        ]
        .boxed(),
    }
}

fn steps(kind: GitOpsKind) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => any::<bool>().prop_map(|by_deployer| Step::Acquire { by_deployer }),
        2 => Just(Step::StatusLocked),
        2 => Just(Step::Expire),
        2 => Just(Step::Release),
        1 => Just(Step::DeleteLock),
        2 => field_values(kind).prop_map(Step::Edit),
        1 => Just(Step::EditOther),
        6 => Just(Step::Reconcile),
        2 => Just(Step::DecideOnly),
        2 => Just(Step::LateWrite),
    ];
    proptest::collection::vec(step, 0..24)
}

fn scenario() -> impl Strategy<Value = (World, Vec<Step>)> {
    prop_oneof![
        Just(GitOpsKind::Kustomization),
        Just(GitOpsKind::HelmRelease),
        Just(GitOpsKind::Application)
    ]
    .prop_flat_map(|kind| {
        (
            field_values(kind),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            steps(kind),
        )
            .prop_map(move |(original, sync_options, retry, deployer, steps)| {
                (
                    World::new(kind, original, sync_options, retry, deployer),
                    steps,
                )
            })
    })
}

/// The object with the gated field and the saved annotation taken out, and
/// the spec's other fields and metadata otherwise as people left them.
fn untouched_part(world: &World) -> Value {
    let mut object = world.object.clone();
    apply_merge_patch(&mut object, &nested(world.kind.field(), Value::Null));
    apply_merge_patch(
        &mut object,
        &json!({"metadata": {"resourceVersion": null, "annotations": {SAVED_ANNOTATION: null}}}),
    );
    if world.kind == GitOpsKind::Application && object["spec"]["syncPolicy"] == json!({}) {
        object["spec"]
            .as_object_mut()
            .map(|spec| spec.remove("syncPolicy"));
    }
    object
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    })]

    #[test]
    fn gating_converges_and_restores_exactly((world, steps) in scenario()) {
        let mut world = world;
        let mut expected_rest = untouched_part(&world);
        for step in &steps {
            world.step(step);
            if matches!(step, Step::EditOther) {
                expected_rest = untouched_part(&world);
            }
            // After a completed reconcile the object matches the lock.
            if matches!(step, Step::Reconcile) && decide(world.kind, &world.object, world.lock.as_ref()).is_none() {
                prop_assert_eq!(world.kind.is_gated(world.field().as_ref()) || !world.gated_by_lock(), true);
            }
        }
        world.converge()?;
        // Idempotent: nothing more to do, even for a restarted controller.
        prop_assert_eq!(decide(world.kind, &world.object, world.lock.as_ref()), None);
        let saved = saved_of(&world.object);
        if world.gated_by_lock() {
            prop_assert!(world.kind.is_gated(world.field().as_ref()), "held but not gated: {:?}", world.object);
            let readable = matches!(&saved, SavedState::Readable(_));
            prop_assert!(readable, "held without a saved state");
            // Release now: the desired value comes back exactly.
            world.step(&Step::Release);
            world.converge()?;
        }
        prop_assert_eq!(saved_of(&world.object), SavedState::Absent);
        prop_assert_eq!(world.field(), world.desired.clone(), "object: {:?}", world.object);
        prop_assert_eq!(untouched_part(&world), expected_rest);
    }
}
