//! iCalendar (RFC 5545): the VEVENT the tools write, the events they read back (in UTC, with
//! simple recurrences expanded) and in-place edits that keep everything else another client
//! put in the resource.
//!
//! Written times are always UTC (`DTSTART:20261126T020000Z`): unambiguous for every server and
//! client. Read times may be UTC, floating, all-day dates or `TZID`-relative; the zone of a
//! `TZID` comes from the resource's `VTIMEZONE` when it has a single offset (China, Japan,
//! India…), from a short list of well-known names, and otherwise from the device's zone.

use super::time::Zone;
use chrono::{
    DateTime, Datelike, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc,
    Weekday,
};
use icalendar::{
    Attendee, Calendar, CalendarComponent, Component, Event, EventLike, PartStat, Property, Role,
};

/// Someone invited to an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub name: Option<String>,
    pub email: String,
}

/// What the tools write into a new event.
#[derive(Debug, Clone)]
pub struct EventFields {
    pub uid: String,
    pub summary: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub attendees: Vec<Person>,
    pub location: Option<String>,
    pub description: Option<String>,
}

/// A VEVENT as read from the server, times in UTC.
#[derive(Debug, Clone, PartialEq)]
pub struct Vevent {
    pub uid: String,
    pub summary: String,
    pub location: Option<String>,
    pub description: Option<String>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// The offset DTSTART was written in: recurrences repeat in that wall time.
    pub start_offset: FixedOffset,
    pub all_day: bool,
    pub attendees: Vec<Person>,
    pub rrule: Option<String>,
    pub exdates: Vec<DateTime<Utc>>,
    /// Set on an override of one instance of a recurring event.
    pub recurrence_id: Option<DateTime<Utc>>,
    /// `STATUS:CANCELLED`: shown in listings, never a conflict.
    pub cancelled: bool,
    /// `TRANSP:TRANSPARENT`: does not make the time busy.
    pub transparent: bool,
}

impl Vevent {
    /// Does it take up time (for conflicts and free slots)?
    pub fn blocks_time(&self) -> bool {
        !self.cancelled && !self.transparent
    }
}

/// One occurrence of an event within a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Occurrence {
    pub event: Vevent,
    /// Part of a recurring series.
    pub recurring: bool,
    /// False when the series' rule is beyond this expander (e.g. "second Monday of the
    /// month"): the event is then shown once with its first occurrence's times.
    pub exact: bool,
}

/// `[s, e)` overlaps `[from, to)`; a zero-length event overlaps if it lies inside.
pub fn overlaps(
    s: DateTime<Utc>,
    e: DateTime<Utc>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> bool {
    s < to && (e > from || (s == e && s >= from))
}

const PRODID: &str = "-//Kotaemon//calendar tool//EN";

/// `"` and control characters cannot appear in a parameter value (CN).
fn param_safe(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && !c.is_control())
        .collect::<String>()
        .trim()
        .to_string()
}

fn attendee(p: &Person) -> Attendee {
    let mut a = Attendee::new(format!("mailto:{}", p.email))
        .role(Role::ReqParticipant)
        .partstat(PartStat::NeedsAction);
    if let Some(name) = p.name.as_deref().map(param_safe).filter(|n| !n.is_empty()) {
        a = a.cn(name);
    }
    a
}

/// A whole VCALENDAR holding one new VEVENT.
pub fn build_ics(f: &EventFields, now: DateTime<Utc>) -> String {
    let mut event = Event::new();
    event
        .uid(&f.uid)
        .timestamp(now)
        .created(now)
        .last_modified(now)
        .summary(&f.summary)
        .starts(f.start)
        .ends(f.end)
        .sequence(0);
    if let Some(l) = &f.location {
        event.location(l);
    }
    if let Some(d) = &f.description {
        event.description(d);
    }
    for p in &f.attendees {
        event.attendee(attendee(p));
    }
    let mut cal = Calendar::empty();
    cal.append_property(Property::new("VERSION", "2.0"))
        .append_property(Property::new("PRODID", PRODID))
        .append_property(Property::new("CALSCALE", "GREGORIAN"))
        .push(event.done());
    cal.to_string()
}

/// Changes to one event; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub summary: Option<String>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub attendees: Option<Vec<Person>>,
    /// An empty string removes the location.
    pub location: Option<String>,
    /// An empty string removes the description.
    pub description: Option<String>,
}

