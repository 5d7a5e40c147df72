//! What the MQTT tool (`tools::mqtt`) and the MQTT bridge (`plugins::mqtt_bridge`) share: the
//! broker's address and credentials as connection options, topic and filter checks, the
//! reconnect backoff and readable connection errors. Each keeps its own connection (its own
//! client id and lifetime); rumqttc's event loop does the protocol.
//!
//! Plain TCP only: rumqttc is built without TLS here.

use crate::config::{Secret, SecretRef};
use rumqttc::{ConnectReturnCode, ConnectionError, MqttOptions};
use std::time::Duration;

/// Largest packet either side sends or accepts. rumqttc drops the whole connection on a
/// bigger one, so callers check payload sizes against [`MAX_PAYLOAD_BYTES`] before publishing.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Largest payload the tool and the bridge publish (topic and header fit in the rest).
pub const MAX_PAYLOAD_BYTES: usize = MAX_PACKET_BYTES - 64 * 1024;
/// Keep-alive: a dead broker is noticed within about 1.5 × this.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A broker to connect to, with its credentials resolved.
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    username: Option<String>,
    password: Option<Secret>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is a `Secret`, which never prints; the rest is config.
        f.debug_struct("Broker")
            .field("addr", &self.addr())
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// Static checks of a broker section, as `field: reason` (the caller adds the key path).
pub fn broker_problems(
    host: &str,
    port: u16,
    client_id: &str,
    username: Option<&str>,
    password: Option<&SecretRef>,
) -> Vec<String> {
    let mut p = Vec::new();
    if host.trim().is_empty() {
        p.push("host: the broker's host name or IP address is needed".into());
    } else if host.contains("://") || host.contains('/') {
        p.push(format!(
            "host: `{host}` must be a host name or address, not a URL (set `port` separately)"
        ));
    }
    if port == 0 {
        p.push("port: must be 1-65535".into());
    }
    if client_id.is_empty() {
        p.push("client_id: must not be empty".into());
    }
    if username.is_some_and(str::is_empty) {
        p.push("username: must not be empty (leave it out for anonymous access)".into());
    }
    if password.is_some() && username.is_none() {
        p.push("password: needs a username (MQTT 3.1.1 sends no password alone)".into());
    }
    p
}

impl Broker {
    /// Resolves the password reference. The error names the reference, never the value.
    pub fn resolve(
        host: &str,
        port: u16,
        client_id: &str,
        username: Option<&str>,
        password: Option<&SecretRef>,
    ) -> Result<Broker, String> {
        let password = password
            .map(|r| r.resolve().map_err(|e| format!("password: {e}")))
            .transpose()?;
        Ok(Broker {
            host: host.trim().to_string(),
            port,
            client_id: client_id.to_string(),
            username: username.map(str::to_string),
            password,
        })
    }

    /// `host:port`, for messages and logs.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Connection options: clean session (nothing queued for us while we are away), keep-alive,
    /// packet limits, credentials.
    pub fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        if let Some(user) = &self.username {
            let password = self
                .password
                .as_ref()
                .map(|s| s.expose().to_string())
                .unwrap_or_default();
            o.set_credentials(user.clone(), password);
        }
        o
    }
}

/// Why the connection failed, in words an operator (or a model reading a tool error) can act
/// on. Never contains credentials: rumqttc's errors carry none.
pub fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
            _ => io.to_string(),
        },
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => {
                "the broker refused the username or password".into()
            }
            ConnectReturnCode::NotAuthorized => {
                "the broker refused the login: not authorized (check the username and password)"
                    .into()
            }
            ConnectReturnCode::BadClientId => "the broker refused the client id".into(),
            ConnectReturnCode::ServiceUnavailable => "the broker is unavailable".into(),
            ConnectReturnCode::RefusedProtocolVersion => {
                "the broker does not speak MQTT 3.1.1".into()
            }
            ConnectReturnCode::Success => "connected".into(),
        },
        ConnectionError::NetworkTimeout => "no answer to the connect within its timeout".into(),
        ConnectionError::FlushTimeout => "the broker stopped reading".into(),
        other => other.to_string(),
    }
}

