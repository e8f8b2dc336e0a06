//! The message for one lock transition, and its body for each provider.
//! Pure: no I/O, so every format is checked by unit tests; the integration
//! tests check what a real receiver gets.
//!
//! Formats, as each service documents its incoming webhooks:
//! - Slack: JSON `text` (the notification fallback) and Block Kit `blocks`.
//! - Microsoft Teams (Workflows): `{"type":"message","attachments":[{
//!   "contentType":"application/vnd.microsoft.card.adaptive","content":<card>}]}`.
//! - Discord: `content` (at most 2000 characters) and `embeds` (title at
//!   most 256, description at most 4096, at most 25 fields of at most 1024).
//! - Google Chat: `text`.
//! - Mattermost: `text`, optional `channel` and `username`, `props`.
//! - generic / generic-hmac: the Lock Information as JSON; generic-hmac adds
//!   `X-Signature: sha256=<hex HMAC-SHA256 of the body>` (Flux's format).
//! - CloudEvents 1.0, structured mode: `application/cloudevents+json` with
//!   `specversion`, `id`, `source`, `type`, `subject`, `time`, `data`.

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::ProviderType;
use crate::crd::{HistoryAction, LockState, LockType, OverriddenHolding};

/// What happened, as announced.
#[derive(Clone, Debug, PartialEq)]
pub enum Occurrence {
    /// A history entry.
    Transition(HistoryAction),
    /// The holding passed its expiry.
    Expired,
    /// The lock has been held longer than the reminder threshold
    /// (the reminder's number: 1, 2, ...).
    Reminder(i64),
    /// A client took a new place in the wait queue (its place: 1, 2, ...).
    WaiterQueued(usize),
    /// `deploylock notify test`.
    Test,
}

impl Occurrence {
    /// Name in generic bodies and CloudEvents types.
    pub fn name(&self) -> &'static str {
        match self {
            Occurrence::Transition(action) => match action {
                HistoryAction::Acquired => "Acquired",
                HistoryAction::TookOverExpired => "TookOverExpired",
                HistoryAction::Extended => "Extended",
                HistoryAction::Released => "Released",
                HistoryAction::ForceAcquired => "ForceAcquired",
                HistoryAction::ForceReleased => "ForceReleased",
                HistoryAction::Cleared => "Cleared",
            },
            Occurrence::Expired => "Expired",
            Occurrence::Reminder(_) => "Reminder",
            Occurrence::WaiterQueued(_) => "WaiterQueued",
            Occurrence::Test => "Test",
        }
    }
}

/// One notification: everything a person needs to know about a transition.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Idempotency key: the same for every attempt, across restarts.
    pub key: String,
    pub occurrence: Occurrence,
    pub namespace: String,
    pub environment: String,
    pub lock_uid: String,
    /// History sequence, for transitions.
    pub sequence: Option<i64>,
    /// When it happened (API server clock).
    pub at: DateTime<Utc>,
    /// The lock's state after it.
    pub state: LockState,
    pub lock_id: Option<String>,
    /// Identity that made the change.
    pub by: Option<String>,
    /// Display label of the holder concerned.
    pub owner: Option<String>,
    pub reason: Option<String>,
    pub lock_type: Option<LockType>,
    pub acquired_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub deployment_id: Option<String>,
    /// For a forced takeover: the holding that was overridden.
    pub overridden: Option<OverriddenHolding>,
    /// For a queued waiter: the ID of its queue place, and the current
    /// holder's display label (None: the lock is free).
    pub waiter_id: Option<String>,
    pub waiting_for: Option<String>,
}

/// A request body and its headers, ready to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// Options of the provider that shape the body.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Style {
    pub channel: Option<String>,
    pub username: Option<String>,
}

fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Message {
    /// Title line, e.g. "production locked".
    pub fn title(&self) -> String {
        let env = &self.environment;
        match &self.occurrence {
            Occurrence::Transition(action) => match action {
                HistoryAction::Acquired => format!("{env} locked"),
                HistoryAction::TookOverExpired => format!("{env} locked (expired lock taken over)"),
                HistoryAction::Extended => format!("{env} lock extended"),
                HistoryAction::Released => format!("{env} released"),
                HistoryAction::ForceAcquired => format!("{env} FORCE-locked (emergency)"),
                HistoryAction::ForceReleased => format!("{env} force-released"),
                HistoryAction::Cleared => format!("{env} expired lock cleared"),
            },
            Occurrence::Expired => format!("{env} lock expired"),
            Occurrence::Reminder(n) => format!("{env} still locked (reminder {n})"),
            Occurrence::WaiterQueued(place) => {
                format!("{env} wanted: waiter queued (place {place})")
            }
            Occurrence::Test => format!("deploylock test message for {env}"),
        }
    }

    /// One line saying who and why: the plain-text fallback.
    pub fn summary(&self) -> String {
        let mut line = self.title();
        if let Some(by) = &self.by {
            line.push_str(&format!(" by {by}"));
        }
        if let Some(owner) = &self.owner
            && Some(owner) != self.by.as_ref()
        {
            let role = if self.waiter_id.is_some() {
                "as"
            } else {
                "holder"
            };
            line.push_str(&format!(" ({role} {owner})"));
        }
        if let Some(reason) = &self.reason
            && !reason.is_empty()
        {
            line.push_str(&format!(": {reason}"));
        }
        if let Some(until) = &self.expires_at
            && !matches!(
                self.occurrence,
                Occurrence::Transition(HistoryAction::Released | HistoryAction::Cleared)
            )
        {
            line.push_str(&format!(" (until {})", time(until)));
        }
        if let Some(holder) = &self.waiting_for {
            line.push_str(&format!("; held by {holder}"));
        }
        line
    }

    /// A command that shows more.
    pub fn command(&self) -> String {
        format!(
            "deploylock status {} -n {}   (or: kubectl get dlock {} -n {} -o yaml)",
            self.environment, self.namespace, self.environment, self.namespace
        )
    }

    /// Labelled facts, in display order (absent ones left out).
    pub fn facts(&self) -> Vec<(&'static str, String)> {
        let mut facts = vec![
            ("Environment", self.environment.clone()),
            ("Namespace", self.namespace.clone()),
            ("State", self.state.to_string()),
        ];
        let mut push = |label, value: Option<String>| {
            if let Some(value) = value {
                facts.push((label, value));
            }
        };
        push("By", self.by.clone());
        let owner_label = if self.waiter_id.is_some() {
            "Waiter"
        } else {
            "Holder"
        };
        push(owner_label, self.owner.clone());
        push("Waiting for", self.waiting_for.clone());
        push("Reason", self.reason.clone().filter(|r| !r.is_empty()));
        push("Type", self.lock_type.map(|t| t.to_string()));
        push("Since", self.acquired_at.as_ref().map(time));
        push("Until", self.expires_at.as_ref().map(time));
        push("Deployment", self.deployment_id.clone());
        push(
            "Overrode",
            self.overridden
                .as_ref()
                .map(|o| format!("{} ({}): {}", o.owner, o.user, o.reason)),
        );
        push("Lock ID", self.lock_id.clone());
        push("Queue place ID", self.waiter_id.clone());
        facts
    }

    /// The Lock Information as JSON: the generic body and CloudEvents data.
    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "idempotencyKey": self.key,
            "event": self.occurrence.name(),
            "namespace": self.namespace,
            "environment": self.environment,
            "lockUid": self.lock_uid,
            "at": time(&self.at),
            "state": self.state.to_string(),
            "summary": self.summary(),
            "command": self.command(),
        });
        let object = body.as_object_mut().expect("a JSON object");
        let mut put = |field: &str, value: Option<Value>| {
            if let Some(value) = value {
                object.insert(field.to_string(), value);
            }
        };
        put("sequence", self.sequence.map(Value::from));
        put(
            "reminder",
            match self.occurrence {
                Occurrence::Reminder(n) => Some(Value::from(n)),
                _ => None,
            },
        );
        put(
            "queuePosition",
            match self.occurrence {
                Occurrence::WaiterQueued(place) => Some(Value::from(place)),
                _ => None,
            },
        );
        put("waiterId", self.waiter_id.clone().map(Value::from));
        put("waitingFor", self.waiting_for.clone().map(Value::from));
        put("lockId", self.lock_id.clone().map(Value::from));
        put("by", self.by.clone().map(Value::from));
        put("owner", self.owner.clone().map(Value::from));
        put("reason", self.reason.clone().map(Value::from));
        put("type", self.lock_type.map(|t| Value::from(t.to_string())));
        put(
            "acquiredAt",
            self.acquired_at.as_ref().map(|t| Value::from(time(t))),
        );
        put(
            "expiresAt",
            self.expires_at.as_ref().map(|t| Value::from(time(t))),
        );
        put("deploymentId", self.deployment_id.clone().map(Value::from));
        put(
            "overridden",
            self.overridden.as_ref().map(|o| {
                json!({"lockId": o.lock_id, "user": o.user, "owner": o.owner, "reason": o.reason})
            }),
        );
        body
    }
}

/// At most `max` characters of `text` (an ellipsis marks a cut).
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(max.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}

