//! Local times as the model writes them ("2026-11-26T10:00", with or without an offset) and as
//! it reads them back (RFC 3339 in the device's zone). The device's zone is a fixed UTC offset
//! from config: enough for China (no daylight saving) and unambiguous everywhere.

use chrono::{DateTime, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

/// Which end of a day a bare date ("2026-11-26") stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayEdge {
    /// Midnight at the start of the day.
    Start,
    /// Midnight at the end of the day (the next day's start): `end: "2026-11-26"` covers it.
    End,
}

/// The device's time zone.
#[derive(Debug, Clone, Copy)]
pub struct Zone(FixedOffset);

impl Zone {
    pub fn from_minutes(minutes: i32) -> Option<Zone> {
        FixedOffset::east_opt(minutes.checked_mul(60)?).map(Zone)
    }

    pub fn offset(&self) -> FixedOffset {
        self.0
    }

    /// A wall-clock time in this zone as UTC (a fixed offset is never ambiguous).
    pub fn to_utc(&self, local: NaiveDateTime) -> DateTime<Utc> {
        (local - Duration::seconds(i64::from(self.0.local_minus_utc()))).and_utc()
    }

    /// RFC 3339 in this zone, to the second: `2026-11-26T10:00:00+08:00`.
    pub fn format(&self, t: DateTime<Utc>) -> String {
        self.0
            .from_utc_datetime(&t.naive_utc())
            .format("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    }

    /// Parses a date-time the model wrote. Accepted: `2026-11-26T10:00`, `…T10:00:00`,
    /// a space instead of `T`, fractional seconds, an offset (`Z`, `+08:00`, `+0800`, `+08`)
    /// and a bare date (its start or end, see [`DayEdge`]). Without an offset the time is
    /// local to this zone.
    pub fn parse(&self, input: &str, edge: DayEdge) -> Result<DateTime<Utc>, String> {
        let s = input.trim();
        let bad = || {
            format!(
                "`{input}` is not a date-time like 2026-11-26T10:00 (local time) or \
                 2026-11-26T10:00+08:00"
            )
        };
        if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            let day = match edge {
                DayEdge::Start => date,
                DayEdge::End => date.succ_opt().ok_or_else(bad)?,
            };
            return Ok(self.to_utc(day.and_time(NaiveTime::MIN)));
        }
        let s = s.replacen(' ', "T", 1);
        let t = s.find('T').ok_or_else(bad)?;
        let (naive_part, offset) = split_offset(&s, t).ok_or_else(bad)?;
        let naive = parse_naive(naive_part).ok_or_else(bad)?;
        match offset {
            Some(off) => off
                .from_local_datetime(&naive)
                .single()
                .map(|d| d.with_timezone(&Utc))
                .ok_or_else(bad),
            None => Ok(self.to_utc(naive)),
        }
    }
}

/// Splits `2026-11-26T10:00+08:00` into the wall time and its offset (if any). `t` is the
/// index of the `T`; a sign before it belongs to the date.
fn split_offset(s: &str, t: usize) -> Option<(&str, Option<FixedOffset>)> {
    let time = s.get(t..)?;
    if let Some(naive) = s.strip_suffix(['Z', 'z']) {
        return Some((naive, FixedOffset::east_opt(0)));
    }
    let Some(rel) = time.find(['+', '-']) else {
        return Some((s, None));
    };
    let at = t + rel;
    let (naive, off) = s.split_at(at);
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let digits: String = off[1..].chars().filter(|c| *c != ':').collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (h, m) = match digits.len() {
        2 => (digits.parse::<i32>().ok()?, 0),
        4 => (
            digits[..2].parse::<i32>().ok()?,
            digits[2..].parse::<i32>().ok()?,
        ),
        _ => return None,
    };
    if h > 23 || m > 59 {
        return None;
    }
    Some((
        naive,
        Some(FixedOffset::east_opt(sign * (h * 3600 + m * 60))?),
    ))
}

fn parse_naive(s: &str) -> Option<NaiveDateTime> {
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
}

/// `"09:00"` or `"9:30"` (or with seconds).
pub fn parse_clock(input: &str) -> Result<NaiveTime, String> {
    let s = input.trim();
    NaiveTime::parse_from_str(s, "%H:%M")
        .or_else(|_| NaiveTime::parse_from_str(s, "%H:%M:%S"))
        .map_err(|_| format!("`{input}` is not a time of day like 09:00"))
}

/// `"2026-11-26"`; a date-time is accepted too and its date taken.
pub fn parse_date(input: &str) -> Result<NaiveDate, String> {
    let s = input.trim();
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(s.get(..10).unwrap_or(s), "%Y-%m-%d"))
        .map_err(|_| format!("`{input}` is not a date like 2026-11-26"))
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

