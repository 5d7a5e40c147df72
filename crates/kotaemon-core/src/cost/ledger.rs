//! The usage ledger: every model call (tokens, cost) and every finished turn (who answered,
//! what it saved) in SQLite, for `kotaemon usage`, budgets that survive restarts, and the
//! cost replay bench. Writes go through one thread in batched transactions; recording never
//! blocks a turn.

use super::pricing::UsageConfig;
use chrono::{DateTime, Local};
use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

/// One model call as the ledger keeps it.
#[derive(Debug, Clone)]
pub struct CallRow {
    pub turn: String,
    pub client: String,
    pub upstream: String,
    pub model: String,
    pub local: bool,
    pub prompt: u64,
    pub completion: u64,
    /// The upstream reported no usage; the tokens are estimated.
    pub estimated: bool,
    pub cost_usd: f64,
}

/// One finished turn.
#[derive(Debug, Clone)]
pub struct TurnRow {
    pub turn: String,
    pub origin: &'static str,
    pub client: String,
    /// rules, cache, local, cloud, act… or "none" when it failed before an answer.
    pub answered_by: &'static str,
    pub degraded: bool,
    /// What the reference cloud model would have cost, for turns answered on the device.
    pub saved_usd: f64,
}

/// Hours a self-hosted GPU upstream ran (written by the GPU controller).
#[derive(Debug, Clone)]
pub struct GpuRow {
    pub upstream: String,
    pub seconds: f64,
    pub cost_usd: f64,
}

enum Job {
    Call(CallRow, DateTime<Local>),
    Turn(TurnRow, DateTime<Local>),
    Gpu(GpuRow, DateTime<Local>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

#[derive(Debug, thiserror::Error)]
#[error("usage ledger `{}`: {message}", .path.display())]
pub struct LedgerError {
    pub path: PathBuf,
    pub message: String,
}

/// Cheap to clone; a disabled ledger records nothing.
#[derive(Clone, Default)]
pub struct Ledger {
    tx: Option<mpsc::Sender<Job>>,
    pricing: Arc<UsageConfig>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL, day TEXT NOT NULL, month TEXT NOT NULL,
    turn TEXT NOT NULL, client TEXT NOT NULL, upstream TEXT NOT NULL, model TEXT NOT NULL,
    local INTEGER NOT NULL, prompt INTEGER NOT NULL, completion INTEGER NOT NULL,
    estimated INTEGER NOT NULL, cost_usd REAL NOT NULL);
CREATE INDEX IF NOT EXISTS calls_day ON calls(day);
CREATE INDEX IF NOT EXISTS calls_month ON calls(month);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL, day TEXT NOT NULL, month TEXT NOT NULL,
    turn TEXT NOT NULL, origin TEXT NOT NULL, client TEXT NOT NULL,
    answered_by TEXT NOT NULL, degraded INTEGER NOT NULL, saved_usd REAL NOT NULL);
CREATE INDEX IF NOT EXISTS turns_day ON turns(day);
CREATE INDEX IF NOT EXISTS turns_month ON turns(month);
CREATE TABLE IF NOT EXISTS gpu (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL, day TEXT NOT NULL, month TEXT NOT NULL,
    upstream TEXT NOT NULL, seconds REAL NOT NULL, cost_usd REAL NOT NULL);
";

fn day_and_month(at: DateTime<Local>) -> (String, String) {
    (
        at.format("%Y-%m-%d").to_string(),
        at.format("%Y-%m").to_string(),
    )
}

impl Ledger {
    pub fn disabled() -> Self {
        Ledger::default()
    }

    pub fn open(config: &UsageConfig) -> Result<Ledger, LedgerError> {
        let pricing = Arc::new(config.clone());
        if !config.enabled {
            return Ok(Ledger { tx: None, pricing });
        }
        let path = config.db_path();
        let fail = |message: String| LedgerError {
            path: path.clone(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        }
        let conn = Connection::open(&path).map_err(|e| fail(e.to_string()))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| fail(format!("not a usable usage database: {e}")))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("kotaemon-ledger".into())
            .spawn(move || write_loop(conn, rx))
            .map_err(|e| fail(e.to_string()))?;
        Ok(Ledger {
            tx: Some(tx),
            pricing,
        })
    }

