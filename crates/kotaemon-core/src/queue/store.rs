//! The jobs table: SQLite in WAL mode with `synchronous = FULL`, so a submit acknowledged to
//! the client is on disk, and a power cut or `kill -9` loses nothing acknowledged.
//!
//! States: queued → running → completed | failed; running → queued again (retry, or after a
//! crash: whatever was running when the agent died is queued again at the next start).

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Job {
    pub id: String,
    pub object: &'static str,
    pub status: String,
    pub idempotency_key: Option<String>,
    pub created_at: i64,
    pub attempts: u32,
    /// The completion (OpenAI `chat.completion` body) once completed.
    pub result: Option<Value>,
    pub error: Option<String>,
    pub finished_at: Option<i64>,
}

pub(super) struct Claimed {
    pub id: String,
    pub client: Option<String>,
    pub request: String,
    pub attempts: u32,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idem_key TEXT UNIQUE,
    client TEXT,
    created_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at_ms INTEGER NOT NULL,
    request TEXT NOT NULL,
    result TEXT,
    error TEXT,
    finished_ms INTEGER);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(status, next_at_ms);
";

pub(super) fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(SCHEMA)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Whatever was running when the agent stopped (crash, kill -9, power cut) runs again.
    conn.execute(
        "UPDATE jobs SET status = 'queued' WHERE status = 'running'",
        [],
    )?;
    Ok(conn)
}

fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let result: Option<String> = r.get(6)?;
    Ok(Job {
        id: r.get(0)?,
        object: "job",
        status: r.get(1)?,
        idempotency_key: r.get(2)?,
        created_at: r.get::<_, i64>(3)? / 1000,
        attempts: r.get(4)?,
        error: r.get(5)?,
        result: result.and_then(|t| serde_json::from_str(&t).ok()),
        finished_at: r.get::<_, Option<i64>>(7)?.map(|ms| ms / 1000),
    })
}

const COLUMNS: &str = "id, status, idem_key, created_ms, attempts, error, result, finished_ms";

pub(super) fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"),
        [id],
        row_to_job,
    )
    .optional()
}

pub(super) fn list(
    conn: &Connection,
    status: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<Job>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE ?1 IS NULL OR status = ?1 ORDER BY created_ms DESC, id LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![status, limit as i64], row_to_job)?;
    rows.collect()
}

/// Inserts a job, or returns the one already submitted with the same idempotency key
/// (`false`: nothing new was created).
pub(super) fn submit(
    conn: &mut Connection,
    id: &str,
    key: Option<&str>,
    client: Option<&str>,
    request: &str,
    now_ms: i64,
) -> rusqlite::Result<(Job, bool)> {
    let tx = conn.transaction()?;
    if let Some(key) = key {
        let existing: Option<String> = tx
            .query_row("SELECT id FROM jobs WHERE idem_key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(existing) = existing {
            let job = get(&tx, &existing)?;
            tx.commit()?;
            return job
                .map(|j| (j, false))
                .ok_or(rusqlite::Error::QueryReturnedNoRows);
        }
    }
    tx.execute(
        "INSERT INTO jobs (id, idem_key, client, created_ms, status, next_at_ms, request)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?4, ?5)",
        params![id, key, client, now_ms, request],
    )?;
    let job = get(&tx, id)?;
    tx.commit()?;
    job.map(|j| (j, true))
        .ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// Takes the oldest due job and marks it running (one transaction: two workers never take
/// the same job).
pub(super) fn claim(conn: &mut Connection, now_ms: i64) -> rusqlite::Result<Option<Claimed>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let next = tx
        .query_row(
            "SELECT id, client, request, attempts FROM jobs
             WHERE status = 'queued' AND next_at_ms <= ?1 ORDER BY next_at_ms, created_ms LIMIT 1",
            [now_ms],
            |r| {
                Ok(Claimed {
                    id: r.get(0)?,
                    client: r.get(1)?,
                    request: r.get(2)?,
                    attempts: r.get::<_, u32>(3)? + 1,
                })
            },
        )
        .optional()?;
    if let Some(job) = &next {
        tx.execute(
            "UPDATE jobs SET status = 'running', attempts = ?2 WHERE id = ?1",
            params![job.id, job.attempts],
        )?;
    }
    tx.commit()?;
    Ok(next)
}

/// Stores the result: only a running job completes, so a result is written once.
pub(super) fn complete(
    conn: &Connection,
    id: &str,
    result: &Value,
    now_ms: i64,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE jobs SET status = 'completed', result = ?2, error = NULL, finished_ms = ?3
         WHERE id = ?1 AND status = 'running'",
        params![id, result.to_string(), now_ms],
    )?;
    Ok(n == 1)
}

pub(super) fn retry_at(
    conn: &Connection,
    id: &str,
    error: &str,
    at_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE jobs SET status = 'queued', error = ?2, next_at_ms = ?3 WHERE id = ?1 AND status = 'running'",
        params![id, error, at_ms],
    )?;
    Ok(())
}

/// Back to the queue at its place, the attempt not counted (the cloud was away).
pub(super) fn requeue_uncounted(conn: &Connection, id: &str, error: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE jobs SET status = 'queued', error = ?2, attempts = attempts - 1 WHERE id = ?1 AND status = 'running'",
        params![id, error],
    )?;
    Ok(())
}

pub(super) fn fail(conn: &Connection, id: &str, error: &str, now_ms: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE jobs SET status = 'failed', error = ?2, finished_ms = ?3 WHERE id = ?1 AND status = 'running'",
        params![id, error, now_ms],
    )?;
    Ok(())
}

pub(super) fn counts(conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_result_per_job_and_running_jobs_come_back_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let mut conn = open(&path).unwrap();
        let (a, created) = submit(&mut conn, "job-a", Some("k1"), None, "{}", 1000).unwrap();
        assert!(created);
        let (again, created) = submit(&mut conn, "job-b", Some("k1"), None, "{}", 2000).unwrap();
        assert!(!created, "same idempotency key, same job");
        assert_eq!(again.id, a.id);
        submit(&mut conn, "job-c", None, None, "{}", 1500).unwrap();

        let first = claim(&mut conn, 5000).unwrap().unwrap();
        assert_eq!((first.id.as_str(), first.attempts), ("job-a", 1));
        // The agent dies here; at the next start job-a is queued again.
        drop(conn);
        let mut conn = open(&path).unwrap();
        assert_eq!(get(&conn, "job-a").unwrap().unwrap().status, "queued");
        let again = claim(&mut conn, 5000).unwrap().unwrap();
        assert_eq!((again.id.as_str(), again.attempts), ("job-a", 2));
        assert!(complete(&conn, "job-a", &serde_json::json!({"ok": 1}), 6000).unwrap());
        assert!(
            !complete(&conn, "job-a", &serde_json::json!({"ok": 2}), 7000).unwrap(),
            "a completed job is not completed twice"
        );
        assert_eq!(
            get(&conn, "job-a").unwrap().unwrap().result,
            Some(serde_json::json!({"ok": 1}))
        );
        let c = claim(&mut conn, 5000).unwrap().unwrap();
        retry_at(&conn, &c.id, "cloud down", 9000).unwrap();
        assert!(claim(&mut conn, 8999).unwrap().is_none(), "not due yet");
        assert_eq!(claim(&mut conn, 9000).unwrap().unwrap().attempts, 2);
    }
}