    #[test]
    fn local_times_without_offset_are_in_the_device_zone() {
        let z = china();
        let want = utc("2026-11-26T02:00:00Z");
        for s in [
            "2026-11-26T10:00",
            "2026-11-26T10:00:00",
            "2026-11-26 10:00",
            " 2026-11-26T10:00:00.000 ",
        ] {
            assert_eq!(z.parse(s, DayEdge::Start).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn explicit_offsets_win_over_the_device_zone() {
        let z = china();
        let want = utc("2026-11-26T02:00:00Z");
        for s in [
            "2026-11-26T02:00Z",
            "2026-11-26T02:00:00z",
            "2026-11-26T10:00+08:00",
            "2026-11-26T10:00:00+0800",
            "2026-11-26T10:00+08",
            "2026-11-25T21:00-05:00",
            "2026-11-25T20:30:00-05:30",
        ] {
            assert_eq!(z.parse(s, DayEdge::Start).unwrap(), want, "{s}");
        }
    }

    #[test]
    fn bare_dates_are_day_edges_and_garbage_is_refused() {
        let z = china();
        assert_eq!(
            z.parse("2026-11-26", DayEdge::Start).unwrap(),
            utc("2026-11-25T16:00:00Z")
        );
        assert_eq!(
            z.parse("2026-11-26", DayEdge::End).unwrap(),
            utc("2026-11-26T16:00:00Z")
        );
        for s in [
            "",
            "tomorrow 10am",
            "2026-13-01T10:00",
            "2026-11-26T25:00",
            "2026-11-26T10:00+8:00:00",
            "2026-11-26T10:00+ab",
            "10:00",
        ] {
            let e = z.parse(s, DayEdge::Start).unwrap_err();
            assert!(e.contains("2026-11-26T10:00"), "{s}: {e}");
        }
    }

    #[test]
    fn formats_in_the_device_zone_and_other_offsets() {
        let t = utc("2026-11-26T02:00:00Z");
        assert_eq!(china().format(t), "2026-11-26T10:00:00+08:00");
        assert_eq!(
            Zone::from_minutes(-330).unwrap().format(t),
            "2026-11-25T20:30:00-05:30"
        );
        assert_eq!(
            Zone::from_minutes(0).unwrap().format(t),
            "2026-11-26T02:00:00+00:00"
        );
        assert!(Zone::from_minutes(24 * 60).is_none());
        let local = NaiveDate::from_ymd_opt(2026, 11, 26)
            .unwrap()
            .and_hms_opt(10, 0, 0)
            .unwrap();
        assert_eq!(china().to_utc(local), t);
    }

    #[test]
    fn clock_and_date_helpers() {
        assert_eq!(
            parse_clock("09:00").unwrap(),
            NaiveTime::from_hms_opt(9, 0, 0).unwrap()
        );
        assert_eq!(
            parse_clock("9:30").unwrap(),
            NaiveTime::from_hms_opt(9, 30, 0).unwrap()
        );
        assert!(parse_clock("9am").is_err());
        assert_eq!(
            parse_date("2026-11-26").unwrap(),
            NaiveDate::from_ymd_opt(2026, 11, 26).unwrap()
        );
        assert_eq!(
            parse_date("2026-11-26T10:00").unwrap(),
            NaiveDate::from_ymd_opt(2026, 11, 26).unwrap()
        );
        assert!(parse_date("26/11/2026").is_err());
    }
}