/// Applies `changes` to the master VEVENT with `uid` (not to overrides of single instances)
/// and returns the whole resource again, everything else untouched.
pub fn apply_changes(
    ics: &str,
    uid: &str,
    changes: &Changes,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let mut cal: Calendar = ics.parse()?;
    let event = cal
        .events_mut()
        .find(|e| e.get_uid() == Some(uid) && e.property_value("RECURRENCE-ID").is_none())
        .ok_or_else(|| format!("the resource holds no event with uid {uid}"))?;
    if let Some(s) = &changes.summary {
        event.summary(s);
    }
    if let Some(s) = changes.start {
        event.starts(s);
    }
    if let Some(e) = changes.end {
        event.remove_property("DURATION");
        event.ends(e);
    }
    if let Some(people) = &changes.attendees {
        event.remove_multi_property("ATTENDEE");
        for p in people {
            event.attendee(attendee(p));
        }
    }
    match changes.location.as_deref() {
        Some("") => {
            event.remove_location();
        }
        Some(l) => {
            event.location(l);
        }
        None => {}
    }
    match changes.description.as_deref() {
        Some("") => {
            event.remove_description();
        }
        Some(d) => {
            event.description(d);
        }
        None => {}
    }
    let sequence = event.get_sequence().unwrap_or(0).saturating_add(1);
    event.sequence(sequence).timestamp(now).last_modified(now);
    Ok(cal.to_string())
}

/// Every VEVENT in one resource (a recurring event's master and its overrides share a UID).
pub fn parse_events(ics: &str, zone: Zone) -> Result<Vec<Vevent>, String> {
    let cal: Calendar = ics.parse()?;
    let zones = Vtimezones::of(&cal);
    let mut out = Vec::new();
    for c in &cal.components {
        let CalendarComponent::Event(e) = c else {
            continue;
        };
        out.push(read_event(e, &zones, zone)?);
    }
    Ok(out)
}

fn read_event(e: &Event, zones: &Vtimezones, zone: Zone) -> Result<Vevent, String> {
    let uid = e.get_uid().unwrap_or_default().to_string();
    let dtstart = e
        .properties()
        .get("DTSTART")
        .ok_or_else(|| format!("event {uid} has no DTSTART"))?;
    let start = read_time(dtstart, dtstart.value(), zones, zone)
        .ok_or_else(|| format!("event {uid} has an unreadable DTSTART"))?;
    let end = match e.properties().get("DTEND") {
        Some(p) => {
            read_time(p, p.value(), zones, zone)
                .ok_or_else(|| format!("event {uid} has an unreadable DTEND"))?
                .utc
        }
        None => match e.property_value("DURATION").and_then(parse_duration) {
            Some(d) => start.utc + d,
            None if start.date_only => start.utc + Duration::days(1),
            None => start.utc,
        },
    };
    let attendees = e
        .get_attendees()
        .into_iter()
        .map(|a| Person {
            email: strip_mailto(&a.cal_address).to_string(),
            name: a.cn.filter(|n| !n.is_empty()),
        })
        .collect();
    let recurrence_id = e
        .properties()
        .get("RECURRENCE-ID")
        .and_then(|p| read_time(p, p.value(), zones, zone))
        .map(|t| t.utc);
    let exdates = e
        .multi_properties()
        .get("EXDATE")
        .into_iter()
        .flatten()
        .flat_map(|p| {
            p.value()
                .split(',')
                .filter_map(|v| read_time(p, v.trim(), zones, zone))
                .map(|t| t.utc)
                .collect::<Vec<_>>()
        })
        .collect();
    let upper = |k: &str| e.property_value(k).map(|v| v.trim().to_ascii_uppercase());
    Ok(Vevent {
        uid,
        summary: e.get_summary().unwrap_or_default().to_string(),
        location: e
            .get_location()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string),
        description: e
            .get_description()
            .filter(|d| !d.trim().is_empty())
            .map(str::to_string),
        start: start.utc,
        end: end.max(start.utc),
        start_offset: start.offset,
        all_day: start.date_only,
        attendees,
        rrule: e.property_value("RRULE").map(str::to_string),
        exdates,
        recurrence_id,
        cancelled: upper("STATUS").as_deref() == Some("CANCELLED"),
        transparent: upper("TRANSP").as_deref() == Some("TRANSPARENT"),
    })
}

