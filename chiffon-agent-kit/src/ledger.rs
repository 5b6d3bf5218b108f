//! A durable ledger of finished attempts: the `work_result` of each `(task, attempt)` an
//! agent finished, appended and fsynced before the result is published. An agent killed
//! after a step's side effect but before its ack finds the result here when the request is
//! redelivered, and answers it again instead of running the step twice.
//!
//! One JSON envelope per line; on open the file is compacted to the newest `keep` lines
//! (written to a temporary file and renamed, so a crash mid-compaction loses nothing). A
//! torn last line (a crash mid-append) is skipped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chiffon_protocol::{Envelope, Message};

/// The ledger file of one agent queue.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: Mutex<File>,
}

impl Ledger {
    /// Opens (creating) the ledger at `path` and returns the results it holds, oldest
    /// first, at most `keep` of them.
    pub fn open(path: &Path, keep: usize) -> std::io::Result<(Ledger, Vec<Envelope>)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut results = Vec::new();
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                if let Ok(env) = Envelope::parse(line.as_bytes()) {
                    if matches!(env.body, Message::WorkResult(_)) {
                        results.push(env);
                    }
                }
            }
        }
        if results.len() > keep {
            results.drain(..results.len() - keep);
        }
        let tmp = path.with_extension("compact");
        {
            let mut f = File::create(&tmp)?;
            for env in &results {
                f.write_all(&env.to_bytes())?;
                f.write_all(b"\n")?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok((
            Ledger {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            },
            results,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a result and waits until it is on disk.
    pub fn record(&self, result: &Envelope) -> std::io::Result<()> {
        let mut line = result.to_bytes();
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(&line)?;
        f.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chiffon_protocol::{TaskState, WorkResult};

    fn result(i: u32) -> Envelope {
        Envelope::new(
            "t",
            None,
            Message::WorkResult(WorkResult {
                task_id: uuid::Uuid::from_u128(u128::from(i)),
                status: TaskState::Completed,
                output: format!("run {i}"),
                duration_seconds: 0.0,
                resource_usage: Default::default(),
                error: None,
                changed: None,
                diff: None,
                attempt: 1,
                agent_id: None,
            }),
        )
    }

    #[test]
    fn results_survive_a_reopen_compacted_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/ledger.jsonl");
        let (l, none) = Ledger::open(&path, 3).unwrap();
        assert!(none.is_empty());
        for i in 0..5 {
            l.record(&result(i)).unwrap();
        }
        drop(l);
        // A crash in the middle of an append.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"version\": 1, \"mess")
            .unwrap();
        let (_l, kept) = Ledger::open(&path, 3).unwrap();
        let outputs: Vec<String> = kept
            .iter()
            .map(|e| match &e.body {
                Message::WorkResult(r) => r.output.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(outputs, ["run 2", "run 3", "run 4"]);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }
}
