//! `calendar` tools: the device owner's calendar on a CalDAV server (RFC 4791) — Radicale,
//! Nextcloud, Baïkal, SOGo, iCloud…
//!
//! Six tools share one client: `calendar_list_events`, `calendar_find_conflicts`,
//! `calendar_find_free_slots` (read-only) and `calendar_create_event`,
//! `calendar_update_event`, `calendar_delete_event` (mutating).
//!
//! The model speaks local time ("2026-11-26T10:00") in the device's zone, a fixed UTC offset
//! from config; the server gets UTC. A new event's UID is derived from the call's idempotency
//! key and created with `If-None-Match: *`, so a repeated call never books twice. A create or
//! a move that overlaps busy time fails with the conflicts listed, unless the model says
//! `allow_conflict` (after asking the user).
//!
//! Modules: `caldav` (HTTP/WebDAV), `ical` (iCalendar), `time` (local times).

mod caldav;
mod ical;
mod time;

use super::{Effect, Tool, ToolCtx, ToolError, ToolSpec};
use crate::config::SecretRef;
use async_trait::async_trait;
use caldav::{CalDav, CalDavError, Created, Resource};
use chrono::{DateTime, Duration, Utc};
use ical::{Changes, EventFields, Occurrence, Person, Vevent};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use time::{DayEdge, Zone};

/// `[tools.calendar]`: a CalDAV calendar the agent reads and books into.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalendarConfig {
    /// Offer the calendar tools to the model.
    pub enabled: bool,
    /// The calendar collection's URL (http or https), e.g.
    /// `http://127.0.0.1:5232/alice/calendar/` (Radicale) or
    /// `https://cloud.example.com/remote.php/dav/calendars/alice/personal/` (Nextcloud).
    /// Put credentials in `username`/`password`, not in the URL.
    pub url: String,
    /// The account on the CalDAV server (HTTP Basic auth). Leave out for a server without
    /// login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The account's password, as a reference: `env:CALDAV_PASSWORD` or
    /// `file:/etc/kotaemon/caldav-password`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretRef>,
    /// The device's time zone, in minutes east of UTC (480 = China, 540 = Japan, 0 = UTC,
    /// -300 = US Eastern standard time). Times the model writes without an offset are read in
    /// this zone, and times it reads back are shown in it.
    pub utc_offset_minutes: i32,
    /// How long one tool call may take, all its requests to the server together (a booking
    /// makes three).
    pub timeout_ms: u64,
    /// Create the collection (MKCALENDAR) on first use if it does not exist yet.
    pub create_calendar_if_missing: bool,
}

impl Default for CalendarConfig {
    fn default() -> Self {
        CalendarConfig {
            enabled: false,
            url: String::new(),
            username: None,
            password: None,
            utc_offset_minutes: 480,
            timeout_ms: 5000,
            create_calendar_if_missing: false,
        }
    }
}

/// At most this many events go back to the model from one listing.
const MAX_LISTED: usize = 100;
/// Longest text accepted for a summary, location or description.
const MAX_TEXT: usize = 2000;