fn strip_mailto(address: &str) -> &str {
    let a = address.trim();
    match a.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("mailto:") => &a[7..],
        _ => a,
    }
}

struct ReadTime {
    utc: DateTime<Utc>,
    offset: FixedOffset,
    date_only: bool,
}

/// One DATE or DATE-TIME value of `prop` (whose TZID and VALUE parameters apply).
fn read_time(prop: &Property, value: &str, zones: &Vtimezones, zone: Zone) -> Option<ReadTime> {
    let is_date = prop
        .params()
        .get("VALUE")
        .is_some_and(|v| v.value().eq_ignore_ascii_case("DATE"))
        || value.len() == 8;
    let tzid = prop.params().get("TZID").map(|p| p.value());
    if is_date {
        let d = NaiveDate::parse_from_str(value, "%Y%m%d").ok()?;
        return Some(ReadTime {
            utc: zone.to_utc(d.and_time(NaiveTime::MIN)),
            offset: zone.offset(),
            date_only: true,
        });
    }
    if let Some(v) = value.strip_suffix(['Z', 'z']) {
        let n = NaiveDateTime::parse_from_str(v, "%Y%m%dT%H%M%S").ok()?;
        return Some(ReadTime {
            utc: n.and_utc(),
            offset: FixedOffset::east_opt(0)?,
            date_only: false,
        });
    }
    let n = NaiveDateTime::parse_from_str(value, "%Y%m%dT%H%M%S").ok()?;
    let offset = match tzid {
        Some(id) => zones.offset_of(id, zone),
        None => zone.offset(),
    };
    Some(ReadTime {
        utc: offset.from_local_datetime(&n).single()?.with_timezone(&Utc),
        offset,
        date_only: false,
    })
}

/// The resource's VTIMEZONEs: TZID → the offsets its observances use.
struct Vtimezones(Vec<(String, Vec<FixedOffset>)>);

impl Vtimezones {
    fn of(cal: &Calendar) -> Self {
        let mut out = Vec::new();
        for c in &cal.components {
            let CalendarComponent::Other(o) = c else {
                continue;
            };
            if !o.component_kind().eq_ignore_ascii_case("VTIMEZONE") {
                continue;
            }
            let Some(id) = o.property_value("TZID") else {
                continue;
            };
            let mut offsets: Vec<FixedOffset> = Vec::new();
            for obs in o.components() {
                if let Some(off) = obs.property_value("TZOFFSETTO").and_then(parse_utc_offset) {
                    if !offsets.contains(&off) {
                        offsets.push(off);
                    }
                }
            }
            out.push((id.to_string(), offsets));
        }
        Vtimezones(out)
    }

    /// A zone with one offset is exact; with daylight saving, the device's own offset if the
    /// zone uses it (likely the same place), else its first observance (an approximation).
    fn offset_of(&self, tzid: &str, device: Zone) -> FixedOffset {
        if let Some((_, offsets)) = self.0.iter().find(|(id, _)| id == tzid) {
            match offsets.as_slice() {
                [one] => return *one,
                [] => {}
                many => {
                    return if many.contains(&device.offset()) {
                        device.offset()
                    } else {
                        many[0]
                    }
                }
            }
        }
        well_known_offset(tzid).unwrap_or_else(|| device.offset())
    }
}

/// Zones without daylight saving that clients often reference without a VTIMEZONE.
fn well_known_offset(tzid: &str) -> Option<FixedOffset> {
    let name = tzid.trim().trim_start_matches('/');
    let minutes = match name {
        "UTC" | "GMT" | "Z" | "Etc/UTC" | "Etc/GMT" | "Universal" | "Zulu" => 0,
        "Asia/Shanghai"
        | "Asia/Chongqing"
        | "Asia/Chungking"
        | "Asia/Harbin"
        | "PRC"
        | "Asia/Hong_Kong"
        | "Asia/Macau"
        | "Asia/Taipei"
        | "Asia/Singapore"
        | "Singapore"
        | "Asia/Kuala_Lumpur"
        | "Asia/Manila"
        | "Australia/Perth"
        | "China Standard Time" => 480,
        "Asia/Urumqi" => 360,
        "Asia/Tokyo" | "Japan" | "Asia/Seoul" | "ROK" | "Tokyo Standard Time" => 540,
        "Asia/Kolkata" | "Asia/Calcutta" | "India Standard Time" => 330,
        "Asia/Bangkok" | "Asia/Jakarta" | "Asia/Ho_Chi_Minh" | "Asia/Saigon" => 420,
        "Asia/Dubai" => 240,
        _ => return None,
    };
    FixedOffset::east_opt(minutes * 60)
}

