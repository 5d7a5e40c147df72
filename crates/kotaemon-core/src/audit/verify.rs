//! Reading the log back: chain verification (`kotaemon audit verify`) and recent records.

use super::writer::{parse_file_name, GENESIS};
use super::AuditRecord;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One writer's series, verified.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesReport {
    pub series: String,
    pub files: usize,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// False when the series' first files were rotated away (its start cannot be checked).
    pub from_start: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}", .path.display())]
    Broken {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: no audit files (audit-*.jsonl)", .0.display())]
    Empty(PathBuf),
}

/// Files of each series, in order.
fn series_files(dir: &Path) -> Result<BTreeMap<String, Vec<(u32, PathBuf)>>, VerifyError> {
    let io = |source| VerifyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut by_series: BTreeMap<String, Vec<(u32, PathBuf)>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some((series, n)) = parse_file_name(&name) {
            by_series
                .entry(series.to_string())
                .or_default()
                .push((n, entry.path()));
        }
    }
    for files in by_series.values_mut() {
        files.sort();
    }
    Ok(by_series)
}

/// Checks every series in `dir`: records parse, belong to their series, are numbered without
/// gaps, and each names the hash of the line before it.
pub fn verify_dir(dir: &Path) -> Result<Vec<SeriesReport>, VerifyError> {
    let by_series = series_files(dir)?;
    if by_series.is_empty() {
        return Err(VerifyError::Empty(dir.to_path_buf()));
    }
    by_series
        .iter()
        .map(|(series, files)| verify_series(series, files))
        .collect()
}

fn verify_series(series: &str, files: &[(u32, PathBuf)]) -> Result<SeriesReport, VerifyError> {
    let from_start = files.first().is_some_and(|(n, _)| *n == 1);
    let mut expected_no = files.first().map(|(n, _)| *n).unwrap_or(1);
    let mut prev: Option<String> = from_start.then(|| GENESIS.to_string());
    let mut next_seq: Option<u64> = from_start.then_some(1);
    let mut report = SeriesReport {
        series: series.to_string(),
        files: files.len(),
        records: 0,
        first_seq: 0,
        last_seq: 0,
        from_start,
    };
    for (n, path) in files {
        let broken = |line: usize, reason: String| VerifyError::Broken {
            path: path.clone(),
            line,
            reason,
        };
        if *n != expected_no {
            return Err(broken(
                0,
                format!("file {expected_no} of the series is missing"),
            ));
        }
        expected_no += 1;
        let text = std::fs::read_to_string(path).map_err(|source| VerifyError::Io {
            path: path.clone(),
            source,
        })?;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(broken(
                text.lines().count(),
                "the last line is incomplete (torn write)".into(),
            ));
        }
        for (i, line) in text.lines().enumerate() {
            let record: AuditRecord = serde_json::from_str(line)
                .map_err(|e| broken(i + 1, format!("not an audit record: {e}")))?;
            if record.series != series {
                return Err(broken(
                    i + 1,
                    format!("belongs to series {}", record.series),
                ));
            }
            if let Some(want) = next_seq {
                if record.seq != want {
                    return Err(broken(
                        i + 1,
                        format!("sequence {} where {want} was expected", record.seq),
                    ));
                }
            }
            if let Some(want) = &prev {
                if &record.prev != want {
                    return Err(broken(
                        i + 1,
                        "hash chain broken: the line before was changed or removed".into(),
                    ));
                }
            }
            if report.records == 0 {
                report.first_seq = record.seq;
            }
            report.records += 1;
            report.last_seq = record.seq;
            next_seq = Some(record.seq + 1);
            prev = Some(hex::encode(Sha256::digest(line.as_bytes())));
        }
    }
    Ok(report)
}