/// Builds the calendar tools; every problem is reported as `field: reason`.
pub fn build(config: &CalendarConfig) -> Result<Vec<Arc<dyn Tool>>, Vec<String>> {
    if !config.enabled {
        return Ok(Vec::new());
    }
    let mut problems = Vec::new();
    let url = match config.url.trim() {
        "" => {
            problems.push(
                "url: required: the calendar collection, e.g. http://127.0.0.1:5232/alice/calendar/"
                    .to_string(),
            );
            None
        }
        raw => match reqwest::Url::parse(raw) {
            Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                problems.push(format!("url: must be http or https, not `{}`", u.scheme()));
                None
            }
            Ok(u) if u.host_str().is_none_or(str::is_empty) => {
                problems.push("url: has no host".to_string());
                None
            }
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                problems.push(
                    "url: must not hold credentials: use username and password (a secret \
                     reference)"
                        .to_string(),
                );
                None
            }
            Ok(u) => Some(u),
            Err(e) => {
                problems.push(format!("url: not a valid URL: {e}"));
                None
            }
        },
    };
    let zone = Zone::from_minutes(config.utc_offset_minutes)
        .filter(|_| (-720..=840).contains(&config.utc_offset_minutes));
    if zone.is_none() {
        problems.push(format!(
            "utc_offset_minutes: {} is not a time zone (from -720 to 840)",
            config.utc_offset_minutes
        ));
    }
    if config.timeout_ms == 0 {
        problems.push("timeout_ms: must be above 0".to_string());
    }
    let username = config
        .username
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string);
    if username.as_deref().is_some_and(|u| u.contains(':')) {
        problems.push("username: must not contain `:` (HTTP Basic auth)".to_string());
    }
    let password = match &config.password {
        None => None,
        Some(_) if username.is_none() => {
            problems.push("username: required when password is set".to_string());
            None
        }
        Some(r) => match r.resolve() {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(format!("password: {e}"));
                None
            }
        },
    };
    let (Some(url), Some(zone), true) = (url, zone, problems.is_empty()) else {
        return Err(problems);
    };
    let timeout = std::time::Duration::from_millis(config.timeout_ms);
    let dav = CalDav::new(caldav::Settings {
        url,
        username,
        password,
        create_if_missing: config.create_calendar_if_missing,
        timeout,
    })
    .map_err(|e| vec![e])?;
    let family = Arc::new(Family { dav, zone });
    let spec = |name: &str, description: String, parameters: Value, effect: Effect| ToolSpec {
        name: name.to_string(),
        description,
        parameters,
        effect,
        timeout,
    };
    let tz = family.zone_label();
    let local = format!(
        "Local date-time in the device's time zone (UTC{tz}), e.g. 2026-11-26T10:00; an \
         explicit offset (+08:00, Z) is also accepted"
    );
    let time = |what: &str| json!({"type": "string", "description": format!("{what}. {local}")});
    let attendees = json!({
        "type": "array",
        "description": "People to invite: email addresses, or objects with email and name",
        "items": {"anyOf": [
            {"type": "string"},
            {"type": "object", "properties": {
                "email": {"type": "string"}, "name": {"type": "string"}},
             "required": ["email"], "additionalProperties": false},
        ]},
    });
    let duration = json!({"type": "integer", "minimum": 1, "maximum": 10080,
        "description": "Length in minutes (instead of end)"});
    let allow_conflict = json!({"type": "boolean", "description":
        "Book even if the time overlaps other events. Only after the user agreed; default false"});
    let text = |d: &str| json!({"type": "string", "description": d});
    let tools: Vec<Arc<dyn Tool>> = vec![
        Arc::new(ListEvents {
            spec: spec(
                "calendar_list_events",
                format!("List the events on the user's calendar between two times (UTC{tz})."),
                json!({"type": "object", "properties": {
                    "start": time("Start of the period"),
                    "end": time("End of the period; a bare date means the end of that day"),
                }, "required": ["start", "end"], "additionalProperties": false}),
                Effect::ReadOnly,
            ),
            family: family.clone(),
        }),
        Arc::new(FindConflicts {
            spec: spec(
                "calendar_find_conflicts",
                "List the events that overlap a proposed time: an empty list means the time \
                 is free."
                    .to_string(),
                json!({"type": "object", "properties": {
                    "start": time("Proposed start"),
                    "end": time("Proposed end"),
                    "exclude_uid": text("An event to ignore (the one being moved)"),
                }, "required": ["start", "end"], "additionalProperties": false}),
                Effect::ReadOnly,
            ),
            family: family.clone(),
        }),
        Arc::new(FindFreeSlots {
            spec: spec(
                "calendar_find_free_slots",
                format!(
                    "Find free time on one day for a meeting of a given length, within \
                     working hours (UTC{tz})."
                ),
                json!({"type": "object", "properties": {
                    "date": text("The day, e.g. 2026-11-26"),
                    "duration_minutes": {"type": "integer", "minimum": 1, "maximum": 1440,
                        "description": "Meeting length in minutes"},
                    "day_start": text("Start of working hours, default 09:00"),
                    "day_end": text("End of working hours, default 18:00"),
                }, "required": ["date", "duration_minutes"], "additionalProperties": false}),
                Effect::ReadOnly,
            ),
            family: family.clone(),
        }),
        Arc::new(CreateEvent {
            spec: spec(
                "calendar_create_event",
                "Book an event on the user's calendar and invite attendees. Give end or \
                 duration_minutes. Fails listing the conflicts if the time is taken."
                    .to_string(),
                json!({"type": "object", "properties": {
                    "summary": text("Title of the event"),
                    "start": time("Start"),
                    "end": time("End"),
                    "duration_minutes": duration,
                    "attendees": attendees,
                    "location": text("Where"),
                    "description": text("Notes"),
                    "allow_conflict": allow_conflict,
                }, "required": ["summary", "start"], "additionalProperties": false}),
                Effect::Mutating,
            ),
            family: family.clone(),
        }),
        Arc::new(UpdateEvent {
            spec: spec(
                "calendar_update_event",
                "Change an event found by its uid: title, time, attendees (replaces the \
                 list), location or notes (an empty string removes them). Moving it keeps its \
                 length unless end or duration_minutes is given."
                    .to_string(),
                json!({"type": "object", "properties": {
                    "uid": text("The event's uid, from calendar_list_events"),
                    "summary": text("New title"),
                    "start": time("New start"),
                    "end": time("New end"),
                    "duration_minutes": duration,
                    "attendees": attendees,
                    "location": text("New location"),
                    "description": text("New notes"),
                    "allow_conflict": allow_conflict,
                }, "required": ["uid"], "additionalProperties": false}),
                Effect::Mutating,
            ),
            family: family.clone(),
        }),
        Arc::new(DeleteEvent {
            spec: spec(
                "calendar_delete_event",
                "Delete an event (a whole series if it repeats) by its uid.".to_string(),
                json!({"type": "object", "properties": {
                    "uid": text("The event's uid, from calendar_list_events"),
                }, "required": ["uid"], "additionalProperties": false}),
                Effect::Mutating,
            ),
            family,
        }),
    ];
    Ok(tools)
}