/// `+0800`, `-0530`, `+080000`.
fn parse_utc_offset(s: &str) -> Option<FixedOffset> {
    let s = s.trim();
    let sign = match s.get(..1)? {
        "+" => 1,
        "-" => -1,
        _ => return None,
    };
    let digits = s.get(1..)?;
    if !(digits.len() == 4 || digits.len() == 6) || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let h: i32 = digits.get(0..2)?.parse().ok()?;
    let m: i32 = digits.get(2..4)?.parse().ok()?;
    let sec: i32 = digits
        .get(4..)
        .filter(|x| !x.is_empty())
        .map_or(Some(0), |x| x.parse().ok())?;
    FixedOffset::east_opt(sign * (h * 3600 + m * 60 + sec))
}

/// RFC 5545 durations: `PT1H30M`, `P1D`, `P2W`, `-PT15M` (negative ones are refused).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    let rest = s.strip_prefix('P')?;
    let mut total = Duration::zero();
    let mut in_time = false;
    let mut num = String::new();
    let mut any = false;
    for c in rest.chars() {
        match c {
            'T' => in_time = true,
            '0'..='9' => num.push(c),
            _ => {
                let n: i64 = num.parse().ok()?;
                num.clear();
                any = true;
                total += match (c, in_time) {
                    ('W', false) => Duration::weeks(n),
                    ('D', false) => Duration::days(n),
                    ('H', true) => Duration::hours(n),
                    ('M', true) => Duration::minutes(n),
                    ('S', true) => Duration::seconds(n),
                    _ => return None,
                };
            }
        }
    }
    (any && num.is_empty()).then_some(total)
}

// ---------------------------------------------------------------------------------------------
// Recurrence

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freq {
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

/// The common subset of RRULE: FREQ, INTERVAL, COUNT, UNTIL, plain BYDAY (daily/weekly).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    freq: Freq,
    interval: u32,
    count: Option<u32>,
    until: Option<DateTime<Utc>>,
    by_day: Vec<Weekday>,
}

fn parse_rule(s: &str, offset: FixedOffset) -> Option<Rule> {
    let mut rule = Rule {
        freq: Freq::Daily,
        interval: 1,
        count: None,
        until: None,
        by_day: Vec::new(),
    };
    let mut freq = None;
    for part in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=')?;
        match k.trim().to_ascii_uppercase().as_str() {
            "FREQ" => {
                freq = Some(match v.trim().to_ascii_uppercase().as_str() {
                    "DAILY" => Freq::Daily,
                    "WEEKLY" => Freq::Weekly,
                    "MONTHLY" => Freq::Monthly,
                    "YEARLY" => Freq::Yearly,
                    _ => return None,
                })
            }
            "INTERVAL" => rule.interval = v.trim().parse().ok().filter(|n| *n > 0)?,
            "COUNT" => rule.count = Some(v.trim().parse().ok()?),
            "UNTIL" => {
                let v = v.trim();
                rule.until = Some(if let Some(z) = v.strip_suffix('Z') {
                    NaiveDateTime::parse_from_str(z, "%Y%m%dT%H%M%S")
                        .ok()?
                        .and_utc()
                } else if v.len() == 8 {
                    // A date: the whole day counts.
                    let d = NaiveDate::parse_from_str(v, "%Y%m%d").ok()?.succ_opt()?;
                    offset
                        .from_local_datetime(&d.and_time(NaiveTime::MIN))
                        .single()?
                        .with_timezone(&Utc)
                        - Duration::seconds(1)
                } else {
                    offset
                        .from_local_datetime(
                            &NaiveDateTime::parse_from_str(v, "%Y%m%dT%H%M%S").ok()?,
                        )
                        .single()?
                        .with_timezone(&Utc)
                })
            }
            "BYDAY" => {
                for d in v.split(',') {
                    rule.by_day
                        .push(match d.trim().to_ascii_uppercase().as_str() {
                            "MO" => Weekday::Mon,
                            "TU" => Weekday::Tue,
                            "WE" => Weekday::Wed,
                            "TH" => Weekday::Thu,
                            "FR" => Weekday::Fri,
                            "SA" => Weekday::Sat,
                            "SU" => Weekday::Sun,
                            // "1MO", "-1FR": positions within a month or year.
                            _ => return None,
                        });
                }
            }
            "WKST" => {}
            _ => return None,
        }
    }
    rule.freq = freq?;
    if !rule.by_day.is_empty() && !matches!(rule.freq, Freq::Daily | Freq::Weekly) {
        return None;
    }
    rule.by_day.sort_by_key(|d| d.num_days_from_monday());
    rule.by_day.dedup();
    Some(rule)
}