/// Slack's mrkdwn control characters, escaped as Slack asks.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The body for `provider`, with its content type and headers (the
/// idempotency key on every one; the signature is added by [`sign`]).
pub fn render(provider: ProviderType, message: &Message, style: &Style) -> Rendered {
    let json_body = |value: Value| serde_json::to_vec(&value).unwrap_or_default();
    let headers = vec![(super::IDEMPOTENCY_HEADER, message.key.clone())];
    let (content_type, body) = match provider {
        ProviderType::Slack => ("application/json", json_body(slack(message, style))),
        ProviderType::Msteams => ("application/json", json_body(msteams(message))),
        ProviderType::Discord => ("application/json", json_body(discord(message, style))),
        ProviderType::Googlechat => ("application/json", json_body(googlechat(message))),
        ProviderType::Mattermost => ("application/json", json_body(mattermost(message, style))),
        ProviderType::Generic | ProviderType::GenericHmac => {
            ("application/json", json_body(message.to_json()))
        }
        ProviderType::Cloudevents => (
            "application/cloudevents+json; charset=utf-8",
            json_body(cloudevent(message)),
        ),
    };
    Rendered {
        content_type,
        body,
        headers,
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` keyed with `key`.
pub fn sign(body: &[u8], key: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn slack(message: &Message, style: &Style) -> Value {
    // Section fields: at most 10, each at most 2000 characters.
    let fields: Vec<Value> = message
        .facts()
        .into_iter()
        .take(10)
        .map(|(label, value)| {
            json!({"type": "mrkdwn", "text": clip(&format!("*{label}*\n{}", slack_escape(&value)), 2000)})
        })
        .collect();
    let body = json!({
        "text": clip(&slack_escape(&message.summary()), 3000),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": clip(&message.title(), 150)}},
            {"type": "section",
             "text": {"type": "mrkdwn", "text": clip(&slack_escape(&message.summary()), 3000)},
             "fields": fields},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": clip(&format!("`{}` · key {}", slack_escape(&message.command()), message.key), 3000)}
            ]}
        ]
    });
    with_channel_and_username(body, style)
}

fn msteams(message: &Message) -> Value {
    let facts: Vec<Value> = message
        .facts()
        .into_iter()
        .map(|(label, value)| json!({"title": label, "value": value}))
        .collect();
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "fallbackText": message.summary(),
                "body": [
                    {"type": "TextBlock", "size": "Medium", "weight": "Bolder", "text": message.title(), "wrap": true},
                    {"type": "TextBlock", "text": message.summary(), "wrap": true},
                    {"type": "FactSet", "facts": facts},
                    {"type": "TextBlock", "text": message.command(), "isSubtle": true, "fontType": "Monospace", "wrap": true},
                    {"type": "TextBlock", "text": format!("key {}", message.key), "isSubtle": true, "size": "Small", "wrap": true}
                ]
            }
        }]
    })
}

fn discord(message: &Message, style: &Style) -> Value {
    let fields: Vec<Value> = message
        .facts()
        .into_iter()
        .take(25)
        .map(|(label, value)| json!({"name": label, "value": clip(&value, 1024), "inline": true}))
        .collect();
    let color = match &message.occurrence {
        Occurrence::Transition(HistoryAction::ForceAcquired | HistoryAction::ForceReleased) => {
            0xE0_1E_5A
        }
        Occurrence::Transition(HistoryAction::Released | HistoryAction::Cleared) => 0x2E_B6_7D,
        Occurrence::Expired | Occurrence::Reminder(_) => 0xEC_B2_2E,
        Occurrence::WaiterQueued(_) => 0x9B_59_B6,
        _ => 0x36_C5_F0,
    };
    let mut body = json!({
        "content": clip(&message.summary(), 2000),
        // Reasons are free text: no @everyone or role pings from them.
        "allowed_mentions": {"parse": []},
        "embeds": [{
            "title": clip(&message.title(), 256),
            "description": clip(&message.command(), 4096),
            "timestamp": time(&message.at),
            "color": color,
            "fields": fields,
            "footer": {"text": clip(&format!("key {}", message.key), 2048)}
        }]
    });
    if let (Some(username), Some(object)) = (&style.username, body.as_object_mut()) {
        object.insert("username".into(), Value::from(username.clone()));
    }
    body
}

fn plain_lines(message: &Message, bold: (&str, &str)) -> String {
    let mut text = format!(
        "{}{}{}\n{}\n",
        bold.0,
        message.title(),
        bold.1,
        message.summary()
    );
    for (label, value) in message.facts() {
        text.push_str(&format!("{label}: {value}\n"));
    }
    text.push_str(&format!("{}\nkey {}", message.command(), message.key));
    text
}

/// Google Chat and Mattermost have no switch to turn mentions off (Discord
/// has `allowed_mentions`, Slack's `<!channel>` is escaped): a reason or
/// owner label saying `@channel`, `@all` or `<users/all>` would page the
/// whole channel. A word joiner after `@` and `<` keeps the text as it reads
/// and makes it no mention.
fn without_mentions(text: &str) -> String {
    let mut defanged = String::with_capacity(text.len());
    for c in text.chars() {
        defanged.push(c);
        if matches!(c, '@' | '<') {
            defanged.push('\u{2060}');
        }
    }
    defanged
}

fn googlechat(message: &Message) -> Value {
    json!({"text": without_mentions(&plain_lines(message, ("*", "*")))})
}

/// Slack and Mattermost: the optional `channel` and `username` overrides.
fn with_channel_and_username(mut body: Value, style: &Style) -> Value {
    if let Some(object) = body.as_object_mut() {
        if let Some(channel) = &style.channel {
            object.insert("channel".into(), Value::from(channel.clone()));
        }
        if let Some(username) = &style.username {
            object.insert("username".into(), Value::from(username.clone()));
        }
    }
    body
}

fn mattermost(message: &Message, style: &Style) -> Value {
    let body = json!({
        "text": without_mentions(&plain_lines(message, ("**", "**"))),
        "props": {"idempotency_key": message.key},
    });
    with_channel_and_username(body, style)
}

/// CloudEvents type of an occurrence, e.g. `dev.deploylock.lock.acquired`.
pub fn cloudevent_type(occurrence: &Occurrence) -> String {
    format!(
        "dev.deploylock.lock.{}",
        occurrence.name().to_ascii_lowercase()
    )
}

fn cloudevent(message: &Message) -> Value {
    json!({
        "specversion": "1.0",
        "id": message.key,
        "source": format!("/apis/deploylock.dev/v1/namespaces/{}/deploymentlocks/{}", message.namespace, message.environment),
        "type": cloudevent_type(&message.occurrence),
        "subject": message.environment,
        "time": time(&message.at),
        "datacontenttype": "application/json",
        "data": message.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Message {
        let at = DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Message {
            key: "uid-1-7".into(),
            occurrence: Occurrence::Transition(HistoryAction::ForceAcquired),
            namespace: "payments".into(),
            environment: "production".into(),
            lock_uid: "uid-1".into(),
            sequence: Some(7),
            at,
            state: LockState::ForceLocked,
            lock_id: Some("abc".into()),
            by: Some("carol".into()),
            owner: Some("on-call".into()),
            reason: Some("hotfix <b> & co".into()),
            lock_type: Some(LockType::Emergency),
            acquired_at: Some(at),
            expires_at: Some(at + chrono::Duration::hours(1)),
            deployment_id: Some("run-42".into()),
            overridden: Some(OverriddenHolding {
                lock_id: "old".into(),
                user: "alice".into(),
                owner: "alice".into(),
                reason: "release 2.1".into(),
            }),
            waiter_id: None,
            waiting_for: None,
        }
    }

    fn parse(rendered: &Rendered) -> Value {
        serde_json::from_slice(&rendered.body).unwrap()
    }

    #[test]
    fn slack_has_fallback_text_and_blocks() {
        let style = Style {
            channel: Some("#deploys".into()),
            username: None,
        };
        let body = parse(&render(ProviderType::Slack, &sample(), &style));
        assert!(
            body["text"]
                .as_str()
                .unwrap()
                .contains("production FORCE-locked (emergency) by carol")
        );
        assert!(
            body["text"]
                .as_str()
                .unwrap()
                .contains("&lt;b&gt; &amp; co")
        );
        assert_eq!(body["blocks"][0]["type"], "header");
        assert_eq!(body["blocks"][1]["text"]["type"], "mrkdwn");
        assert!(body["blocks"][1]["fields"].as_array().unwrap().len() <= 10);
        assert_eq!(body["channel"], "#deploys");
    }

    #[test]
    fn teams_is_an_adaptive_card_message() {
        let body = parse(&render(ProviderType::Msteams, &sample(), &Style::default()));
        assert_eq!(body["type"], "message");
        let attachment = &body["attachments"][0];
        assert_eq!(
            attachment["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(attachment["content"]["type"], "AdaptiveCard");
        let facts = attachment["content"]["body"][2]["facts"]
            .as_array()
            .unwrap();
        assert!(facts.iter().any(|f| f["title"] == "Overrode" && f["value"].as_str().unwrap().contains("alice")));
    }

    #[test]
    fn discord_respects_limits_and_disables_mentions() {
        let mut message = sample();
        message.reason = Some("@everyone ".repeat(500));
        let body = parse(&render(ProviderType::Discord, &message, &Style::default()));
        assert!(body["content"].as_str().unwrap().chars().count() <= 2000);
        assert_eq!(body["allowed_mentions"]["parse"], json!([]));
        for field in body["embeds"][0]["fields"].as_array().unwrap() {
            assert!(field["value"].as_str().unwrap().chars().count() <= 1024);
        }
    }

    #[test]
    fn chats_without_a_mention_switch_get_no_mention_from_free_text() {
        let mut message = sample();
        message.reason = Some("@channel @all @here <users/all> urgent".into());
        message.owner = Some("@everyone".into());
        for provider in [ProviderType::Googlechat, ProviderType::Mattermost] {
            let body = parse(&render(provider, &message, &Style::default()));
            let text = body["text"].as_str().unwrap_or_default();
            for mention in ["@channel", "@all", "@here", "<users/all>", "@everyone"] {
                assert!(
                    !text.contains(mention),
                    "{provider:?} pages {mention}: {text}"
                );
            }
            assert!(text.contains("urgent"), "{provider:?}: {text}");
        }
    }

    #[test]
    fn cloudevent_has_required_attributes() {
        let rendered = render(ProviderType::Cloudevents, &sample(), &Style::default());
        assert!(
            rendered
                .content_type
                .starts_with("application/cloudevents+json")
        );
        let body = parse(&rendered);
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["id"], "uid-1-7");
        assert_eq!(body["type"], "dev.deploylock.lock.forceacquired");
        assert_eq!(body["data"]["deploymentId"], "run-42");
    }

    #[test]
    fn a_queued_waiter_says_who_and_why_for_every_provider() {
        let mut message = sample();
        message.key = "uid-1-queued-w9".into();
        message.occurrence = Occurrence::WaiterQueued(2);
        message.sequence = None;
        message.by = Some("bob".into());
        message.owner = Some("bob-ci".into());
        message.reason = Some("release 2.2".into());
        message.lock_id = None;
        message.lock_type = None;
        message.acquired_at = None;
        message.expires_at = None;
        message.deployment_id = None;
        message.overridden = None;
        message.waiter_id = Some("w9".into());
        message.waiting_for = Some("on-call".into());
        assert_eq!(
            message.summary(),
            "production wanted: waiter queued (place 2) by bob (as bob-ci): release 2.2; held by on-call"
        );
        for provider in [
            ProviderType::Slack,
            ProviderType::Msteams,
            ProviderType::Discord,
            ProviderType::Googlechat,
            ProviderType::Mattermost,
            ProviderType::Generic,
            ProviderType::GenericHmac,
            ProviderType::Cloudevents,
        ] {
            let text =
                String::from_utf8(render(provider, &message, &Style::default()).body).unwrap();
            for needle in ["bob", "bob-ci", "release 2.2", "place 2", "uid-1-queued-w9"] {
                assert!(text.contains(needle), "{provider:?} lacks {needle}: {text}");
            }
        }
        let body = message.to_json();
        assert_eq!(body["event"], "WaiterQueued");
        assert_eq!(body["queuePosition"], 2);
        assert_eq!(body["waiterId"], "w9");
        assert_eq!(body["waitingFor"], "on-call");
        assert_eq!(
            cloudevent_type(&message.occurrence),
            "dev.deploylock.lock.waiterqueued"
        );
    }

    #[test]
    fn signature_is_flux_format() {
        // RFC 4231 test case 2.
        let signature = sign(b"what do ya want for nothing?", b"Jefe");
        assert_eq!(
            signature,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    proptest! {
        #[test]
        fn every_provider_renders_valid_json_with_the_key(reason in ".{0,3000}", env in "[a-z][a-z0-9-]{0,20}") {
            let mut message = sample();
            message.reason = Some(reason);
            message.environment = env;
            for provider in [ProviderType::Slack, ProviderType::Msteams, ProviderType::Discord,
                ProviderType::Googlechat, ProviderType::Mattermost, ProviderType::Generic,
                ProviderType::GenericHmac, ProviderType::Cloudevents] {
                let rendered = render(provider, &message, &Style::default());
                let body: Value = serde_json::from_slice(&rendered.body).unwrap();
                prop_assert!(body.to_string().contains("uid-1-7"));
                prop_assert_eq!(&rendered.headers[0].1, "uid-1-7");
            }
        }
    }
}
