//! The calendar tools against a real CalDAV server: each test starts its own Radicale on a
//! free loopback port (basic auth with a plain htpasswd user, owner-only rights, a temporary
//! storage folder) and kills it when done. Requires `radicale` (Debian package) on PATH.
//!
//! `Radicale` and its helpers are public so scenario tests can reuse them.

use kotaemon_core::config::SecretRef;
use kotaemon_core::tools::{self, calendar::CalendarConfig, ToolCtx, ToolError, ToolRegistry};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A Radicale server of our own (the launcher shared with `kotaemon bench scenario`), with
/// the test-only helpers below.
pub struct Radicale {
    server: kotaemon_fake_upstream::services::Radicale,
    pub user: String,
    pub password: String,
}

impl Radicale {
    /// Starts Radicale with user `alice` (plain htpasswd) and waits until it answers.
    pub async fn start() -> Radicale {
        let server = kotaemon_fake_upstream::services::Radicale::start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Radicale {
            user: server.user.clone(),
            password: server.password.clone(),
            server,
        }
    }

    pub fn calendar_url_named(&self, name: &str) -> String {
        self.server.calendar_url_named(name)
    }

    pub fn calendar_url(&self) -> String {
        self.server.calendar_url()
    }

    /// The password as a secret reference (a file in the server's temp dir).
    pub fn password_ref(&self) -> SecretRef {
        SecretRef::File(self.server.password_file())
    }

    /// Tool config for `calendar_url()`, China time, creating the collection on first use.
    pub fn config(&self) -> CalendarConfig {
        CalendarConfig {
            enabled: true,
            url: self.calendar_url(),
            username: Some(self.user.clone()),
            password: Some(self.password_ref()),
            utc_offset_minutes: 480,
            timeout_ms: 5000,
            create_calendar_if_missing: true,
        }
    }

    fn request(&self, method: &str, url: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url)
            .basic_auth(&self.user, Some(&self.password))
    }

    /// Creates a calendar collection directly (as another client would).
    pub async fn make_calendar(&self, url: &str) {
        let resp = self.request("MKCALENDAR", url).send().await.unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{}",
            resp.text().await.unwrap()
        );
    }

    /// Stores an iCalendar resource directly (as another client would).
    pub async fn put_ics(&self, url: &str, ics: &str) {
        let resp = self
            .request("PUT", url)
            .header("Content-Type", "text/calendar; charset=utf-8")
            .body(ics.to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }

    /// Every VEVENT in a collection, unfolded, as the server stores it (REPORT without a
    /// time range).
    pub async fn raw_vevents(&self, calendar_url: &str) -> Vec<String> {
        let body = r#"<?xml version="1.0" encoding="utf-8"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><C:calendar-data/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT"/></C:comp-filter></C:filter>
</C:calendar-query>"#;
        let resp = self
            .request("REPORT", calendar_url)
            .header("Depth", "1")
            .header("Content-Type", "application/xml; charset=utf-8")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 207);
        let xml = resp.text().await.unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name(("urn:ietf:params:xml:ns:caldav", "calendar-data")))
            .flat_map(|n| vevents(n.text().unwrap_or_default()))
            .collect()
    }
}

/// The VEVENT blocks of an iCalendar text, unfolded, lines joined with `\n`.
pub fn vevents(ics: &str) -> Vec<String> {
    let unfolded = ics
        .replace("\r\n", "\n")
        .replace("\n ", "")
        .replace("\n\t", "");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in unfolded.lines() {
        if line == "BEGIN:VEVENT" {
            current = Some(String::new());
        }
        if let Some(c) = current.as_mut() {
            c.push_str(line);
            c.push('\n');
        }
        if line == "END:VEVENT" {
            out.extend(current.take());
        }
    }
    out
}

pub fn free_port() -> u16 {
    kotaemon_fake_upstream::services::free_port().unwrap()
}

/// The tool registry with just the calendar family.
pub fn registry(calendar: CalendarConfig) -> Arc<ToolRegistry> {
    tools::build(&tools::ToolsConfig {
        calendar,
        ..Default::default()
    })
    .unwrap_or_else(|p| panic!("{p:?}"))
}

pub async fn call(
    reg: &ToolRegistry,
    name: &str,
    args: Value,
    key: &str,
) -> Result<Value, ToolError> {
    let ctx = ToolCtx {
        idempotency_key: key.to_string(),
    };
    reg.call(name, args, &ctx, Duration::from_secs(10)).await
}