impl From<CalDavError> for ToolError {
    fn from(e: CalDavError) -> Self {
        ToolError::Failed(e.to_string())
    }
}

/// What the calendar tools share: the server and the device's zone.
struct Family {
    dav: CalDav,
    zone: Zone,
}

/// The UID (and resource name) of the event a call with this idempotency key creates.
fn uid_for(idempotency_key: &str) -> (String, String) {
    let digest = Sha256::digest(format!("kotaemon calendar event\n{idempotency_key}").as_bytes());
    let id = hex::encode(&digest[..16]);
    (format!("{id}@kotaemon"), format!("{id}.ics"))
}

fn invalid(msg: impl Into<String>) -> ToolError {
    ToolError::InvalidArguments(msg.into())
}

fn str_arg<'a>(args: &'a Value, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

/// A text argument, trimmed and bounded; `Some("")` is kept (it means "remove" in updates).
fn text_arg(args: &Value, key: &str) -> Result<Option<String>, ToolError> {
    match str_arg(args, key) {
        None => Ok(None),
        Some(s) if s.chars().count() > MAX_TEXT => {
            Err(invalid(format!("{key}: longer than {MAX_TEXT} characters")))
        }
        Some(s) => Ok(Some(s.trim().to_string())),
    }
}

fn minutes_arg(args: &Value, key: &str) -> Option<i64> {
    args.get(key).and_then(Value::as_i64)
}

/// Attendees as email strings or `{email, name}` objects; duplicates dropped.
fn people_arg(args: &Value) -> Result<Option<Vec<Person>>, ToolError> {
    let Some(list) = args.get("attendees").and_then(Value::as_array) else {
        return Ok(None);
    };
    let mut out: Vec<Person> = Vec::new();
    for item in list {
        let (email, name) = match item {
            Value::String(s) => (s.as_str(), None),
            other => (
                str_arg(other, "email").unwrap_or_default(),
                str_arg(other, "name"),
            ),
        };
        let email = email.trim();
        let email = email
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("mailto:"))
            .map_or(email, |_| &email[7..])
            .trim();
        let valid = email.len() <= 254
            && email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && !domain.is_empty() && !domain.contains('@')
            })
            && !email
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "\"<>,;:()[]\\".contains(c));
        if !valid {
            return Err(invalid(format!(
                "attendees: `{email}` is not an email address"
            )));
        }
        if out.iter().any(|p| p.email.eq_ignore_ascii_case(email)) {
            continue;
        }
        out.push(Person {
            name: name
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string),
            email: email.to_string(),
        });
    }
    Ok(Some(out))
}

impl Family {
    fn zone_label(&self) -> String {
        self.zone.offset().to_string()
    }

