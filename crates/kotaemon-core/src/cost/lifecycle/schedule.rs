//! When a GPU may run: windows of weekdays and local times in an IANA time zone. Pure
//! functions of a UTC instant, so the controller can ask them on whatever clock it runs (the
//! wall clock in production, one driven by tokio's paused clock in tests).

use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike};
use chrono::{Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// `schedule = { timezone = "Asia/Shanghai", windows = [...], warm = true }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// IANA time zone the windows are written in, e.g. "Europe/Berlin" or "UTC".
    pub timezone: String,
    /// When the GPU may run. Outside every window it is never started, and stopped if running.
    pub windows: Vec<WindowConfig>,
    /// Start the GPU when a window opens instead of at the first call inside it.
    #[serde(default)]
    pub warm: bool,
}

/// `{ days = "mon-fri", from = "08:00", to = "20:00" }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// "mon-fri", "sat,sun", "fri-mon", "weekdays", "weekends" or "daily".
    pub days: String,
    /// Local time the window opens, "HH:MM".
    pub from: String,
    /// Local time it closes, "HH:MM" ("24:00" = midnight). Earlier than `from`: the window
    /// runs past midnight into the next day (and belongs to the day it opened).
    pub to: String,
}

const DAY: u32 = 24 * 60;

/// One window in minutes of the local day; `to <= from` means it ends the next day.
#[derive(Debug, Clone)]
struct Window {
    /// Indexed by `Weekday::num_days_from_monday`.
    days: [bool; 7],
    from: u32,
    to: u32,
}

impl Window {
    fn overnight(&self) -> bool {
        self.to <= self.from
    }
}

#[derive(Debug, Clone)]
pub struct Schedule {
    tz: Tz,
    windows: Vec<Window>,
    pub warm: bool,
}

impl Schedule {
    /// Parses and checks a schedule; every problem comes back with its key path.
    pub fn new(config: &ScheduleConfig, path: &str) -> Result<Schedule, Vec<String>> {
        let mut p = Vec::new();
        let tz = match config.timezone.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                p.push(format!(
                    "{path}.timezone: `{}` is not an IANA time zone (e.g. \"Europe/Berlin\", \"UTC\")",
                    config.timezone
                ));
                None
            }
        };
        if config.windows.is_empty() {
            p.push(format!(
                "{path}.windows: at least one window is needed (without a schedule the GPU may run any time)"
            ));
        }
        let mut windows = Vec::new();
        for (i, w) in config.windows.iter().enumerate() {
            let wp = format!("{path}.windows[{i}]");
            let days = parse_days(&w.days)
                .map_err(|e| p.push(format!("{wp}.days: {e}")))
                .ok();
            let from = parse_time(&w.from, false)
                .map_err(|e| p.push(format!("{wp}.from: {e}")))
                .ok();
            let to = parse_time(&w.to, true)
                .map_err(|e| p.push(format!("{wp}.to: {e}")))
                .ok();
            if let (Some(days), Some(from), Some(to)) = (days, from, to) {
                if from == to {
                    p.push(format!(
                        "{wp}: `from` and `to` are the same time; for a whole day write from = \"00:00\", to = \"24:00\""
                    ));
                } else {
                    windows.push(Window { days, from, to });
                }
            }
        }
        match tz {
            Some(tz) if p.is_empty() => Ok(Schedule {
                tz,
                windows,
                warm: config.warm,
            }),
            _ => Err(p),
        }
    }

    /// Is `now` inside a window?
    pub fn is_open(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.tz);
        let day = local.weekday().num_days_from_monday() as usize;
        let yesterday = local.weekday().pred().num_days_from_monday() as usize;
        let minute = local.hour() * 60 + local.minute();
        self.windows.iter().any(|w| {
            if w.overnight() {
                (w.days[day] && minute >= w.from) || (w.days[yesterday] && minute < w.to)
            } else {
                w.days[day] && minute >= w.from && minute < w.to
            }
        })
    }

    /// The first window edge (open or close) strictly after `now`, if any within a week.
    /// An edge between two touching windows changes nothing; callers just look again.
    pub fn next_change(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = now.with_timezone(&self.tz).date_naive();
        // From yesterday: an overnight window that opened yesterday closes today.
        let first = today.checked_sub_days(Days::new(1))?;
        let mut best: Option<DateTime<Utc>> = None;
        for offset in 0..9u64 {
            let Some(date) = first.checked_add_days(Days::new(offset)) else {
                continue;
            };
            let day = date.weekday().num_days_from_monday() as usize;
            for w in self.windows.iter().filter(|w| w.days[day]) {
                let close_day = if w.overnight() || w.to == DAY {
                    date.checked_add_days(Days::new(1))
                } else {
                    Some(date)
                };
                let edges = [Some((date, w.from)), close_day.map(|d| (d, w.to % DAY))];
                for (d, minute) in edges.into_iter().flatten() {
                    if let Some(t) = self.instant(d, minute).filter(|t| *t > now) {
                        best = Some(best.map_or(t, |b| b.min(t)));
                    }
                }
            }
        }
        best
    }

    /// A local date and minute as a UTC instant. In a DST gap the wall time does not exist:
    /// the first instant after the gap is used; in a fold, the earlier of the two.
    fn instant(&self, date: NaiveDate, minute: u32) -> Option<DateTime<Utc>> {
        let time = NaiveTime::from_hms_opt(minute / 60, minute % 60, 0)?;
        let naive = NaiveDateTime::new(date, time);
        let local = self.tz.from_local_datetime(&naive).earliest().or_else(|| {
            let later = naive.checked_add_signed(chrono::TimeDelta::hours(1))?;
            self.tz.from_local_datetime(&later).earliest()
        })?;
        Some(local.with_timezone(&Utc))
    }
}

