//! The cache's SQLite file (WAL; survives restarts and power loss) and its in-memory vector
//! index, rebuilt from the file at start. One connection behind a mutex: lookups are point
//! queries and writes are rare, so a pool would only add memory on a Pi.

use super::key::CacheKey;
use crate::wire::Usage;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache database {path}: {why}")]
    Open { path: PathBuf, why: String },
    #[error("cache database: {0}")]
    Sql(#[from] rusqlite::Error),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    pub prompt: String,
    pub answer: String,
    pub usage: Usage,
}

/// One namespace's vectors: ids and unit-length embeddings, row-major.
#[derive(Default)]
struct Vectors {
    ids: Vec<i64>,
    data: Vec<f32>,
}

pub struct Store {
    conn: Mutex<Connection>,
    index: RwLock<HashMap<String, Vectors>>,
    dim: usize,
    embed_model: String,
    max_entries: usize,
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Dot product with 8 independent accumulators, so the compiler vectorizes it (a plain
/// `sum()` is a serial dependency chain: ~5x slower at 100k entries).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Store {
    /// Opens (or creates) the database; `embed_model`/`dim` select which stored vectors are
    /// comparable (another model's vectors are ignored, not mixed).
    pub fn open(
        path: &Path,
        embed_model: &str,
        dim: usize,
        max_entries: usize,
    ) -> Result<Store, StoreError> {
        let fail = |why: String| StoreError::Open {
            path: path.to_path_buf(),
            why,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| fail(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(|e| fail(e.to_string()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS cache_entries (
                 id INTEGER PRIMARY KEY,
                 key TEXT NOT NULL UNIQUE,
                 namespace TEXT NOT NULL,
                 prompt TEXT NOT NULL,
                 embed_model TEXT,
                 embedding BLOB,
                 answer TEXT NOT NULL,
                 prompt_tokens INTEGER NOT NULL,
                 completion_tokens INTEGER NOT NULL,
                 created_at INTEGER NOT NULL,
                 last_hit_at INTEGER NOT NULL,
                 hits INTEGER NOT NULL DEFAULT 0
             );
             CREATE INDEX IF NOT EXISTS cache_lru ON cache_entries(last_hit_at);",
        )
        .map_err(|e| fail(format!("not a usable SQLite cache ({e})")))?;
        let store = Store {
            conn: Mutex::new(conn),
            index: RwLock::new(HashMap::new()),
            dim,
            embed_model: embed_model.into(),
            max_entries,
        };
        store.rebuild_index()?;
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild_index(&self) -> Result<(), StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, namespace, embedding FROM cache_entries WHERE embed_model = ?1 AND embedding IS NOT NULL")?;
        let rows = stmt.query_map(params![self.embed_model], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut index: HashMap<String, Vectors> = HashMap::new();
        for row in rows {
            let (id, ns, blob) = row?;
            let v = from_blob(&blob);
            if v.len() == self.dim {
                let e = index.entry(ns).or_default();
                e.ids.push(id);
                e.data.extend_from_slice(&v);
            }
        }
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = index;
        Ok(())
    }

    pub fn len(&self) -> Result<usize, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM cache_entries", [], |r| {
                r.get::<_, i64>(0)
            })? as usize)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    fn touch_and_get(&self, conn: &Connection, id: i64) -> Result<Option<Entry>, StoreError> {
        conn.execute(
            "UPDATE cache_entries SET last_hit_at = ?1, hits = hits + 1 WHERE id = ?2",
            params![now_s(), id],
        )?;
        Ok(conn
            .query_row("SELECT id, prompt, answer, prompt_tokens, completion_tokens FROM cache_entries WHERE id = ?1", params![id], |r| {
                let (p, c): (i64, i64) = (r.get(3)?, r.get(4)?);
                Ok(Entry {
                    id: r.get(0)?,
                    prompt: r.get(1)?,
                    answer: r.get(2)?,
                    usage: Usage { prompt_tokens: p as u64, completion_tokens: c as u64, total_tokens: (p + c) as u64 },
                })
            })
            .optional()?)
    }

    /// The entry stored under this exact key, if younger than `ttl_s`.
    pub fn exact(&self, key: &CacheKey, ttl_s: u64) -> Result<Option<Entry>, StoreError> {
        let conn = self.conn();
        let found: Option<i64> = conn
            .query_row(
                "SELECT id FROM cache_entries WHERE key = ?1 AND created_at >= ?2",
                params![key.exact, now_s() - ttl_s as i64],
                |r| r.get(0),
            )
            .optional()?;
        match found {
            Some(id) => self.touch_and_get(&conn, id),
            None => Ok(None),
        }
    }

    /// The most similar entry of the namespace (cosine of unit vectors), if any.
    pub fn nearest(&self, namespace: &str, query: &[f32]) -> Option<(i64, f32)> {
        let index = self.index.read().unwrap_or_else(|p| p.into_inner());
        let v = index.get(namespace)?;
        v.data
            .chunks_exact(self.dim)
            .zip(&v.ids)
            .map(|(row, id)| (*id, dot(row, query)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Reads a semantic candidate, if still younger than `ttl_s`; marks it used.
    pub fn get_fresh(&self, id: i64, ttl_s: u64) -> Result<Option<Entry>, StoreError> {
        let conn = self.conn();
        let fresh: Option<i64> = conn
            .query_row(
                "SELECT id FROM cache_entries WHERE id = ?1 AND created_at >= ?2",
                params![id, now_s() - ttl_s as i64],
                |r| r.get(0),
            )
            .optional()?;
        match fresh {
            Some(id) => self.touch_and_get(&conn, id),
            None => Ok(None),
        }
    }

    /// Stores an answer (replacing one under the same key) and evicts the least recently
    /// used entries beyond `max_entries`.
    pub fn insert(
        &self,
        key: &CacheKey,
        embedding: Option<&[f32]>,
        answer: &str,
        usage: Usage,
    ) -> Result<(), StoreError> {
        let now = now_s();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO cache_entries (key, namespace, prompt, embed_model, embedding, answer, prompt_tokens, completion_tokens, created_at, last_hit_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
             ON CONFLICT(key) DO UPDATE SET answer = excluded.answer, embedding = excluded.embedding, embed_model = excluded.embed_model,
                 prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens,
                 created_at = excluded.created_at, last_hit_at = excluded.last_hit_at",
            params![
                key.exact,
                key.namespace,
                key.prompt,
                embedding.map(|_| self.embed_model.clone()),
                embedding.map(to_blob),
                answer,
                usage.prompt_tokens as i64,
                usage.completion_tokens as i64,
                now
            ],
        )?;
        let id: i64 = tx.query_row(
            "SELECT id FROM cache_entries WHERE key = ?1",
            params![key.exact],
            |r| r.get(0),
        )?;
        let evicted = tx.execute(
            "DELETE FROM cache_entries WHERE id IN (SELECT id FROM cache_entries ORDER BY last_hit_at DESC, id DESC LIMIT -1 OFFSET ?1)",
            params![self.max_entries as i64],
        )?;
        tx.commit()?;
        drop(conn);
        if evicted > 0 {
            self.rebuild_index()?;
        } else if let Some(v) = embedding.filter(|v| v.len() == self.dim) {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            let e = index.entry(key.namespace.clone()).or_default();
            match e.ids.iter().position(|x| *x == id) {
                Some(pos) => e.data[pos * self.dim..(pos + 1) * self.dim].copy_from_slice(v),
                None => {
                    e.ids.push(id);
                    e.data.extend_from_slice(v);
                }
            }
        }
        Ok(())
    }

    /// Drops entries older than `ttl_s`.
    pub fn purge_expired(&self, ttl_s: u64) -> Result<usize, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM cache_entries WHERE created_at < ?1",
            params![now_s() - ttl_s as i64],
        )?;
        if n > 0 {
            self.rebuild_index()?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, prompt: &str) -> CacheKey {
        CacheKey {
            namespace: ns.into(),
            prompt: prompt.into(),
            normalized: prompt.into(),
            exact: format!("{ns}/{prompt}"),
        }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn exact_semantic_lru_and_restart() {
        let dir = std::env::temp_dir().join(format!(
            "kotaemon-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let path = dir.join("cache.db");
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = Store::open(&path, "m1", 2, 2).unwrap();
            s.insert(
                &key("a", "q1"),
                Some(&unit(&[1.0, 0.0])),
                "A1",
                Usage::default(),
            )
            .unwrap();
            s.insert(
                &key("a", "q2"),
                Some(&unit(&[0.0, 1.0])),
                "A2",
                Usage::default(),
            )
            .unwrap();
            assert_eq!(s.exact(&key("a", "q1"), 60).unwrap().unwrap().answer, "A1");
            let (id, sim) = s.nearest("a", &unit(&[0.9, 0.1])).unwrap();
            assert!(sim > 0.9);
            assert_eq!(s.get_fresh(id, 60).unwrap().unwrap().answer, "A1");
            assert!(
                s.nearest("b", &unit(&[1.0, 0.0])).is_none(),
                "namespaces never mix"
            );
            // A third entry evicts the least recently used (q2: q1 was just hit).
            std::thread::sleep(std::time::Duration::from_millis(1100));
            s.exact(&key("a", "q1"), 60).unwrap();
            s.insert(
                &key("a", "q3"),
                Some(&unit(&[1.0, 1.0])),
                "A3",
                Usage::default(),
            )
            .unwrap();
            assert_eq!(s.len().unwrap(), 2);
            assert!(s.exact(&key("a", "q2"), 60).unwrap().is_none());
        }
        // Restart: entries and the vector index come back from the file.
        let s = Store::open(&path, "m1", 2, 10).unwrap();
        assert_eq!(s.len().unwrap(), 2);
        assert!(s.nearest("a", &unit(&[1.0, 0.0])).is_some());
        // Another embedding model's vectors are not comparable: ignored.
        let other = Store::open(&path, "m2", 2, 10).unwrap();
        assert!(other.nearest("a", &unit(&[1.0, 0.0])).is_none());
        assert_eq!(
            other.exact(&key("a", "q1"), 60).unwrap().unwrap().answer,
            "A1",
            "exact hits do not depend on the model"
        );
        // Expiry.
        assert!(s.exact(&key("a", "q1"), 0).unwrap().is_none() || s.purge_expired(0).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreadable_database_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("kotaemon-store-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = Store::open(&path, "m", 2, 10)
            .err()
            .expect("garbage is refused")
            .to_string();
        assert!(err.contains("cache.db"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