/// More periods than this (137 years of days) and the rule is not expanded further.
const MAX_PERIODS: u32 = 50_000;

fn add_months(d: NaiveDate, months: u32, day: u32) -> Option<NaiveDate> {
    let m0 = i64::from(d.month0()) + i64::from(months);
    let year = i64::from(d.year()) + m0.div_euclid(12);
    NaiveDate::from_ymd_opt(
        i32::try_from(year).ok()?,
        u32::try_from(m0.rem_euclid(12)).ok()? + 1,
        day,
    )
}

/// Starts of the occurrences of `master` that overlap `[from, to)`, without EXDATEs.
fn expand(
    master: &Vevent,
    rule: &Rule,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    let off = master.start_offset;
    let local0 = master.start.with_timezone(&off).naive_local();
    let (d0, t0) = (local0.date(), local0.time());
    let length = master.end - master.start;
    let week0 = d0 - Duration::days(i64::from(d0.weekday().num_days_from_monday()));
    let mut produced = 0u32;
    let mut out = Vec::new();
    for k in 0..MAX_PERIODS {
        let step = k.saturating_mul(rule.interval);
        let days: Vec<NaiveDate> = match rule.freq {
            Freq::Daily => {
                let d = d0 + Duration::days(i64::from(step));
                if rule.by_day.is_empty() || rule.by_day.contains(&d.weekday()) {
                    vec![d]
                } else {
                    vec![]
                }
            }
            Freq::Weekly => {
                let ws = week0 + Duration::weeks(i64::from(step));
                let wanted = if rule.by_day.is_empty() {
                    vec![d0.weekday()]
                } else {
                    rule.by_day.clone()
                };
                wanted
                    .iter()
                    .map(|w| ws + Duration::days(i64::from(w.num_days_from_monday())))
                    .filter(|d| *d >= d0)
                    .collect()
            }
            // A month without that day (the 31st, 29 February) is skipped, as RFC 5545 says.
            Freq::Monthly => add_months(d0, step, d0.day()).into_iter().collect(),
            Freq::Yearly => add_months(d0, step.saturating_mul(12), d0.day())
                .into_iter()
                .collect(),
        };
        for d in days {
            let Some(s) = off
                .from_local_datetime(&d.and_time(t0))
                .single()
                .map(|t| t.with_timezone(&Utc))
            else {
                continue;
            };
            if rule.until.is_some_and(|u| s > u) || rule.count.is_some_and(|c| produced >= c) {
                return out;
            }
            produced += 1;
            if s >= to {
                return out;
            }
            if overlaps(s, s + length, from, to) && !master.exdates.contains(&s) {
                out.push(s);
            }
        }
    }
    out
}