    pub fn pricing(&self) -> &UsageConfig {
        &self.pricing
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // Err only when the writer thread is gone (it logged why).
            let _ = tx.send(job);
        }
    }

    pub fn record_call(&self, row: CallRow) {
        self.send(Job::Call(row, Local::now()));
    }

    pub fn record_turn(&self, row: TurnRow) {
        self.send(Job::Turn(row, Local::now()));
    }

    pub fn record_gpu(&self, row: GpuRow) {
        self.send(Job::Gpu(row, Local::now()));
    }

    /// Waits until everything recorded so far is committed.
    pub async fn flush(&self) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        self.send(Job::Flush(done));
        let _ = flushed.await;
    }
}

fn write_loop(mut conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile goes into the same transaction.
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut acks = Vec::new();
        if let Err(e) = write_batch(&mut conn, batch, &mut acks) {
            tracing::error!("usage ledger write failed: {e}");
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

fn write_batch(
    conn: &mut Connection,
    batch: Vec<Job>,
    acks: &mut Vec<tokio::sync::oneshot::Sender<()>>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for job in batch {
        match job {
            Job::Call(c, at) => {
                let (day, month) = day_and_month(at);
                tx.execute(
                    "INSERT INTO calls (ts_ms, day, month, turn, client, upstream, model, local, prompt, completion, estimated, cost_usd)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                    params![at.timestamp_millis(), day, month, c.turn, c.client, c.upstream, c.model,
                            c.local, c.prompt as i64, c.completion as i64, c.estimated, c.cost_usd],
                )?;
            }
            Job::Turn(t, at) => {
                let (day, month) = day_and_month(at);
                tx.execute(
                    "INSERT INTO turns (ts_ms, day, month, turn, origin, client, answered_by, degraded, saved_usd)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![at.timestamp_millis(), day, month, t.turn, t.origin, t.client,
                            t.answered_by, t.degraded, t.saved_usd],
                )?;
            }
            Job::Gpu(g, at) => {
                let (day, month) = day_and_month(at);
                tx.execute(
                    "INSERT INTO gpu (ts_ms, day, month, upstream, seconds, cost_usd) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![at.timestamp_millis(), day, month, g.upstream, g.seconds, g.cost_usd],
                )?;
            }
            Job::Flush(ack) => acks.push(ack),
        }
    }
    tx.commit()
}