/// Is this error one an operator must fix (credentials, client id) rather than an outage?
pub fn needs_operator(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::NotAuthorized
                | ConnectReturnCode::BadClientId
                | ConnectReturnCode::RefusedProtocolVersion
        )
    )
}

/// A topic name one can publish to: not empty, no wildcards, no NUL, at most 65535 bytes.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        Err("the topic is empty".into())
    } else if topic.len() > 65535 {
        Err("the topic is longer than 65535 bytes".into())
    } else if topic.contains(['+', '#']) {
        Err(format!(
            "`{topic}` contains a wildcard (+ or #); publish to one concrete topic"
        ))
    } else if topic.contains('\0') {
        Err("the topic contains a NUL character".into())
    } else {
        Ok(())
    }
}

/// A topic filter: `+` is a whole level, `#` a whole last level.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("an empty topic filter matches nothing".into());
    }
    if filter.contains('\0') {
        return Err("the filter contains a NUL character".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "`{filter}`: `#` must be a whole level and the last one"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("`{filter}`: `+` must be a whole level"));
        }
    }
    Ok(())
}

/// Does `topic` match `filter` (MQTT 3.1.1 §4.7)? Wildcards in the first level do not match
/// topics starting with `$` (broker-internal topics such as `$SYS/…`).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            // `a/#` also matches `a` itself.
            return true;
        }
        match topic_levels.next() {
            Some(_) if f == "+" => {}
            Some(t) if t == f => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Capped exponential backoff between reconnects: 250 ms, 500 ms, 1 s … 10 s; reset on connect.
/// No jitter: one device, one broker.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }
    /// The pause before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_a_broker() {
        let yes = [
            ("office/light/set", "office/light/set"),
            ("office/+/set", "office/light/set"),
            ("office/#", "office/light/set"),
            ("office/#", "office"),
            ("#", "office/light"),
            ("+/+", "a/b"),
            ("+", ""),
            ("a//b", "a//b"),
            ("a/+/b", "a//b"),
            ("$SYS/#", "$SYS/broker/load"),
        ];
        for (f, t) in yes {
            assert!(filter_matches(f, t), "{f} should match {t}");
        }
        let no = [
            ("office/light/set", "office/light"),
            ("office/light", "office/light/set"),
            ("office/+/set", "office/light/get"),
            ("office/+", "office/light/set"),
            ("home/#", "office/light"),
            ("#", "$SYS/broker"),
            ("+/broker", "$SYS/broker"),
            ("Office/#", "office/light"),
        ];
        for (f, t) in no {
            assert!(!filter_matches(f, t), "{f} should not match {t}");
        }
    }

    #[test]
    fn topics_and_filters_are_checked() {
        assert!(check_topic("office/light/set").is_ok());
        assert!(check_topic("客厅/灯").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("office/+/set").is_err());
        assert!(check_topic("office/#").is_err());
        for ok in ["#", "+", "a/+/b", "a/#", "+/+/#", "a/b"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b#", "a+/b", "a/++"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn broker_sections_are_checked_and_never_print_the_password() {
        assert!(broker_problems("127.0.0.1", 1883, "k", None, None).is_empty());
        let p = broker_problems("mqtt://h", 0, "", None, Some(&SecretRef::Env("X".into())));
        let fields: Vec<&str> = p.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(fields, ["host", "port", "client_id", "password"], "{p:?}");

        std::env::set_var("KOTAEMON_TEST_MQTT_CANARY", "canary-mq77");
        let b = Broker::resolve(
            "10.0.0.2",
            1884,
            "k",
            Some("u"),
            Some(&SecretRef::Env("KOTAEMON_TEST_MQTT_CANARY".into())),
        )
        .unwrap();
        assert_eq!(b.addr(), "10.0.0.2:1884");
        assert!(!format!("{b:?}").contains("canary"), "{b:?}");
        let missing = Broker::resolve(
            "h",
            1,
            "k",
            Some("u"),
            Some(&SecretRef::Env("KOTAEMON_TEST_MQTT_MISSING".into())),
        )
        .unwrap_err();
        assert!(missing.starts_with("password: "), "{missing}");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let ms: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(250));
    }
}