/// The newest `limit` records of `series` (oldest first), only `turn`'s when given.
pub(super) fn recent(
    dir: &Path,
    series: &str,
    turn: Option<&str>,
    limit: usize,
) -> std::io::Result<Vec<Value>> {
    let files = series_files(dir).map_err(|e| std::io::Error::other(e.to_string()))?;
    let Some(files) = files.get(series) else {
        return Ok(Vec::new());
    };
    let mut newest_first = Vec::new();
    for (_, path) in files.iter().rev() {
        let text = std::fs::read_to_string(path)?;
        for line in text.lines().rev() {
            let Ok(value) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if turn.is_some_and(|t| value.get("turn").and_then(Value::as_str) != Some(t)) {
                continue;
            }
            newest_first.push(value);
            if newest_first.len() >= limit {
                newest_first.reverse();
                return Ok(newest_first);
            }
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

#[cfg(test)]
mod tests {
    use super::super::{AuditConfig, AuditEntry, AuditLog};
    use super::*;

    fn entry(i: u64) -> AuditEntry {
        AuditEntry::ToolCall {
            turn: format!("t{i}"),
            tool: "contacts_lookup".into(),
            arguments: serde_json::json!({"name": "<PERSON_1>", "pad": "x".repeat(300)}),
            outcome: "ok".into(),
            elapsed_ms: i,
        }
    }

    async fn write(dir: &Path, n: u64, max_file_bytes: u64, keep_files: usize) -> AuditLog {
        let log = AuditLog::open(&AuditConfig {
            enabled: true,
            dir: Some(dir.to_path_buf()),
            max_file_bytes,
            keep_files,
        })
        .unwrap();
        for i in 0..n {
            log.record(entry(i)).await;
        }
        log
    }

    #[tokio::test]
    async fn chain_verifies_across_rotation_and_breaks_on_edit() {
        let dir = tempfile::tempdir().unwrap();
        let log = write(dir.path(), 40, 4096, 100).await;
        let reports = verify_dir(dir.path()).unwrap();
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!((r.records, r.first_seq, r.last_seq), (40, 1, 40));
        assert!(r.files > 2, "{r:?}");
        assert!(r.from_start);

        let recent = log.recent(Some("t38"), 10).unwrap();
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0]["seq"], 39);
        let last = log.recent(None, 3).unwrap();
        let seqs: Vec<u64> = last.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![38, 39, 40]);

        // Change one argument in the middle of the first file: the next line's link breaks.
        let first = dir
            .path()
            .join(super::super::writer::file_name(log.series().unwrap(), 1));
        let text = std::fs::read_to_string(&first).unwrap();
        std::fs::write(&first, text.replacen("<PERSON_1>", "<PERSON_2>", 2)).unwrap();
        match verify_dir(dir.path()) {
            Err(VerifyError::Broken { line, reason, .. }) => {
                assert_eq!(line, 2);
                assert!(reason.contains("hash chain"), "{reason}");
            }
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn removed_line_and_rotated_start_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        // Small files and few kept: the series' first files are pruned, the rest still verify.
        write(dir.path(), 60, 4096, 3).await;
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 3);
        let r = &verify_dir(dir.path()).unwrap()[0];
        assert!(!r.from_start);
        assert_eq!(r.last_seq, 60);
        assert!(r.first_seq > 1);

        let dir = tempfile::tempdir().unwrap();
        let log = write(dir.path(), 5, 1 << 20, 10).await;
        let path = dir
            .path()
            .join(super::super::writer::file_name(log.series().unwrap(), 1));
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, l)| l)
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        let err = verify_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(":3: sequence 4 where 3 was expected"), "{err}");
    }

    #[tokio::test]
    async fn two_writers_in_one_directory_keep_separate_chains() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), 3, 1 << 20, 10).await;
        let b = write(dir.path(), 4, 1 << 20, 10).await;
        a.record(entry(99)).await;
        let reports = verify_dir(dir.path()).unwrap();
        let mut counts: Vec<u64> = reports.iter().map(|r| r.records).collect();
        counts.sort();
        assert_eq!(counts, vec![4, 4]);
        assert_ne!(a.series(), b.series());
    }
}