/// Cloud spending so far of the current day and month, per client ("" = all clients
/// together is not stored; callers sum).
pub fn spending_now(path: &Path) -> rusqlite::Result<Vec<(String, f64, f64)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let (day, month) = day_and_month(Local::now());
    let mut stmt = conn.prepare(
        "SELECT client,
                COALESCE(SUM(CASE WHEN day = ?1 THEN cost_usd END), 0),
                COALESCE(SUM(cost_usd), 0)
         FROM calls WHERE month = ?2 GROUP BY client",
    )?;
    let rows = stmt.query_map(params![day, month], |r| {
        Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}

/// One period of `kotaemon usage`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub period: String,
    pub turns: u64,
    /// Turns answered on the device (rules, cache, local model), and their share.
    pub answered_locally: u64,
    pub local_share: f64,
    pub cloud_calls: u64,
    pub cloud_prompt_tokens: u64,
    pub cloud_completion_tokens: u64,
    pub local_prompt_tokens: u64,
    pub local_completion_tokens: u64,
    pub estimated_calls: u64,
    pub cost_usd: f64,
    pub saved_usd: f64,
    pub gpu_hours: f64,
    pub gpu_cost_usd: f64,
    /// Tokens the hourly-billed GPU upstreams served, and what a million of them cost once
    /// the hours are spread over them (idle hours included): a self-hosted model is not free.
    pub gpu_tokens: u64,
    pub gpu_usd_per_million_tokens: Option<f64>,
    pub by_model: Vec<Breakdown>,
    pub by_answer: Vec<Breakdown>,
    pub by_client: Vec<Breakdown>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Breakdown {
    pub key: String,
    pub turns: u64,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

/// `column` is "day" or "month", `value` e.g. "2026-11-25" or "2026-11".
pub fn report(path: &Path, column: &str, value: &str) -> rusqlite::Result<Report> {
    let column = if column == "day" { "day" } else { "month" };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut r = Report {
        period: value.to_string(),
        ..Report::default()
    };
    conn.query_row(
        &format!(
            "SELECT COUNT(*), COALESCE(SUM(answered_by IN ('rules', 'cache', 'local')), 0),
                    COALESCE(SUM(saved_usd), 0) FROM turns WHERE {column} = ?1"
        ),
        [value],
        |row| {
            r.turns = row.get::<_, i64>(0)? as u64;
            r.answered_locally = row.get::<_, i64>(1)? as u64;
            r.saved_usd = row.get(2)?;
            Ok(())
        },
    )?;
    conn.query_row(
        &format!(
            "SELECT COALESCE(SUM(NOT local), 0),
                    COALESCE(SUM(CASE WHEN NOT local THEN prompt END), 0),
                    COALESCE(SUM(CASE WHEN NOT local THEN completion END), 0),
                    COALESCE(SUM(CASE WHEN local THEN prompt END), 0),
                    COALESCE(SUM(CASE WHEN local THEN completion END), 0),
                    COALESCE(SUM(estimated), 0), COALESCE(SUM(cost_usd), 0)
             FROM calls WHERE {column} = ?1"
        ),
        [value],
        |row| {
            r.cloud_calls = row.get::<_, i64>(0)? as u64;
            r.cloud_prompt_tokens = row.get::<_, i64>(1)? as u64;
            r.cloud_completion_tokens = row.get::<_, i64>(2)? as u64;
            r.local_prompt_tokens = row.get::<_, i64>(3)? as u64;
            r.local_completion_tokens = row.get::<_, i64>(4)? as u64;
            r.estimated_calls = row.get::<_, i64>(5)? as u64;
            r.cost_usd = row.get(6)?;
            Ok(())
        },
    )?;
    conn.query_row(
        &format!(
            "SELECT COALESCE(SUM(seconds), 0) / 3600.0, COALESCE(SUM(cost_usd), 0) FROM gpu WHERE {column} = ?1"
        ),
        [value],
        |row| {
            r.gpu_hours = row.get(0)?;
            r.gpu_cost_usd = row.get(1)?;
            Ok(())
        },
    )?;
    conn.query_row(
        &format!(
            "SELECT COALESCE(SUM(prompt + completion), 0) FROM calls
             WHERE {column} = ?1 AND upstream IN (SELECT upstream FROM gpu WHERE {column} = ?1)"
        ),
        [value],
        |row| {
            r.gpu_tokens = row.get::<_, i64>(0)? as u64;
            Ok(())
        },
    )?;
    r.gpu_usd_per_million_tokens =
        (r.gpu_tokens > 0).then(|| r.gpu_cost_usd / (r.gpu_tokens as f64 / 1e6));
    r.local_share = if r.turns > 0 {
        r.answered_locally as f64 / r.turns as f64
    } else {
        0.0
    };
    let breakdown = |sql: String| -> rusqlite::Result<Vec<Breakdown>> {
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([value], |row| {
            Ok(Breakdown {
                key: row.get(0)?,
                turns: row.get::<_, i64>(1)? as u64,
                calls: row.get::<_, i64>(2)? as u64,
                prompt_tokens: row.get::<_, i64>(3)? as u64,
                completion_tokens: row.get::<_, i64>(4)? as u64,
                cost_usd: row.get(5)?,
            })
        })?;
        rows.collect()
    };
    r.by_model = breakdown(format!(
        "SELECT CASE WHEN local THEN 'local:' || model ELSE upstream || ':' || model END,
                COUNT(DISTINCT turn), COUNT(*), SUM(prompt), SUM(completion), SUM(cost_usd)
         FROM calls WHERE {column} = ?1 GROUP BY 1 ORDER BY 6 DESC, 1"
    ))?;
    r.by_answer = breakdown(format!(
        "SELECT answered_by, COUNT(*), 0, 0, 0, SUM(saved_usd)
         FROM turns WHERE {column} = ?1 GROUP BY 1 ORDER BY 2 DESC, 1"
    ))?;
    r.by_client = breakdown(format!(
        "SELECT CASE WHEN client = '' THEN '(no key)' ELSE client END, COUNT(DISTINCT turn), COUNT(*),
                SUM(prompt), SUM(completion), SUM(cost_usd)
         FROM calls WHERE {column} = ?1 GROUP BY 1 ORDER BY 6 DESC, 1"
    ))?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::pricing::TokenPrice;

    #[tokio::test]
    async fn calls_and_turns_add_up_in_the_report_and_spending() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = UsageConfig {
            path: Some(dir.path().join("usage.db")),
            ..UsageConfig::default()
        };
        config.prices.insert(
            "*".into(),
            TokenPrice {
                input: 1.0,
                output: 2.0,
            },
        );
        let ledger = Ledger::open(&config).unwrap();
        for (i, client) in ["panel", "panel", "speaker"].iter().enumerate() {
            ledger.record_call(CallRow {
                turn: format!("t{i}"),
                client: client.to_string(),
                upstream: "cloud".into(),
                model: "m".into(),
                local: false,
                prompt: 1000,
                completion: 500,
                estimated: i == 2,
                cost_usd: config.call_cost("cloud", "m", 1000, 500),
            });
            ledger.record_turn(TurnRow {
                turn: format!("t{i}"),
                origin: "api",
                client: client.to_string(),
                answered_by: "cloud",
                degraded: false,
                saved_usd: 0.0,
            });
        }
        // A rented GPU: 2 h at 0.53 for 10k tokens is 106 USD per million, not 0.
        ledger.record_gpu(GpuRow {
            upstream: "t4".into(),
            seconds: 7200.0,
            cost_usd: 1.06,
        });
        ledger.record_call(CallRow {
            turn: "t8".into(),
            client: "speaker".into(),
            upstream: "t4".into(),
            model: "m".into(),
            local: false,
            prompt: 6000,
            completion: 4000,
            estimated: false,
            cost_usd: 0.0,
        });
        ledger.record_turn(TurnRow {
            turn: "t9".into(),
            origin: "api",
            client: "panel".into(),
            answered_by: "rules",
            degraded: false,
            saved_usd: 0.001,
        });
        ledger.flush().await;
        let today = Local::now().format("%Y-%m-%d").to_string();
        let r = report(&config.db_path(), "day", &today).unwrap();
        assert_eq!((r.turns, r.answered_locally, r.cloud_calls), (4, 1, 4));
        assert_eq!(
            (r.cloud_prompt_tokens, r.cloud_completion_tokens),
            (9000, 5500)
        );
        assert!((r.gpu_hours - 2.0).abs() < 1e-9);
        assert_eq!(r.gpu_tokens, 10_000);
        let per_million = r.gpu_usd_per_million_tokens.unwrap();
        assert!((per_million - 106.0).abs() < 1e-9, "{per_million}");
        assert_eq!(r.estimated_calls, 1);
        assert!((r.cost_usd - 3.0 * 0.002).abs() < 1e-12, "{}", r.cost_usd);
        assert!((r.local_share - 0.25).abs() < 1e-12);
        assert_eq!(r.by_client[0].key, "panel");
        assert_eq!(r.by_client[0].calls, 2);
        let spend = spending_now(&config.db_path()).unwrap();
        let panel = spend.iter().find(|(c, ..)| c == "panel").unwrap();
        assert!((panel.1 - 0.004).abs() < 1e-12 && (panel.2 - 0.004).abs() < 1e-12);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
        let err = Ledger::open(&UsageConfig {
            path: Some(path),
            ..UsageConfig::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("usage.db"), "{err}");
    }
}