    fn time_arg(
        &self,
        args: &Value,
        key: &str,
        edge: DayEdge,
    ) -> Result<Option<DateTime<Utc>>, ToolError> {
        str_arg(args, key)
            .map(|s| {
                self.zone
                    .parse(s, edge)
                    .map_err(|e| invalid(format!("{key}: {e}")))
            })
            .transpose()
    }

    /// `start` and `end` of a period to look at.
    fn period(&self, args: &Value) -> Result<(DateTime<Utc>, DateTime<Utc>), ToolError> {
        let start = self.time_arg(args, "start", DayEdge::Start)?;
        let end = self.time_arg(args, "end", DayEdge::End)?;
        let (Some(start), Some(end)) = (start, end) else {
            return Err(invalid("start and end are required"));
        };
        if end <= start {
            return Err(invalid("end must be after start"));
        }
        Ok((start, end))
    }

    /// The occurrences of every event overlapping `[from, to)`, by start time. An event the
    /// agent cannot read is skipped (and logged), not fatal.
    async fn occurrences(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<Occurrence>, ToolError> {
        let resources = self.dav.query_range(from, to).await?;
        let mut out = Vec::new();
        for r in &resources {
            match ical::parse_events(&r.ics, self.zone) {
                Ok(events) => out.extend(ical::occurrences(&events, from, to)),
                Err(e) => {
                    tracing::warn!("skipping a calendar event the agent cannot read");
                    tracing::debug!(error = %e, "unreadable calendar event");
                }
            }
        }
        out.sort_by(|a, b| {
            (a.event.start, a.event.end, &a.event.uid).cmp(&(
                b.event.start,
                b.event.end,
                &b.event.uid,
            ))
        });
        Ok(out)
    }

    /// Events that make `[from, to)` busy, except the one with `exclude`.
    async fn conflicts(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        exclude: Option<&str>,
    ) -> Result<Vec<Occurrence>, ToolError> {
        Ok(self
            .occurrences(from, to)
            .await?
            .into_iter()
            .filter(|o| o.event.blocks_time() && Some(o.event.uid.as_str()) != exclude)
            .collect())
    }

    /// `moving`: an update (nothing changed) rather than a booking (nothing booked).
    fn conflict_error(&self, conflicts: &[Occurrence], moving: bool) -> ToolError {
        let list: Vec<String> = conflicts
            .iter()
            .take(5)
            .map(|o| {
                format!(
                    "\"{}\" from {} to {} (uid {})",
                    o.event.summary,
                    self.zone.format(o.event.start),
                    self.zone.format(o.event.end),
                    o.event.uid
                )
            })
            .collect();
        let more = conflicts.len().saturating_sub(list.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        let (done, anyway) = if moving {
            ("changed", "move it anyway")
        } else {
            ("booked", "book anyway")
        };
        ToolError::Failed(format!(
            "the time overlaps {} existing event{}: {}{more}. Nothing was {done}. Ask the user \
             whether to {anyway} (call again with allow_conflict: true) or pick another time \
             (calendar_find_free_slots).",
            conflicts.len(),
            if conflicts.len() == 1 { "" } else { "s" },
            list.join("; ")
        ))
    }

    /// An event as the model reads it.
    fn present(&self, e: &Vevent, recurring: bool) -> Value {
        let mut v = json!({
            "uid": e.uid,
            "summary": e.summary,
            "start": self.zone.format(e.start),
            "end": self.zone.format(e.end),
            "attendees": e.attendees.iter().map(|p| p.email.as_str()).collect::<Vec<_>>(),
            "location": e.location,
        });
        if e.all_day {
            v["all_day"] = json!(true);
        }
        if recurring {
            v["recurring"] = json!(true);
        }
        if e.cancelled {
            v["status"] = json!("cancelled");
        }
        v
    }

    fn present_occurrence(&self, o: &Occurrence) -> Value {
        let mut v = self.present(&o.event, o.recurring);
        if !o.exact {
            // The rule is beyond the agent's expander: these are the series' first times.
            v["times_of_first_occurrence"] = json!(true);
        }
        v
    }

    /// The master event of `uid` in a resource.
    fn master_of(&self, r: &Resource, uid: &str) -> Result<Vevent, ToolError> {
        let events = ical::parse_events(&r.ics, self.zone).map_err(|e| {
            tracing::debug!(error = %e, "unreadable calendar event");
            ToolError::Failed(format!("the event {uid} exists but cannot be read"))
        })?;
        events
            .into_iter()
            .find(|e| e.uid == uid && e.recurrence_id.is_none())
            .ok_or_else(|| ToolError::Failed(format!("the event {uid} cannot be read")))
    }

    async fn find(&self, uid: &str) -> Result<Resource, ToolError> {
        self.dav
            .find_uid(uid)
            .await?
            .ok_or_else(|| ToolError::Failed(format!("there is no event with uid {uid}")))
    }
}

/// `end`, or `start + duration_minutes`, or `default`.
fn end_of(
    family: &Family,
    args: &Value,
    start: DateTime<Utc>,
    default: Option<DateTime<Utc>>,
) -> Result<DateTime<Utc>, ToolError> {
    let end = family.time_arg(args, "end", DayEdge::Start)?;
    let minutes = minutes_arg(args, "duration_minutes");
    let end = match (end, minutes) {
        (Some(e), Some(m)) if e != start + Duration::minutes(m) => {
            return Err(invalid(
                "end and duration_minutes disagree: give only one of them",
            ))
        }
        (Some(e), _) => e,
        (None, Some(m)) => start + Duration::minutes(m),
        (None, None) => default.ok_or_else(|| {
            invalid("give end or duration_minutes (ask the user how long if unsure)")
        })?,
    };
    if end <= start {
        return Err(invalid("end must be after start"));
    }
    Ok(end)
}

struct ListEvents {
    spec: ToolSpec,
    family: Arc<Family>,
}

#[async_trait]
impl Tool for ListEvents {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let f = &self.family;
        let (from, to) = f.period(&args)?;
        let events: Vec<Value> = f
            .occurrences(from, to)
            .await?
            .iter()
            .take(MAX_LISTED)
            .map(|o| f.present_occurrence(o))
            .collect();
        Ok(Value::Array(events))
    }
}

struct FindConflicts {
    spec: ToolSpec,
    family: Arc<Family>,
}

#[async_trait]
impl Tool for FindConflicts {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let f = &self.family;
        let (from, to) = f.period(&args)?;
        let conflicts = f.conflicts(from, to, str_arg(&args, "exclude_uid")).await?;
        Ok(Value::Array(
            conflicts
                .iter()
                .take(MAX_LISTED)
                .map(|o| f.present_occurrence(o))
                .collect(),
        ))
    }
}