fn failed(r: Result<Value, ToolError>) -> String {
    match r {
        Err(ToolError::Failed(m)) => m,
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn utc(s: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .with_timezone(&chrono::Utc)
}

// A date safely in the future (free slots never start in the past).
const DAY: &str = "2030-06-12";

fn at(hm: &str) -> String {
    format!("{DAY}T{hm}")
}

async fn create(reg: &ToolRegistry, key: &str, summary: &str, from: &str, to: &str) -> Value {
    call(
        reg,
        "calendar_create_event",
        json!({"summary": summary, "start": at(from), "end": at(to)}),
        key,
    )
    .await
    .unwrap_or_else(|e| panic!("create {summary}: {e}"))
}

#[tokio::test]
async fn created_events_are_listed_stored_in_utc_and_never_duplicated() {
    let server = Radicale::start().await;
    let reg = registry(server.config());
    let args = json!({
        "summary": "Design review",
        "start": at("10:00"),
        "duration_minutes": 60,
        "attendees": [{"name": "Li Lei", "email": "li@example.com"}, "han@example.com"],
        "location": "Room 3",
    });
    let made = call(&reg, "calendar_create_event", args.clone(), "turn-1/call-1")
        .await
        .unwrap();
    let uid = made["uid"].as_str().unwrap().to_string();
    assert!(uid.ends_with("@kotaemon"), "{made}");
    assert_eq!(made["start"], "2030-06-12T10:00:00+08:00");
    assert_eq!(made["end"], "2030-06-12T11:00:00+08:00");
    assert_eq!(
        made["attendees"],
        json!(["li@example.com", "han@example.com"])
    );

    // Listed in the range, with the right instant and attendees.
    let listed = call(
        &reg,
        "calendar_list_events",
        json!({"start": at("00:00"), "end": DAY}),
        "turn-2/call-1",
    )
    .await
    .unwrap();
    let events = listed.as_array().unwrap();
    assert_eq!(events.len(), 1, "{listed}");
    let e = &events[0];
    assert_eq!(e["uid"], uid.as_str());
    assert_eq!(e["summary"], "Design review");
    assert_eq!(e["location"], "Room 3");
    assert_eq!(
        utc(e["start"].as_str().unwrap()),
        utc("2030-06-12T02:00:00Z")
    );
    assert_eq!(utc(e["end"].as_str().unwrap()), utc("2030-06-12T03:00:00Z"));
    assert_eq!(e["attendees"], json!(["li@example.com", "han@example.com"]));
    // Outside the range: nothing.
    let other_day = call(
        &reg,
        "calendar_list_events",
        json!({"start": "2030-06-13T00:00", "end": "2030-06-14T00:00"}),
        "k",
    )
    .await
    .unwrap();
    assert_eq!(other_day, json!([]));

    // What the server really stores.
    let raw = server.raw_vevents(&server.calendar_url()).await;
    assert_eq!(raw.len(), 1, "{raw:?}");
    let v = &raw[0];
    assert!(v.contains("DTSTART:20300612T020000Z\n"), "{v}");
    assert!(v.contains("DTEND:20300612T030000Z\n"), "{v}");
    assert!(v.contains("SUMMARY:Design review\n"), "{v}");
    assert!(v.contains(&format!("UID:{uid}\n")), "{v}");
    assert!(
        v.contains("CN=Li Lei") && v.contains(":mailto:li@example.com\n"),
        "{v}"
    );
    assert!(v.contains(":mailto:han@example.com\n"), "{v}");
    // And a plain GET of the resource the UID names.
    let href = format!(
        "{}{}.ics",
        server.calendar_url(),
        uid.trim_end_matches("@kotaemon")
    );
    let got = server.request("GET", &href).send().await.unwrap();
    assert_eq!(got.status().as_u16(), 200);
    assert!(got.text().await.unwrap().contains("SUMMARY:Design review"));

    // The same call again (same idempotency key) books nothing new and answers the same.
    let again = call(&reg, "calendar_create_event", args, "turn-1/call-1")
        .await
        .unwrap();
    assert_eq!(again, made);
    assert_eq!(server.raw_vevents(&server.calendar_url()).await.len(), 1);

    // A different call books a second event.
    create(&reg, "turn-3/call-1", "Lunch", "12:00", "13:00").await;
    assert_eq!(server.raw_vevents(&server.calendar_url()).await.len(), 2);

    // Two copies of one call racing: one PUT wins, the other finds it (412) and agrees.
    let args = json!({"summary": "Tea", "start": at("15:00"), "duration_minutes": 15});
    let (a, b) = tokio::join!(
        call(&reg, "calendar_create_event", args.clone(), "turn-4/call-1"),
        call(&reg, "calendar_create_event", args, "turn-4/call-1"),
    );
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(server.raw_vevents(&server.calendar_url()).await.len(), 3);
}

#[tokio::test]
async fn conflicts_are_refused_unless_allowed_and_free_slots_avoid_busy_time() {
    let server = Radicale::start().await;
    let reg = registry(server.config());
    let review = create(&reg, "k1", "Design review", "10:00", "11:00").await;

    let overlapping = json!({"summary": "1:1 with Han", "start": at("10:30"), "end": at("11:30"),
        "attendees": ["han@example.com"]});
    let msg = failed(call(&reg, "calendar_create_event", overlapping.clone(), "k2").await);
    assert!(msg.contains("\"Design review\""), "{msg}");
    assert!(msg.contains("2030-06-12T10:00:00+08:00"), "{msg}");
    assert!(
        msg.contains("allow_conflict") && msg.contains("Nothing was booked"),
        "{msg}"
    );
    assert_eq!(server.raw_vevents(&server.calendar_url()).await.len(), 1);

    let conflicts = call(
        &reg,
        "calendar_find_conflicts",
        json!({"start": at("10:30"), "end": at("11:30")}),
        "k",
    )
    .await
    .unwrap();
    assert_eq!(conflicts.as_array().unwrap().len(), 1, "{conflicts}");
    assert_eq!(conflicts[0]["uid"], review["uid"]);
    // Back to back is not a conflict.
    let touching = call(
        &reg,
        "calendar_find_conflicts",
        json!({"start": at("11:00"), "end": at("12:00")}),
        "k",
    )
    .await
    .unwrap();
    assert_eq!(touching, json!([]));

    let slots = call(
        &reg,
        "calendar_find_free_slots",
        json!({"date": DAY, "duration_minutes": 60}),
        "k",
    )
    .await
    .unwrap();
    assert_eq!(
        slots["free_slots"],
        json!([
            {"start": "2030-06-12T09:00:00+08:00", "end": "2030-06-12T10:00:00+08:00"},
            {"start": "2030-06-12T11:00:00+08:00", "end": "2030-06-12T18:00:00+08:00"},
        ]),
        "{slots}"
    );
    assert_eq!(slots["busy"][0]["summary"], "Design review");
    let long = call(
        &reg,
        "calendar_find_free_slots",
        json!({"date": DAY, "duration_minutes": 90, "day_start": "08:30", "day_end": "12:00"}),
        "k",
    )
    .await
    .unwrap();
    assert_eq!(
        long["free_slots"],
        json!([{"start": "2030-06-12T08:30:00+08:00", "end": "2030-06-12T10:00:00+08:00"}]),
        "08:30-10:00 is exactly 90 minutes, 11:00-12:00 too short: {long}"
    );

    // The user agreed: book anyway.
    let mut anyway = overlapping;
    anyway["allow_conflict"] = json!(true);
    let made = call(&reg, "calendar_create_event", anyway, "k2")
        .await
        .unwrap();
    assert_eq!(made["summary"], "1:1 with Han");
    assert_eq!(server.raw_vevents(&server.calendar_url()).await.len(), 2);
}

#[tokio::test]
async fn updates_move_and_change_events_and_deletes_remove_them() {
    let server = Radicale::start().await;
    let reg = registry(server.config());
    let review = call(
        &reg,
        "calendar_create_event",
        json!({"summary": "Design review", "start": at("10:00"), "end": at("11:00"),
               "attendees": ["li@example.com"], "location": "Room 3"}),
        "k1",
    )
    .await
    .unwrap();
    let uid = review["uid"].as_str().unwrap().to_string();
    let planning = create(&reg, "k2", "Planning", "14:00", "15:00").await;

    // Moving onto another event is refused…
    let msg = failed(
        call(
            &reg,
            "calendar_update_event",
            json!({"uid": uid, "start": at("14:30")}),
            "k3",
        )
        .await,
    );
    assert!(
        msg.contains("\"Planning\"") && msg.contains("Nothing was changed"),
        "{msg}"
    );
    // …moving to a free time keeps the length.
    let moved = call(
        &reg,
        "calendar_update_event",
        json!({"uid": uid, "start": at("16:00")}),
        "k4",
    )
    .await
    .unwrap();
    assert_eq!(moved["start"], "2030-06-12T16:00:00+08:00");
    assert_eq!(moved["end"], "2030-06-12T17:00:00+08:00");
    assert_eq!(moved["location"], "Room 3");
    let raw = server.raw_vevents(&server.calendar_url()).await;
    let v = raw.iter().find(|v| v.contains(&uid)).unwrap();
    assert!(v.contains("DTSTART:20300612T080000Z\n"), "{v}");
    assert!(v.contains("DTEND:20300612T090000Z\n"), "{v}");
    assert!(v.contains("SEQUENCE:1\n"), "{v}");

    // Title, attendees (replaced), location removed, new length.
    let changed = call(
        &reg,
        "calendar_update_event",
        json!({"uid": uid, "summary": "Design review (v2)", "attendees": ["han@example.com"],
               "location": "", "duration_minutes": 30}),
        "k5",
    )
    .await
    .unwrap();
    assert_eq!(changed["summary"], "Design review (v2)");
    assert_eq!(changed["attendees"], json!(["han@example.com"]));
    assert_eq!(changed["location"], Value::Null);
    assert_eq!(changed["end"], "2030-06-12T16:30:00+08:00");

    let listed = call(
        &reg,
        "calendar_list_events",
        json!({"start": DAY, "end": DAY}),
        "k",
    )
    .await
    .unwrap();
    let summaries: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["summary"].as_str().unwrap())
        .collect();
    assert_eq!(summaries, ["Planning", "Design review (v2)"]);

    let deleted = call(&reg, "calendar_delete_event", json!({"uid": uid}), "k6")
        .await
        .unwrap();
    assert_eq!(deleted["deleted"], true);
    let left = server.raw_vevents(&server.calendar_url()).await;
    assert_eq!(left.len(), 1);
    assert!(left[0].contains(planning["uid"].as_str().unwrap()));
    let gone = failed(call(&reg, "calendar_delete_event", json!({"uid": uid}), "k7").await);
    assert!(gone.contains("no event with uid"), "{gone}");
    let gone = failed(
        call(
            &reg,
            "calendar_update_event",
            json!({"uid": uid, "summary": "x"}),
            "k8",
        )
        .await,
    );
    assert!(gone.contains("no event with uid"), "{gone}");
}

#[tokio::test]
async fn events_from_other_clients_with_zones_and_weekly_rules_count() {
    let server = Radicale::start().await;
    let cal = server.calendar_url_named("work");
    server.make_calendar(&cal).await;
    // A weekly Wednesday stand-up written by another client, in Shanghai time with a
    // VTIMEZONE, starting a week before DAY (a Wednesday).
    let standup = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Other client//EN\r\n\
BEGIN:VTIMEZONE\r\nTZID:Asia/Shanghai\r\nBEGIN:STANDARD\r\nDTSTART:19700101T000000\r\n\
TZOFFSETFROM:+0800\r\nTZOFFSETTO:+0800\r\nTZNAME:CST\r\nEND:STANDARD\r\nEND:VTIMEZONE\r\n\
BEGIN:VEVENT\r\nUID:standup-1@other\r\nDTSTAMP:20300101T000000Z\r\n\
DTSTART;TZID=Asia/Shanghai:20300605T093000\r\nDTEND;TZID=Asia/Shanghai:20300605T100000\r\n\
RRULE:FREQ=WEEKLY;BYDAY=WE\r\nSUMMARY:Stand-up\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n";
    server.put_ics(&format!("{cal}standup.ics"), standup).await;
    let mut config = server.config();
    config.url = cal.clone();
    config.create_calendar_if_missing = false;
    let reg = registry(config);

    let listed = call(
        &reg,
        "calendar_list_events",
        json!({"start": DAY, "end": DAY}),
        "k",
    )
    .await
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["summary"], "Stand-up");
    assert_eq!(listed[0]["start"], "2030-06-12T09:30:00+08:00");
    assert_eq!(listed[0]["recurring"], true);

    let msg = failed(
        call(
            &reg,
            "calendar_create_event",
            json!({"summary": "Call", "start": at("09:45"), "duration_minutes": 30}),
            "k1",
        )
        .await,
    );
    assert!(
        msg.contains("Stand-up") && msg.contains("09:30:00+08:00"),
        "{msg}"
    );

    let slots = call(
        &reg,
        "calendar_find_free_slots",
        json!({"date": DAY, "duration_minutes": 30, "day_start": "09:00", "day_end": "11:00"}),
        "k",
    )
    .await
    .unwrap();
    assert_eq!(
        slots["free_slots"],
        json!([
            {"start": "2030-06-12T09:00:00+08:00", "end": "2030-06-12T09:30:00+08:00"},
            {"start": "2030-06-12T10:00:00+08:00", "end": "2030-06-12T11:00:00+08:00"},
        ]),
        "{slots}"
    );
    // The stand-up can be renamed through the tools; its zone and rule stay.
    call(
        &reg,
        "calendar_update_event",
        json!({"uid": "standup-1@other", "summary": "Daily stand-up"}),
        "k2",
    )
    .await
    .unwrap();
    let raw = server.raw_vevents(&cal).await;
    assert!(raw[0].contains("SUMMARY:Daily stand-up"), "{raw:?}");
    assert!(raw[0].contains("RRULE:FREQ=WEEKLY;BYDAY=WE"), "{raw:?}");
    assert!(
        raw[0].contains("DTSTART;TZID=Asia/Shanghai:20300605T093000"),
        "{raw:?}"
    );
}