/// "HH:MM" as minutes of the day; "24:00" only where `allow_end_of_day`.
fn parse_time(s: &str, allow_end_of_day: bool) -> Result<u32, String> {
    let bad = || format!("`{s}` is not a time like \"08:00\"");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    match (h, m) {
        (24, 0) if allow_end_of_day => Ok(DAY),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

/// "mon-fri", "sat,sun", "fri-mon" (ranges wrap), "weekdays", "weekends", "daily".
fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    let day = |name: &str| {
        name.trim()
            .parse::<Weekday>()
            .map_err(|_| format!("`{}` is not a day (mon, tue, … sun)", name.trim()))
    };
    for part in s.split(',').map(str::trim) {
        match part.to_ascii_lowercase().as_str() {
            "daily" | "every day" | "everyday" => days = [true; 7],
            "weekdays" => days[..5].iter_mut().for_each(|d| *d = true),
            "weekends" => days[5..].iter_mut().for_each(|d| *d = true),
            "" => return Err(format!("`{s}` has an empty day")),
            other => match other.split_once('-') {
                Some((a, b)) => {
                    let (mut d, end) = (day(a)?, day(b)?);
                    loop {
                        days[d.num_days_from_monday() as usize] = true;
                        if d == end {
                            break;
                        }
                        d = d.succ();
                    }
                }
                None => days[day(other)?.num_days_from_monday() as usize] = true,
            },
        }
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(tz: &str, windows: &[(&str, &str, &str)]) -> Schedule {
        let config = ScheduleConfig {
            timezone: tz.into(),
            windows: windows
                .iter()
                .map(|(days, from, to)| WindowConfig {
                    days: (*days).into(),
                    from: (*from).into(),
                    to: (*to).into(),
                })
                .collect(),
            warm: false,
        };
        Schedule::new(&config, "gpu[0].schedule").unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn weekday_window_in_a_time_zone() {
        // 2026-03-02 is a Monday. Shanghai is UTC+8 all year.
        let s = schedule("Asia/Shanghai", &[("mon-fri", "08:00", "20:00")]);
        assert!(!s.is_open(utc("2026-03-01T23:59:00Z")), "07:59 local");
        assert!(s.is_open(utc("2026-03-02T00:00:00Z")), "08:00 local opens");
        assert!(s.is_open(utc("2026-03-02T11:59:59Z")), "19:59:59 local");
        assert!(
            !s.is_open(utc("2026-03-02T12:00:00Z")),
            "20:00 local closes"
        );
        assert!(!s.is_open(utc("2026-03-07T04:00:00Z")), "Saturday noon");
        assert_eq!(
            s.next_change(utc("2026-03-02T03:00:00Z")),
            Some(utc("2026-03-02T12:00:00Z"))
        );
        // Friday evening: the next edge is Monday morning.
        assert_eq!(
            s.next_change(utc("2026-03-06T13:00:00Z")),
            Some(utc("2026-03-09T00:00:00Z"))
        );
    }

    #[test]
    fn overnight_windows_belong_to_the_day_they_open() {
        let s = schedule("UTC", &[("fri", "22:00", "06:00")]);
        assert!(s.is_open(utc("2026-03-06T23:00:00Z")), "Friday night");
        assert!(s.is_open(utc("2026-03-07T05:59:00Z")), "Saturday early");
        assert!(!s.is_open(utc("2026-03-07T06:00:00Z")));
        assert!(!s.is_open(utc("2026-03-05T23:00:00Z")), "Thursday night");
        assert!(!s.is_open(utc("2026-03-06T05:00:00Z")), "Friday early");
        assert_eq!(
            s.next_change(utc("2026-03-07T01:00:00Z")),
            Some(utc("2026-03-07T06:00:00Z"))
        );
        let whole = schedule("UTC", &[("sat-sun", "00:00", "24:00")]);
        assert!(whole.is_open(utc("2026-03-08T23:59:59Z")));
        assert!(!whole.is_open(utc("2026-03-09T00:00:00Z")));
        assert_eq!(
            whole.next_change(utc("2026-03-08T12:00:00Z")),
            Some(utc("2026-03-09T00:00:00Z"))
        );
    }

    #[test]
    fn dst_shifts_the_utc_edges() {
        // Berlin: UTC+1 in winter, UTC+2 from 2026-03-29.
        let s = schedule("Europe/Berlin", &[("daily", "08:00", "20:00")]);
        assert!(s.is_open(utc("2026-03-27T07:00:00Z")), "08:00 CET");
        assert!(!s.is_open(utc("2026-03-30T05:30:00Z")), "07:30 CEST");
        assert!(s.is_open(utc("2026-03-30T06:00:00Z")), "08:00 CEST");
    }

    #[test]
    fn bad_schedules_name_every_problem() {
        let config = ScheduleConfig {
            timezone: "Mars/Olympus".into(),
            windows: vec![
                WindowConfig {
                    days: "mon-funday".into(),
                    from: "8am".into(),
                    to: "24:00".into(),
                },
                WindowConfig {
                    days: "daily".into(),
                    from: "24:00".into(),
                    to: "10:00".into(),
                },
                WindowConfig {
                    days: "daily".into(),
                    from: "10:00".into(),
                    to: "10:00".into(),
                },
            ],
            warm: true,
        };
        let all = Schedule::new(&config, "gpu[1].schedule")
            .unwrap_err()
            .join("\n");
        for needle in [
            "gpu[1].schedule.timezone",
            "gpu[1].schedule.windows[0].days",
            "gpu[1].schedule.windows[0].from",
            "gpu[1].schedule.windows[1].from",
            "gpu[1].schedule.windows[2]: `from` and `to` are the same",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert!(
            !all.contains("windows[0].to"),
            "24:00 is a valid end:\n{all}"
        );
    }

    #[test]
    fn day_lists_and_wrapping_ranges() {
        assert_eq!(
            parse_days("fri-mon").unwrap(),
            [true, false, false, false, true, true, true]
        );
        assert_eq!(
            parse_days("Mon, wed").unwrap(),
            [true, false, true, false, false, false, false]
        );
        assert_eq!(
            parse_days("weekends").unwrap(),
            [false, false, false, false, false, true, true]
        );
        assert_eq!(parse_days("weekdays").unwrap()[..5], [true; 5]);
        assert!(parse_days("mon,").is_err());
    }
}