struct FindFreeSlots {
    spec: ToolSpec,
    family: Arc<Family>,
}

/// Gaps of at least `length` in `[from, to)` around `busy` intervals (any order, may overlap).
fn free_gaps(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut busy: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    length: Duration,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    busy.sort();
    let mut gaps = Vec::new();
    let mut cursor = from;
    for (s, e) in busy {
        if s > cursor && s.min(to) - cursor >= length {
            gaps.push((cursor, s.min(to)));
        }
        cursor = cursor.max(e);
        if cursor >= to {
            return gaps;
        }
    }
    if to - cursor >= length {
        gaps.push((cursor, to));
    }
    gaps
}

/// `now` rounded up to the next quarter hour: free time does not start in the past.
fn next_quarter_hour(now: DateTime<Utc>) -> DateTime<Utc> {
    let ts = now.timestamp();
    let rounded = (ts + 899).div_euclid(900) * 900;
    DateTime::from_timestamp(rounded, 0).unwrap_or(now)
}

#[async_trait]
impl Tool for FindFreeSlots {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let f = &self.family;
        let date = time::parse_date(str_arg(&args, "date").unwrap_or_default())
            .map_err(|e| invalid(format!("date: {e}")))?;
        let clock = |key: &str, default: &str| {
            time::parse_clock(str_arg(&args, key).unwrap_or(default))
                .map_err(|e| invalid(format!("{key}: {e}")))
        };
        let (day_start, day_end) = (clock("day_start", "09:00")?, clock("day_end", "18:00")?);
        if day_end <= day_start {
            return Err(invalid("day_end must be after day_start"));
        }
        let minutes = minutes_arg(&args, "duration_minutes")
            .filter(|m| *m > 0)
            .ok_or_else(|| invalid("duration_minutes must be a positive number"))?;
        let length = Duration::minutes(minutes);
        let from = f.zone.to_utc(date.and_time(day_start));
        let to = f.zone.to_utc(date.and_time(day_end));
        let busy: Vec<Occurrence> = f
            .conflicts(from, to, None)
            .await?
            .into_iter()
            .filter(|o| ical::overlaps(o.event.start, o.event.end, from, to))
            .collect();
        let earliest = from.max(next_quarter_hour(Utc::now()));
        let gaps = if earliest >= to {
            Vec::new()
        } else {
            free_gaps(
                earliest,
                to,
                busy.iter().map(|o| (o.event.start, o.event.end)).collect(),
                length,
            )
        };
        Ok(json!({
            "date": date.format("%Y-%m-%d").to_string(),
            "duration_minutes": minutes,
            "free_slots": gaps.iter().map(|(s, e)| json!({
                "start": f.zone.format(*s), "end": f.zone.format(*e),
            })).collect::<Vec<_>>(),
            "busy": busy.iter().map(|o| json!({
                "summary": o.event.summary,
                "start": f.zone.format(o.event.start),
                "end": f.zone.format(o.event.end),
            })).collect::<Vec<_>>(),
        }))
    }
}