/// The occurrences of one resource's events (a series' master and overrides, or one plain
/// event) that overlap `[from, to)`.
pub fn occurrences(events: &[Vevent], from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Occurrence> {
    let mut out = Vec::new();
    for master in events.iter().filter(|e| e.recurrence_id.is_none()) {
        let Some(rrule) = &master.rrule else {
            if overlaps(master.start, master.end, from, to) {
                out.push(Occurrence {
                    event: master.clone(),
                    recurring: false,
                    exact: true,
                });
            }
            continue;
        };
        let overridden = |s: &DateTime<Utc>| {
            events
                .iter()
                .any(|o| o.uid == master.uid && o.recurrence_id == Some(*s))
        };
        match parse_rule(rrule, master.start_offset) {
            Some(rule) => {
                let length = master.end - master.start;
                for s in expand(master, &rule, from, to) {
                    if overridden(&s) {
                        continue;
                    }
                    let mut event = master.clone();
                    event.start = s;
                    event.end = s + length;
                    out.push(Occurrence {
                        event,
                        recurring: true,
                        exact: true,
                    });
                }
            }
            None => out.push(Occurrence {
                event: master.clone(),
                recurring: true,
                exact: false,
            }),
        }
    }
    for o in events.iter().filter(|e| e.recurrence_id.is_some()) {
        if overlaps(o.start, o.end, from, to) {
            out.push(Occurrence {
                event: o.clone(),
                recurring: true,
                exact: true,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn china() -> Zone {
        Zone::from_minutes(480).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn fields() -> EventFields {
        EventFields {
            uid: "abc@kotaemon".into(),
            summary: "Design review; budget, Q4".into(),
            start: utc("2026-11-26T02:00:00Z"),
            end: utc("2026-11-26T03:00:00Z"),
            attendees: vec![
                Person {
                    name: Some("Li \"Lei\"".into()),
                    email: "li@example.com".into(),
                },
                Person {
                    name: None,
                    email: "han@example.com".into(),
                },
            ],
            location: Some("Room 3, floor 2".into()),
            description: Some("line one\nline two".into()),
        }
    }

    #[test]
    fn built_event_is_utc_with_attendees_and_reads_back() {
        let ics = build_ics(&fields(), utc("2026-11-20T00:00:00Z"));
        assert!(ics.starts_with("BEGIN:VCALENDAR\r\n"), "{ics}");
        assert!(ics.contains("VERSION:2.0\r\n"));
        assert!(ics.contains("PRODID:-//Kotaemon//calendar tool//EN\r\n"));
        assert!(ics.contains("DTSTART:20261126T020000Z\r\n"), "{ics}");
        assert!(ics.contains("DTEND:20261126T030000Z\r\n"));
        assert!(ics.contains("UID:abc@kotaemon\r\n"));
        assert!(
            ics.contains("SUMMARY:Design review\\; budget\\, Q4\r\n"),
            "{ics}"
        );
        let unfolded = ics.replace("\r\n ", "");
        assert!(unfolded.contains("CN=Li Lei"), "{ics}");
        assert!(unfolded.contains(":mailto:li@example.com\r\n"), "{ics}");
        assert!(unfolded.contains(":mailto:han@example.com\r\n"), "{ics}");
        assert_eq!(ics.matches("BEGIN:VEVENT").count(), 1);

        let events = parse_events(&ics, china()).unwrap();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.uid, "abc@kotaemon");
        assert_eq!(e.summary, "Design review; budget, Q4");
        assert_eq!(e.start, utc("2026-11-26T02:00:00Z"));
        assert_eq!(e.end, utc("2026-11-26T03:00:00Z"));
        assert_eq!(e.location.as_deref(), Some("Room 3, floor 2"));
        assert_eq!(e.description.as_deref(), Some("line one\nline two"));
        assert!(!e.all_day && e.rrule.is_none() && e.blocks_time());
        let emails: Vec<_> = e.attendees.iter().map(|p| p.email.as_str()).collect();
        assert_eq!(emails, ["li@example.com", "han@example.com"]);
        assert_eq!(e.attendees[0].name.as_deref(), Some("Li Lei"));
        assert_eq!(e.attendees[1].name, None);
    }

    #[test]
    fn foreign_events_with_zones_dates_and_durations() {
        let ics = "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Test//EN\r\n\
BEGIN:VTIMEZONE\r\nTZID:Custom/Tokyo\r\nBEGIN:STANDARD\r\nDTSTART:19700101T000000\r\n\
TZOFFSETFROM:+0900\r\nTZOFFSETTO:+0900\r\nEND:STANDARD\r\nEND:VTIMEZONE\r\n\
BEGIN:VEVENT\r\nUID:tz\r\nDTSTAMP:20260101T000000Z\r\nDTSTART;TZID=Custom/Tokyo:20261126T110000\r\n\
DURATION:PT1H30M\r\nSUMMARY:Tokyo call\r\nATTENDEE;CN=\"A, B\":MAILTO:ab@example.com\r\nEND:VEVENT\r\n\
BEGIN:VEVENT\r\nUID:day\r\nDTSTAMP:20260101T000000Z\r\nDTSTART;VALUE=DATE:20261126\r\n\
SUMMARY:Holiday\r\nTRANSP:TRANSPARENT\r\nEND:VEVENT\r\n\
BEGIN:VEVENT\r\nUID:float\r\nDTSTAMP:20260101T000000Z\r\nDTSTART:20261126T150000\r\n\
DTEND:20261126T153000\r\nSUMMARY:Floating\r\nSTATUS:CANCELLED\r\nEND:VEVENT\r\n\
BEGIN:VEVENT\r\nUID:sh\r\nDTSTAMP:20260101T000000Z\r\nDTSTART;TZID=Asia/Shanghai:20261126T090000\r\n\
DTEND;TZID=Asia/Shanghai:20261126T093000\r\nSUMMARY:Known zone\r\nEND:VEVENT\r\n\
END:VCALENDAR\r\n";
        let ev = parse_events(ics, Zone::from_minutes(0).unwrap()).unwrap();
        assert_eq!(ev.len(), 4);
        assert_eq!(ev[0].start, utc("2026-11-26T02:00:00Z"));
        assert_eq!(ev[0].end, utc("2026-11-26T03:30:00Z"));
        assert_eq!(ev[0].attendees[0].email, "ab@example.com");
        assert_eq!(ev[0].attendees[0].name.as_deref(), Some("A, B"));
        // All-day and floating times are in the device's zone (UTC here).
        assert!(ev[1].all_day && !ev[1].blocks_time());
        assert_eq!(ev[1].start, utc("2026-11-26T00:00:00Z"));
        assert_eq!(ev[1].end, utc("2026-11-27T00:00:00Z"));
        assert_eq!(ev[2].start, utc("2026-11-26T15:00:00Z"));
        assert!(ev[2].cancelled && !ev[2].blocks_time());
        // No VTIMEZONE, but a well-known zone without daylight saving.
        assert_eq!(ev[3].start, utc("2026-11-26T01:00:00Z"));
        assert!(parse_events("not a calendar", china()).map_or(true, |v| v.is_empty()));
    }

    #[test]
    fn changes_keep_what_they_do_not_touch() {
        let mut f = fields();
        f.uid = "u1".into();
        let ics = build_ics(&f, utc("2026-11-20T00:00:00Z"));
        // Another client added an alarm and a private property.
        let ics = ics.replace(
            "END:VEVENT",
            "X-OTHER-CLIENT:keep me\r\nBEGIN:VALARM\r\nACTION:DISPLAY\r\nTRIGGER:-PT15M\r\n\
DESCRIPTION:Reminder\r\nEND:VALARM\r\nEND:VEVENT",
        );
        let changes = Changes {
            start: Some(utc("2026-11-26T06:00:00Z")),
            end: Some(utc("2026-11-26T07:00:00Z")),
            attendees: Some(vec![Person {
                name: None,
                email: "new@example.com".into(),
            }]),
            location: Some(String::new()),
            ..Changes::default()
        };
        let out = apply_changes(&ics, "u1", &changes, utc("2026-11-21T00:00:00Z")).unwrap();
        assert!(out.contains("DTSTART:20261126T060000Z"), "{out}");
        assert!(out.contains("X-OTHER-CLIENT:keep me"));
        assert!(out.contains("BEGIN:VALARM") && out.contains("TRIGGER:-PT15M"));
        assert!(out.contains("SEQUENCE:1"));
        assert!(!out.contains("LOCATION"));
        let e = &parse_events(&out, china()).unwrap()[0];
        assert_eq!(e.summary, "Design review; budget, Q4");
        assert_eq!(e.end, utc("2026-11-26T07:00:00Z"));
        assert_eq!(e.attendees.len(), 1);
        assert_eq!(e.attendees[0].email, "new@example.com");
        assert!(apply_changes(&ics, "other", &changes, Utc::now()).is_err());
    }

    #[test]
    fn durations_and_offsets() {
        assert_eq!(parse_duration("PT1H30M"), Some(Duration::minutes(90)));
        assert_eq!(parse_duration("P1D"), Some(Duration::days(1)));
        assert_eq!(parse_duration("P1W"), Some(Duration::weeks(1)));
        assert_eq!(parse_duration("P1DT2H"), Some(Duration::hours(26)));
        assert_eq!(parse_duration("-PT15M"), None);
        assert_eq!(parse_duration("PT"), None);
        assert_eq!(parse_duration("P1H"), None);
        assert_eq!(parse_utc_offset("+0800"), FixedOffset::east_opt(8 * 3600));
        assert_eq!(parse_utc_offset("-0530"), FixedOffset::east_opt(-19800));
        assert_eq!(parse_utc_offset("0800"), None);
    }

    fn weekly(rrule: &str) -> Vevent {
        // Mondays 10:00-10:30 in China, from 2 November 2026.
        let ics = format!(
            "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:x\r\nBEGIN:VEVENT\r\nUID:s\r\n\
DTSTAMP:20260101T000000Z\r\nDTSTART:20261102T100000\r\nDTEND:20261102T103000\r\n\
RRULE:{rrule}\r\nEXDATE:20261116T100000\r\nSUMMARY:Standup\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
        );
        parse_events(&ics, china()).unwrap().remove(0)
    }

    fn starts(o: &[Occurrence]) -> Vec<String> {
        o.iter().map(|o| china().format(o.event.start)).collect()
    }

    #[test]
    fn weekly_series_expand_with_exdates_and_overrides() {
        let m = weekly("FREQ=WEEKLY;BYDAY=MO,WE");
        let (from, to) = (utc("2026-11-15T16:00:00Z"), utc("2026-11-22T16:00:00Z"));
        let o = occurrences(std::slice::from_ref(&m), from, to);
        // Monday the 16th is excluded; Wednesday the 18th remains.
        assert_eq!(starts(&o), ["2026-11-18T10:00:00+08:00"]);
        assert!(o[0].recurring && o[0].exact);
        assert_eq!(o[0].event.end - o[0].event.start, Duration::minutes(30));

        let mut moved = m.clone();
        moved.recurrence_id = Some(utc("2026-11-18T02:00:00Z"));
        moved.rrule = None;
        moved.start = utc("2026-11-18T06:00:00Z");
        moved.end = utc("2026-11-18T06:30:00Z");
        let o = occurrences(&[m.clone(), moved], from, to);
        assert_eq!(starts(&o), ["2026-11-18T14:00:00+08:00"]);

        let o = occurrences(
            &[weekly("FREQ=WEEKLY;COUNT=2")],
            utc("2026-11-01T00:00:00Z"),
            utc("2026-12-31T00:00:00Z"),
        );
        assert_eq!(
            starts(&o),
            ["2026-11-02T10:00:00+08:00", "2026-11-09T10:00:00+08:00"]
        );
        let o = occurrences(
            &[weekly("FREQ=DAILY;INTERVAL=2;UNTIL=20261108T000000Z")],
            utc("2026-11-01T00:00:00Z"),
            utc("2026-12-31T00:00:00Z"),
        );
        assert_eq!(
            starts(&o),
            [
                "2026-11-02T10:00:00+08:00",
                "2026-11-04T10:00:00+08:00",
                "2026-11-06T10:00:00+08:00"
            ]
        );
        let o = occurrences(
            &[weekly("FREQ=MONTHLY")],
            utc("2027-01-01T00:00:00Z"),
            utc("2027-03-31T00:00:00Z"),
        );
        assert_eq!(
            starts(&o),
            [
                "2027-01-02T10:00:00+08:00",
                "2027-02-02T10:00:00+08:00",
                "2027-03-02T10:00:00+08:00"
            ]
        );
    }

    #[test]
    fn rules_beyond_the_expander_show_the_series_once() {
        let o = occurrences(
            &[weekly("FREQ=MONTHLY;BYDAY=1MO")],
            utc("2027-01-01T00:00:00Z"),
            utc("2027-01-31T00:00:00Z"),
        );
        assert_eq!(o.len(), 1);
        assert!(o[0].recurring && !o[0].exact);
        assert_eq!(o[0].event.start, utc("2026-11-02T02:00:00Z"));
    }

    #[test]
    fn overlap_edges() {
        let t = |h: u32| utc(&format!("2026-11-26T{h:02}:00:00Z"));
        assert!(overlaps(t(1), t(3), t(2), t(4)));
        assert!(
            !overlaps(t(1), t(2), t(2), t(4)),
            "touching is not overlapping"
        );
        assert!(!overlaps(t(4), t(5), t(2), t(4)));
        assert!(overlaps(t(2), t(2), t(2), t(4)), "a point inside");
        assert!(!overlaps(t(4), t(4), t(2), t(4)));
    }
}