#[tokio::test]
async fn bad_login_missing_calendar_and_dead_server_fail_clearly() {
    let server = Radicale::start().await;

    // Wrong password: a clear refusal that never echoes the password.
    let dir = tempfile::tempdir().unwrap();
    let canary = "wrong-pw-canary-7f3a";
    std::fs::write(dir.path().join("pw"), canary).unwrap();
    let mut config = server.config();
    config.password = Some(SecretRef::File(dir.path().join("pw")));
    let reg = registry(config);
    for (name, args) in [
        ("calendar_list_events", json!({"start": DAY, "end": DAY})),
        (
            "calendar_create_event",
            json!({"summary": "x", "start": at("10:00"), "duration_minutes": 30}),
        ),
    ] {
        let r = call(&reg, name, args, "k").await;
        let debug = format!("{r:?}");
        let msg = failed(r);
        assert!(
            msg.contains("refused the login") && msg.contains("401"),
            "{msg}"
        );
        assert!(!debug.contains(canary), "{debug}");
        assert!(!debug.contains(&server.password), "{debug}");
    }

    // The collection does not exist and may not be created.
    let mut config = server.config();
    config.url = server.calendar_url_named("nope");
    config.create_calendar_if_missing = false;
    let msg = failed(
        call(
            &registry(config),
            "calendar_list_events",
            json!({"start": DAY, "end": DAY}),
            "k",
        )
        .await,
    );
    assert!(msg.contains("does not exist"), "{msg}");

    // Nobody listens: fails at once, not after the timeout.
    let mut config = server.config();
    config.url = format!("http://127.0.0.1:{}/alice/calendar/", free_port());
    let reg = registry(config);
    let started = Instant::now();
    let msg = failed(
        call(
            &reg,
            "calendar_list_events",
            json!({"start": DAY, "end": DAY}),
            "k",
        )
        .await,
    );
    assert!(
        // A hang guard, not a timing claim: the machine may be loaded.
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(msg.contains("cannot reach the calendar server"), "{msg}");
    assert!(!msg.contains("127.0.0.1"), "no URL in the message: {msg}");

    // Someone listens but never answers: the call ends at its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = server.config();
    config.url = format!("http://{}/alice/calendar/", silent.local_addr().unwrap());
    config.timeout_ms = 300;
    let started = Instant::now();
    let r = call(
        &registry(config),
        "calendar_list_events",
        json!({"start": DAY, "end": DAY}),
        "k",
    )
    .await;
    assert!(
        // A hang guard, not a timing claim: the machine may be loaded.
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    match r {
        Err(ToolError::Timeout(_)) => {}
        Err(ToolError::Failed(m)) if m.contains("did not answer within 300ms") => {}
        other => panic!("{other:?}"),
    }

    // Arguments are checked before anything is sent.
    let reg = registry(server.config());
    for args in [
        json!({"summary": "x", "start": "tomorrow 10am", "duration_minutes": 30}),
        json!({"summary": "x", "start": at("10:00"), "end": at("09:00")}),
        json!({"summary": "x", "start": at("10:00")}),
        json!({"summary": "x", "start": at("10:00"), "duration_minutes": 30,
               "attendees": ["not an email"]}),
    ] {
        let r = call(&reg, "calendar_create_event", args.clone(), "k").await;
        assert!(
            matches!(r, Err(ToolError::InvalidArguments(_))),
            "{args}: {r:?}"
        );
    }
}