struct CreateEvent {
    spec: ToolSpec,
    family: Arc<Family>,
}

#[async_trait]
impl Tool for CreateEvent {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, ctx: &ToolCtx) -> Result<Value, ToolError> {
        let f = &self.family;
        let summary = text_arg(&args, "summary")?
            .filter(|s| !s.is_empty())
            .ok_or_else(|| invalid("summary: required"))?;
        let start = f
            .time_arg(&args, "start", DayEdge::Start)?
            .ok_or_else(|| invalid("start: required"))?;
        let end = end_of(f, &args, start, None)?;
        let (uid, file) = uid_for(&ctx.idempotency_key);
        let fields = EventFields {
            uid,
            summary,
            start,
            end,
            attendees: people_arg(&args)?.unwrap_or_default(),
            location: text_arg(&args, "location")?.filter(|s| !s.is_empty()),
            description: text_arg(&args, "description")?.filter(|s| !s.is_empty()),
        };
        let href = f.dav.href_for(&file)?;

        // A repeated call (same idempotency key) answers with what the first one booked.
        if let Some(existing) = f.dav.get(&href).await? {
            return Ok(f.present(&f.master_of(&existing, &fields.uid)?, false));
        }
        let allow_conflict = args
            .get("allow_conflict")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !allow_conflict {
            let conflicts = f.conflicts(start, end, Some(&fields.uid)).await?;
            if !conflicts.is_empty() {
                return Err(f.conflict_error(&conflicts, false));
            }
        }
        let ics = ical::build_ics(&fields, Utc::now());
        let existing = match f.dav.create(&href, ics).await? {
            Created::New => {
                tracing::debug!("calendar event created");
                let event = Vevent {
                    uid: fields.uid.clone(),
                    summary: fields.summary.clone(),
                    location: fields.location.clone(),
                    description: fields.description.clone(),
                    start,
                    end,
                    start_offset: f.zone.offset(),
                    all_day: false,
                    attendees: fields.attendees.clone(),
                    rrule: None,
                    exdates: Vec::new(),
                    recurrence_id: None,
                    cancelled: false,
                    transparent: false,
                };
                return Ok(f.present(&event, false));
            }
            // Created meanwhile by a concurrent identical call.
            Created::AlreadyThere => f.dav.get(&href).await?,
            Created::UidElsewhere => f.dav.find_uid(&fields.uid).await?,
        };
        let existing = existing.ok_or_else(|| {
            ToolError::Failed("the calendar server refused the event; nothing was booked".into())
        })?;
        Ok(f.present(&f.master_of(&existing, &fields.uid)?, false))
    }
}

struct UpdateEvent {
    spec: ToolSpec,
    family: Arc<Family>,
}

#[async_trait]
impl Tool for UpdateEvent {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let f = &self.family;
        let uid = str_arg(&args, "uid")
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| invalid("uid: required"))?
            .to_string();
        let new_start = f.time_arg(&args, "start", DayEdge::Start)?;
        let times_given = new_start.is_some()
            || args.get("end").is_some()
            || args.get("duration_minutes").is_some();
        let mut changes = Changes {
            summary: text_arg(&args, "summary")?,
            attendees: people_arg(&args)?,
            location: text_arg(&args, "location")?,
            description: text_arg(&args, "description")?,
            ..Changes::default()
        };
        if changes.summary.as_deref() == Some("") {
            return Err(invalid("summary: cannot be empty"));
        }
        if !times_given
            && changes.summary.is_none()
            && changes.attendees.is_none()
            && changes.location.is_none()
            && changes.description.is_none()
        {
            return Err(invalid("nothing to change: give summary, start, end, duration_minutes, attendees, location or description"));
        }
        let resource = f.find(&uid).await?;
        let current = f.master_of(&resource, &uid)?;
        if times_given {
            let start = new_start.unwrap_or(current.start);
            // Moving keeps the length; a new end or duration changes it.
            let end = end_of(f, &args, start, Some(start + (current.end - current.start)))?;
            if (start, end) != (current.start, current.end) {
                let allow_conflict = args
                    .get("allow_conflict")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if !allow_conflict {
                    let conflicts = f.conflicts(start, end, Some(&uid)).await?;
                    if !conflicts.is_empty() {
                        return Err(f.conflict_error(&conflicts, true));
                    }
                }
                changes.start = Some(start);
                changes.end = Some(end);
            }
        }
        let ics = ical::apply_changes(&resource.ics, &uid, &changes, Utc::now()).map_err(|e| {
            tracing::debug!(error = %e, "cannot edit calendar event");
            ToolError::Failed(format!("the event {uid} cannot be edited by the agent"))
        })?;
        f.dav
            .replace(&resource.href, ics.clone(), resource.etag.as_deref())
            .await?;
        let updated = f.master_of(&Resource { ics, ..resource }, &uid)?;
        Ok(f.present(&updated, updated.rrule.is_some()))
    }
}

struct DeleteEvent {
    spec: ToolSpec,
    family: Arc<Family>,
}

#[async_trait]
impl Tool for DeleteEvent {
    fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    async fn call(&self, args: Value, _ctx: &ToolCtx) -> Result<Value, ToolError> {
        let f = &self.family;
        let uid = str_arg(&args, "uid")
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| invalid("uid: required"))?;
        let resource = f.find(uid).await?;
        let summary = f
            .master_of(&resource, uid)
            .map(|e| e.summary)
            .unwrap_or_default();
        if !f
            .dav
            .delete(&resource.href, resource.etag.as_deref())
            .await?
        {
            return Err(ToolError::Failed(format!(
                "there is no event with uid {uid}"
            )));
        }
        Ok(json!({"deleted": true, "uid": uid, "summary": summary}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(url: &str) -> CalendarConfig {
        CalendarConfig {
            enabled: true,
            url: url.into(),
            ..CalendarConfig::default()
        }
    }

    #[test]
    fn disabled_builds_nothing_and_enabled_builds_six_tools() {
        assert!(build(&CalendarConfig::default()).unwrap().is_empty());
        let tools = build(&enabled("http://127.0.0.1:5232/alice/calendar/")).unwrap();
        let names: Vec<_> = tools.iter().map(|t| t.spec().name.clone()).collect();
        assert_eq!(
            names,
            [
                "calendar_list_events",
                "calendar_find_conflicts",
                "calendar_find_free_slots",
                "calendar_create_event",
                "calendar_update_event",
                "calendar_delete_event"
            ]
        );
        for t in &tools {
            let s = t.spec();
            assert!(
                jsonschema::validator_for(&s.parameters).is_ok(),
                "{}",
                s.name
            );
            assert_eq!(s.timeout, std::time::Duration::from_secs(5));
            let mutating = [
                "calendar_create_event",
                "calendar_update_event",
                "calendar_delete_event",
            ]
            .contains(&s.name.as_str());
            assert_eq!(s.effect == Effect::Mutating, mutating, "{}", s.name);
        }
        assert!(tools[0].spec().description.contains("UTC+08:00"));
    }

    #[test]
    fn every_config_problem_is_reported_with_its_field() {
        let mut c = enabled("ftp://example.com/cal/");
        c.utc_offset_minutes = 2000;
        c.timeout_ms = 0;
        c.password = Some(SecretRef::Env("KOTAEMON_TEST_CALDAV_UNSET".into()));
        let p = build(&c).err().unwrap();
        assert!(
            p.iter()
                .any(|e| e.starts_with("url: must be http or https")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|e| e.starts_with("utc_offset_minutes:")),
            "{p:?}"
        );
        assert!(p.iter().any(|e| e.starts_with("timeout_ms:")), "{p:?}");
        assert!(
            p.iter()
                .any(|e| e.starts_with("username: required when password")),
            "{p:?}"
        );

        c = enabled("http://alice:hunter2@example.com/cal/");
        c.username = Some("alice".into());
        c.password = Some(SecretRef::Env("KOTAEMON_TEST_CALDAV_UNSET".into()));
        let p = build(&c).err().unwrap();
        assert!(
            p.iter()
                .any(|e| e.starts_with("url: must not hold credentials")),
            "{p:?}"
        );
        assert!(!p.iter().any(|e| e.contains("hunter2")), "{p:?}");
        assert!(
            p.iter()
                .any(|e| e.starts_with("password:") && e.contains("KOTAEMON_TEST_CALDAV_UNSET")),
            "{p:?}"
        );

        for bad in ["", "not a url", "http://"] {
            let p = build(&enabled(bad)).err().unwrap();
            assert!(p.iter().all(|e| e.starts_with("url:")), "{bad}: {p:?}");
        }
    }

    #[test]
    fn config_parses_from_toml_and_refuses_unknown_fields() {
        let c: CalendarConfig = toml::from_str(
            "enabled = true\nurl = \"https://dav.example.com/cal/\"\nusername = \"alice\"\n\
             password = \"env:CALDAV_PASSWORD\"\nutc_offset_minutes = 540\n",
        )
        .unwrap();
        assert_eq!(c.utc_offset_minutes, 540);
        assert_eq!(c.timeout_ms, 5000);
        assert!(!c.create_calendar_if_missing);
        assert!(toml::from_str::<CalendarConfig>("password = \"hunter2\"").is_err());
        assert!(toml::from_str::<CalendarConfig>("colour = \"red\"").is_err());
        let round = toml::to_string(&CalendarConfig::default()).unwrap();
        assert!(toml::from_str::<CalendarConfig>(&round).is_ok(), "{round}");
    }

    #[test]
    fn uids_are_stable_per_key_and_distinct_across_keys() {
        let (a, fa) = uid_for("turn-1/call-1");
        assert_eq!(uid_for("turn-1/call-1"), (a.clone(), fa.clone()));
        assert_ne!(uid_for("turn-1/call-2").0, a);
        assert!(a.ends_with("@kotaemon") && a.len() == 32 + 9, "{a}");
        assert_eq!(fa, format!("{}.ics", &a[..32]));
    }

    #[test]
    fn attendees_accept_strings_and_objects_and_refuse_junk() {
        let p = people_arg(&json!({"attendees": [
            "li@example.com",
            {"email": "MAILTO:han@example.com", "name": " Han Meimei "},
            {"email": "LI@example.com"},
        ]}))
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            [
                Person {
                    name: None,
                    email: "li@example.com".into()
                },
                Person {
                    name: Some("Han Meimei".into()),
                    email: "han@example.com".into()
                },
            ]
        );
        assert_eq!(people_arg(&json!({})).unwrap(), None);
        for bad in [
            "li",
            "@x",
            "a@",
            "a b@x.com",
            "a@b@c",
            "x@y.com\r\nATTENDEE:evil@z",
        ] {
            let e = people_arg(&json!({"attendees": [bad]})).unwrap_err();
            assert!(matches!(e, ToolError::InvalidArguments(_)), "{bad}");
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn free_gaps_skip_busy_time_and_short_gaps() {
        let h = |x: &str| t(&format!("2026-11-26T{x}:00Z"));
        let busy = vec![
            (h("10:00"), h("10:30")),
            (h("10:15"), h("11:00")),
            (h("11:20"), h("12:00")),
            (h("17:30"), h("19:00")),
        ];
        let gaps = free_gaps(h("09:00"), h("18:00"), busy.clone(), Duration::minutes(30));
        assert_eq!(
            gaps,
            [(h("09:00"), h("10:00")), (h("12:00"), h("17:30"))],
            "11:00-11:20 is too short"
        );
        assert!(free_gaps(
            h("09:00"),
            h("18:00"),
            vec![(h("08:00"), h("19:00"))],
            Duration::minutes(1)
        )
        .is_empty());
        assert_eq!(
            free_gaps(h("09:00"), h("10:00"), Vec::new(), Duration::minutes(60)),
            [(h("09:00"), h("10:00"))]
        );
        assert_eq!(
            next_quarter_hour(t("2026-11-26T10:00:00Z")),
            t("2026-11-26T10:00:00Z")
        );
        assert_eq!(
            next_quarter_hour(t("2026-11-26T10:00:01Z")),
            t("2026-11-26T10:15:00Z")
        );
    }
}
