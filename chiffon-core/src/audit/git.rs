//! The git audit trail: one commit per finished request in a git repository, so the record of
//! what was done, by whose approval, can be read, diffed, signed and mirrored with ordinary
//! git tools, independently of the database.
//!
//! Each request becomes the file `requests/ab/ID.json` (pretty JSON of the caller's
//! document: text, plan, approver, steps, outcome, cost, duration…), sharded by the first two
//! hex characters of the id so that neither a commit's cost nor a folder's size grows with
//! the history (the contract's `requests/ID.json`, with the shard folder between: a flat
//! folder of every request ever made would make each commit rewrite an ever-growing tree).
//! The commit's first line is `infra(ID): SUMMARY`, its author the approver,
//! its committer `chiffon`.
//!
//! # Layout: a bare repository, commits written directly
//!
//! The repository is **bare** (created with `HEAD` → `refs/heads/main`). Commits are built
//! in memory in git's object format (each record's blob, the three folders on its path, the
//! commit) and a batch's objects are written as one pack with its index, by this crate
//! (`audit/pack.rs`: each object hashed once, a changed folder stored as a delta against
//! its previous version in the batch); libgit2 reads the tip, moves the branch and reads
//! everything back. No index, no working tree: an index would make each commit cost grow
//! with the number of files, and a working tree would only go stale, since nothing here
//! checks files out; `git clone`, `git log`, `git show` work on a bare repository as usual.
//! An existing non-bare repository is accepted too: commits go to the branch its `HEAD`
//! names, and its working tree is left alone.
//!
//! # Several writers
//!
//! Threads of one process and several processes (orchestrator instances sharing the
//! repository on one file system) may commit at the same time. A commit is prepared on the
//! branch tip it read, then the branch is moved with a compare-and-swap
//! ([`git2::Repository::reference_matching`], under git's own `.lock` file): if another
//! writer moved it first, the tree is rebuilt on the new tip and the swap retried, with a
//! short jittered backoff. No commit is lost and history stays linear.
//!
//! # Blocking
//!
//! libgit2 does blocking file I/O (about a millisecond per commit). From async code use the
//! `*_async` methods, which run on tokio's blocking pool, or call the blocking methods
//! inside [`tokio::task::spawn_blocking`]. [`GitTrail`] is `Send + Sync`: share it in an
//! `Arc`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::pack::IndexEntry;
use chiffon_protocol::ErrorCode;
use git2::{ErrorCode as GitCode, ObjectType, Oid, Repository, RepositoryInitOptions, Signature};
use rand::Rng;
use sha2::Digest;
use uuid::Uuid;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The branch a new repository's `HEAD` points to.
pub const DEFAULT_BRANCH: &str = "refs/heads/main";
/// Name of the committer of every audit commit (the author is the approver).
pub const COMMITTER_NAME: &str = "chiffon";
/// Email of the committer of every audit commit.
pub const COMMITTER_EMAIL: &str = "chiffon@localhost";
/// The folder of the request records in the repository.
pub const REQUESTS_DIR: &str = "requests";

/// How often a commit is rebuilt after losing the race for the branch before giving up.
const MAX_ATTEMPTS: u32 = 100;
/// Longest summary kept on the first line of a commit message, in characters.
const MAX_SUBJECT_CHARS: usize = 120;

/// Errors of the git audit trail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The repository could not be opened or created.
    #[error("cannot open or create the audit repository at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    /// A git operation failed (I/O, a stale lock file, a damaged object).
    #[error("audit git operation failed ({context}): {source}")]
    Git {
        context: &'static str,
        #[source]
        source: BoxError,
    },
    /// Other writers kept moving or locking the branch (or a stale `.lock` file was left by
    /// a crashed writer); the commit was not written.
    #[error("the audit branch stayed busy for {attempts} attempts (last: {last_error}); commit not written")]
    Contention { attempts: u32, last_error: String },
    /// The record cannot be written as a commit (for example an empty author name).
    #[error("invalid audit record for request {id}: {reason}")]
    InvalidRecord { id: Uuid, reason: String },
    /// The request already has an audit commit, with a different document.
    #[error("request {id} already has audit commit {commit} with a different record")]
    RecordDiffers { id: Uuid, commit: String },
    /// The repository does not have the layout the trail writes (for example `HEAD`
    /// detached, or `requests` a file).
    #[error("the audit repository is not usable: {0}")]
    Layout(String),
    /// The blocking task running a git operation panicked or was cancelled.
    #[error("audit git task did not finish: {0}")]
    Task(String),
}

impl AuditError {
    /// The protocol error code to report.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuditError::Open { .. }
            | AuditError::Git { .. }
            | AuditError::Contention { .. }
            | AuditError::Layout(_)
            | AuditError::Task(_) => ErrorCode::GitCommitFailed,
            AuditError::InvalidRecord { .. } => ErrorCode::AuditRecordInvalid,
            AuditError::RecordDiffers { .. } => ErrorCode::Conflict,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AuditError::Git { .. } | AuditError::Contention { .. } | AuditError::Task(_)
        )
    }

    fn git(context: &'static str) -> impl FnOnce(git2::Error) -> AuditError {
        move |e| AuditError::Git {
            context,
            source: Box::new(e),
        }
    }
}

/// What to commit for one finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// The request id: names the file and the commit.
    pub id: Uuid,
    /// One line for the commit subject (only the first line is used there; the whole text
    /// goes into the body when it is longer).
    pub summary: String,
    /// The approver: the commit's author.
    pub author_name: String,
    pub author_email: String,
    /// Written as pretty JSON to `requests/SHARD/ID.json`: text, plan, approver, steps,
    /// outcome, cost, duration…
    pub document: serde_json::Value,
    /// The audit chain's head when the record was written, anchored in the commit message.
    pub anchor: Option<ChainAnchor>,
}

/// One finished request per commit in a git repository; see the [module docs](self).
pub struct GitTrail {
    path: PathBuf,
    // `Repository` is `Send` but not `Sync`; operations are about a millisecond, so one
    // handle behind a mutex is enough. Other processes and other `GitTrail`s on the same
    // path are coordinated by the compare-and-swap, not by this lock.
    repo: Mutex<Repository>,
}

impl std::fmt::Debug for GitTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitTrail")
            .field("path", &self.path)
            .finish()
    }
}

/// The repository path of a request's record: `requests/SHARD/ID.json`, SHARD being the
/// first two hex digits of the SHA-256 of the id. Ids are UUIDv7 (time first), so a prefix
/// of the id itself would put every record of a year in one folder, and each commit would
/// rewrite a tree listing all of them; a hash spreads them over 256 folders.
pub fn record_path(id: Uuid) -> String {
    let hyphenated = id.hyphenated().to_string();
    let shard = hex::encode(&sha2::Sha256::digest(hyphenated.as_bytes())[..1]);
    format!("{REQUESTS_DIR}/{shard}/{hyphenated}.json")
}

/// Where records were written before the hash shard (the id's first two characters): still
/// read, so an older trail verifies.
pub fn legacy_record_path(id: Uuid) -> String {
    let id = id.hyphenated().to_string();
    format!("{REQUESTS_DIR}/{}/{id}.json", &id[..2])
}

/// SHA-256 (hex) of the bytes a record is written as: what the audit log's `committed`
/// entry keeps, so `audit verify` can tell an amended record.
pub fn record_digest(record: &RequestRecord) -> Result<String, AuditError> {
    Ok(hex::encode(sha2::Sha256::digest(record_bytes(record)?)))
}

/// What `audit verify` knows of one finished request, to check against the trail.
#[derive(Debug, Clone)]
pub struct ExpectedRecord {
    pub id: Uuid,
    /// The commit id stored on the request.
    pub commit: String,
    /// The record's SHA-256 from the audit log, when it was recorded there.
    pub digest: Option<String>,
}

/// The trail's branch as [`GitTrail::history`] read it: its tip (none while it has no
/// commits) and the commits in its history.
#[derive(Debug, Clone)]
pub struct TrailHistory {
    tip: Option<Oid>,
    commits: std::collections::HashSet<Oid>,
}

/// A finished request whose git record does not verify, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordProblem {
    pub id: Uuid,
    pub reason: String,
}

/// The audit-chain head written into a commit's message (`Audit-Chain: SEQ HASH`): git then
/// holds, outside the database, what the chain looked like, so truncating or rewriting the
/// log and recomputing the chain is caught.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainAnchor {
    pub seq: i64,
    pub hash: String,
}

/// The first line of a request's audit commit: `infra(ID): SUMMARY`.
pub fn subject_line(id: Uuid, summary: &str) -> String {
    let first = summary
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no summary)");
    let first = first.split_whitespace().collect::<Vec<_>>().join(" ");
    let first = if first.chars().count() > MAX_SUBJECT_CHARS {
        let cut: String = first.chars().take(MAX_SUBJECT_CHARS - 1).collect();
        format!("{}…", cut.trim_end())
    } else {
        first
    };
    format!("infra({}): {first}", id.hyphenated())
}

impl GitTrail {
    /// Opens the repository at `path`, or creates a bare one there (with missing parent
    /// folders) when `path` does not exist or is an empty folder. A folder with other
    /// content is refused rather than turned into a repository. Several processes may call
    /// this at once on a missing path: the repository appears atomically, and all of them
    /// open the same one.
    pub fn open_or_init(path: impl AsRef<Path>) -> Result<GitTrail, AuditError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |e: BoxError| AuditError::Open {
            path: path.clone(),
            source: e,
        };
        let repo = match Repository::open(&path) {
            Ok(repo) => repo,
            Err(e) if e.code() == GitCode::NotFound => {
                let is_empty_or_missing = match std::fs::read_dir(&path) {
                    Ok(mut entries) => entries.next().is_none(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => return Err(open_err(Box::new(e))),
                };
                if is_empty_or_missing {
                    init_atomically(&path).map_err(open_err)?
                } else {
                    // Another process may have just renamed its new repository into place
                    // (atomically, so a second look sees all of it or nothing).
                    Repository::open(&path).map_err(|_| {
                        open_err(
                            "the folder exists, is not empty and is not a git repository".into(),
                        )
                    })?
                }
            }
            Err(e) => return Err(open_err(Box::new(e))),
        };
        Ok(GitTrail {
            path,
            repo: Mutex::new(repo),
        })
    }

    /// Where the repository is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn repo(&self) -> MutexGuard<'_, Repository> {
        // A panic while holding the lock leaves nothing half-done in the repository (objects
        // are content-addressed, the branch moves atomically), so a poisoned lock is usable.
        self.repo.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits the record of a finished request and returns the commit id (40 hex digits).
    ///
    /// Idempotent: if the branch tip already has `requests/ab/ID.json` with the same
    /// content, no commit is added and the commit that wrote it is returned. If it has a
    /// different content, [`AuditError::RecordDiffers`] names that commit: a request's
    /// record is written once.
    ///
    /// Blocking; see the [module docs](self). Many records at once: [`GitTrail::commit_batch`].
    pub fn commit_request(&self, record: &RequestRecord) -> Result<String, AuditError> {
        self.commit_batch(std::slice::from_ref(record))
            .pop()
            .unwrap_or_else(|| Err(AuditError::Task("empty batch".into())))
    }

    /// Commits many finished requests' records, one commit each, chained in order on the
    /// branch tip, and returns each record's commit id (or why it has none), in order.
    ///
    /// The whole batch costs one pack file and its index (every blob, tree and commit of the
    /// batch, built in memory, each hashed once), one compare-and-swap of the branch and one
    /// `fsync` of each file written, however many records it holds: the git trail's cost per
    /// request stays flat, and a power loss after this returns loses nothing. Each record is
    /// idempotent as in [`GitTrail::commit_request`]; a record that cannot be written (an
    /// invalid author, a different record already committed) fails alone. If another writer
    /// moves the branch meanwhile, the batch is rebuilt on the new tip.
    pub fn commit_batch(&self, records: &[RequestRecord]) -> Vec<Result<String, AuditError>> {
        let prepared: Vec<Result<Prepared, AuditError>> = records
            .iter()
            .map(|record| {
                let path = record_path(record.id);
                Ok(Prepared {
                    id: record.id,
                    author: signature(record)?,
                    content: record_bytes(record)?,
                    message: commit_message(record, &path),
                    path,
                })
            })
            .collect();
        if prepared.iter().all(Result::is_err) {
            return prepared
                .into_iter()
                .map(|p| p.map(|_| String::new()))
                .collect();
        }
        // One batch at a time in this process; other processes are kept apart by the swap.
        let _serial = self.repo();
        let mut rng = rand::rng();
        let mut last_error = String::new();
        for attempt in 1..=MAX_ATTEMPTS {
            match self.try_batch(&prepared) {
                Ok(out) => {
                    return out
                        .into_iter()
                        .zip(prepared)
                        .map(|(r, p)| match p {
                            Err(e) => Err(e),
                            Ok(_) => r,
                        })
                        .collect()
                }
                Err(BatchError::Race(e)) => {
                    last_error = e;
                    // Lost the race: the pack just written holds unreferenced objects,
                    // garbage for `git gc`.
                    let cap = 1u64 << attempt.min(6);
                    std::thread::sleep(Duration::from_millis(rng.random_range(0..=cap)));
                }
                Err(BatchError::Failed(e)) => {
                    // Every record of the batch failed the same way; the error is not
                    // `Clone`, so each gets its text (the kind, transient, is kept).
                    let text = e.to_string();
                    return prepared
                        .into_iter()
                        .map(|p| {
                            p.and_then(|_| {
                                Err(AuditError::Git {
                                    context: "write batch",
                                    source: text.clone().into(),
                                })
                            })
                        })
                        .collect();
                }
            }
        }
        prepared
            .into_iter()
            .map(|p| {
                p.and_then(|_| {
                    Err(AuditError::Contention {
                        attempts: MAX_ATTEMPTS,
                        last_error: last_error.clone(),
                    })
                })
            })
            .collect()
    }

    /// One try at a batch on the current tip. Per-record results for the prepared records
    /// (placeholders for the unprepared ones, which the caller replaces).
    ///
    /// The batch's objects are built in memory and written as one pack of this crate's own
    /// ([`super::pack`]): each folder changed by a record is its previous version with one
    /// entry added, stored as a delta against that version when it was written earlier in
    /// the batch. Nothing is written to the repository until the pack is complete.
    fn try_batch(
        &self,
        prepared: &[Result<Prepared, AuditError>],
    ) -> Result<Vec<Result<String, AuditError>>, BatchError> {
        // A handle of its own, so a pack written by another process is found.
        let repo = Repository::open(&self.path).map_err(AuditError::git("open repository"))?;
        let odb = repo
            .odb()
            .map_err(AuditError::git("open object database"))?;
        let branch = head_branch(&repo)?;
        let tip = branch_tip(&repo, &branch)?;
        let mut folders = Folders {
            odb: &odb,
            root: match tip {
                Some(tip) => {
                    let tree = repo
                        .find_commit(tip)
                        .map_err(AuditError::git("read branch tip"))?
                        .tree_id();
                    Some((tree, read_tree(&odb, tree)?))
                }
                None => None,
            },
            requests: None,
            shards: Default::default(),
        };
        folders.requests = match &folders.root {
            Some((_, root)) => tree_entry(root, REQUESTS_DIR.as_bytes(), true)?
                .map(|id| Ok::<_, AuditError>((id, read_tree(&odb, id)?)))
                .transpose()?,
            None => None,
        };
        let committer = Signature::now(COMMITTER_NAME, COMMITTER_EMAIL)
            .map_err(AuditError::git("committer signature"))?;
        let committer = signature_text(&committer);
        let mut pack = super::pack::PackBuilder::new();
        let packing = |e: std::io::Error| AuditError::Git {
            context: "pack the batch",
            source: Box::new(e),
        };
        // Records committed earlier in this batch: path → commit.
        let mut in_batch: std::collections::HashMap<&str, Oid> = Default::default();
        let mut parent = tip;
        // The batch's previous record and commit: the next one is stored as a delta
        // against it (most of their lines are the same).
        let mut previous_blob: Option<(Oid, &[u8])> = None;
        let mut previous_commit: Option<(Oid, Vec<u8>)> = None;
        let mut out = Vec::with_capacity(prepared.len());
        let mut last = None;
        for p in prepared {
            let Ok(p) = p else {
                out.push(Ok(String::new()));
                continue;
            };
            let blob = super::pack::object_id(ObjectType::Blob, &p.content);
            let (shard, file) = split_record_path(&p.path)?;
            if let Some(existing) = folders.record(shard, file)? {
                let commit = match in_batch.get(p.path.as_str()) {
                    Some(c) => Some(*c),
                    None => tip
                        .map(|tip| introducing_commit(&repo, tip, &p.path))
                        .transpose()?
                        .flatten(),
                };
                let Some(commit) = commit else {
                    return Err(AuditError::Layout(format!("{} has no commit", p.path)).into());
                };
                out.push(if existing == blob {
                    Ok(commit.to_string())
                } else {
                    Err(AuditError::RecordDiffers {
                        id: p.id,
                        commit: commit.to_string(),
                    })
                });
                continue;
            }
            pack.add(ObjectType::Blob, &p.content, previous_blob)
                .map_err(packing)?;
            previous_blob = Some((blob, p.content.as_slice()));
            let root = folders.insert(&mut pack, shard, file, blob)?;
            let mut body = format!("tree {root}\n");
            if let Some(parent) = parent {
                body.push_str(&format!("parent {parent}\n"));
            }
            body.push_str(&format!(
                "author {}\ncommitter {committer}\n\n{}",
                signature_text(&p.author),
                p.message
            ));
            let base = previous_commit.as_ref().map(|(id, b)| (*id, b.as_slice()));
            let commit = pack
                .add(ObjectType::Commit, body.as_bytes(), base)
                .map_err(packing)?;
            previous_commit = Some((commit, body.into_bytes()));
            in_batch.insert(p.path.as_str(), commit);
            parent = Some(commit);
            last = Some((commit, p.message.lines().next().unwrap_or_default()));
            out.push(Ok(commit.to_string()));
        }
        let Some((last, log)) = last else {
            return Ok(out);
        };
        // Everything the batch made, as one pack on disk, synced before the branch names it.
        let (pack, idx) = pack.finish();
        super::pack::write_to(&repo.path().join("objects").join("pack"), &pack, &idx).map_err(
            |e| AuditError::Git {
                context: "write the batch's pack",
                source: Box::new(e),
            },
        )?;
        match repo.reference_matching(&branch, last, true, tip.unwrap_or(Oid::ZERO_SHA1), log) {
            Ok(_) => {}
            Err(e) if is_race(&e) => return Err(BatchError::Race(e.message().to_string())),
            Err(e) => return Err(AuditError::git("move branch")(e).into()),
        }
        // The branch file, and the folder that names it, so the move survives a power loss.
        let ref_file = repo.path().join(&branch);
        if ref_file.exists() {
            sync_file(&ref_file)?;
            if let Some(dir) = ref_file.parent() {
                sync_file(dir)?;
            }
        }
        // One pack per batch would make every later batch slower (a new object is looked
        // for in every pack): small packs are merged as they come, geometrically.
        if let Err(e) = merge_small_packs(&self.path) {
            tracing::warn!(error = %e, "merging the audit trail's packs failed; the records are safe");
        }
        Ok(out)
    }

    /// The commit that wrote the record of request `id`, if the branch has it.
    ///
    /// Walks back from the tip, so the cost grows with the number of commits made since
    /// (small for the recent requests this is asked about; the store keeps each request's
    /// commit id for the rest).
    pub fn find_commit_for(&self, id: Uuid) -> Result<Option<String>, AuditError> {
        let repo = self.repo();
        let branch = head_branch(&repo)?;
        let Some(tip) = branch_tip(&repo, &branch)? else {
            return Ok(None);
        };
        match introducing_commit(&repo, tip, &record_path(id))? {
            Some(c) => Ok(Some(c.to_string())),
            None => {
                Ok(introducing_commit(&repo, tip, &legacy_record_path(id))?.map(|c| c.to_string()))
            }
        }
    }

    /// Checks finished requests against the trail (for `chiffon audit verify`): the record
    /// is at the branch tip, its content hashes to what the audit log recorded, and the
    /// stored commit is in the branch's history (an amend or a force-push is caught). Costs
    /// one walk of the branch's history, then one tree lookup, one blob read and one set
    /// lookup per request (an ancestry query per request would walk the history each time).
    /// Many pages of requests: [`GitTrail::history`] once, then
    /// [`GitTrail::verify_records_in`] for each page.
    pub fn verify_records(
        &self,
        expected: &[ExpectedRecord],
    ) -> Result<Vec<RecordProblem>, AuditError> {
        if expected.is_empty() {
            return Ok(Vec::new());
        }
        let history = self.history()?;
        self.verify_records_in(&history, expected)
    }

    /// The branch's tip and every commit in its history, read in one walk: what
    /// [`GitTrail::verify_records_in`] checks pages of requests against.
    pub fn history(&self) -> Result<TrailHistory, AuditError> {
        let repo = self.repo();
        let branch = head_branch(&repo)?;
        let Some(tip) = branch_tip(&repo, &branch)? else {
            return Ok(TrailHistory {
                tip: None,
                commits: Default::default(),
            });
        };
        let mut commits = std::collections::HashSet::new();
        let mut walk = repo.revwalk().map_err(AuditError::git("walk history"))?;
        walk.push(tip).map_err(AuditError::git("walk history"))?;
        for oid in walk {
            commits.insert(oid.map_err(AuditError::git("walk history"))?);
        }
        Ok(TrailHistory {
            tip: Some(tip),
            commits,
        })
    }

    /// [`GitTrail::verify_records`] against a history read before (its tip's tree, its
    /// commits): one tree lookup, one blob read and one set lookup per request.
    pub fn verify_records_in(
        &self,
        history: &TrailHistory,
        expected: &[ExpectedRecord],
    ) -> Result<Vec<RecordProblem>, AuditError> {
        let repo = self.repo();
        let problem = |id, reason: &str| RecordProblem {
            id,
            reason: reason.to_string(),
        };
        let Some(tip) = history.tip else {
            return Ok(expected
                .iter()
                .map(|e| {
                    problem(
                        e.id,
                        "its record is missing at the branch tip (the branch has no commits)",
                    )
                })
                .collect());
        };
        let tree = repo
            .find_commit(tip)
            .and_then(|c| c.tree())
            .map_err(AuditError::git("read tip tree"))?;
        let mut out = Vec::new();
        for e in expected {
            let blob = match entry_id(&tree, &record_path(e.id))? {
                Some(b) => Some(b),
                None => entry_id(&tree, &legacy_record_path(e.id))?,
            };
            let Some(blob) = blob else {
                out.push(problem(e.id, "its record is missing at the branch tip"));
                continue;
            };
            if let Some(want) = &e.digest {
                let content = repo
                    .find_blob(blob)
                    .map_err(AuditError::git("read record"))?;
                let got = hex::encode(sha2::Sha256::digest(content.content()));
                if &got != want {
                    out.push(problem(
                        e.id,
                        "its record was changed after it was written (content hash differs from the audit log)",
                    ));
                    continue;
                }
            }
            match Oid::from_str(&e.commit) {
                Ok(c) if history.commits.contains(&c) => {}
                Ok(c) => match repo.find_commit(c) {
                    Ok(_) => out.push(problem(
                        e.id,
                        "its stored commit is not in the branch's history (amended or force-pushed)",
                    )),
                    Err(_) => out.push(problem(e.id, "its stored commit does not exist")),
                },
                Err(_) => out.push(problem(e.id, "its stored commit id is not a commit id")),
            }
        }
        Ok(out)
    }

    /// Lets go of what reading the trail cached: opens the repository anew in place of
    /// this handle's. libgit2 keeps, per pack, up to 16 MiB of the objects it rebuilt from
    /// deltas, for as long as a handle has the pack open (packs are shared by every handle
    /// in the process); a verification reads every record and commit, so without this a
    /// long-running server would keep that memory after each one. Fails only when the
    /// repository cannot be opened (the old handle is kept then).
    pub fn release_caches(&self) -> Result<(), AuditError> {
        let fresh = Repository::open(&self.path).map_err(AuditError::git("open repository"))?;
        *self.repo() = fresh;
        return_free_memory();
        Ok(())
    }

    /// The newest chain anchor in the branch's history (looks back at most `depth`
    /// commits).
    pub fn latest_anchor(&self, depth: usize) -> Result<Option<ChainAnchor>, AuditError> {
        let repo = self.repo();
        let branch = head_branch(&repo)?;
        let Some(tip) = branch_tip(&repo, &branch)? else {
            return Ok(None);
        };
        let mut walk = repo.revwalk().map_err(AuditError::git("walk history"))?;
        walk.push(tip).map_err(AuditError::git("walk history"))?;
        for oid in walk.take(depth) {
            let oid = oid.map_err(AuditError::git("walk history"))?;
            let commit = repo
                .find_commit(oid)
                .map_err(AuditError::git("read commit"))?;
            if let Some(a) = commit.message().ok().and_then(parse_anchor) {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }

    /// Removes ref lock files a crashed writer left behind (older than `older_than`): git
    /// itself never does, and one would stop the trail for good. A live writer holds its
    /// lock for milliseconds.
    pub fn clear_stale_locks(&self, older_than: Duration) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let mut stack = vec![self.path.join("refs"), self.path.clone()];
        let mut depth_guard = 0;
        while let Some(dir) = stack.pop() {
            depth_guard += 1;
            if depth_guard > 1000 {
                break;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                let Ok(meta) = e.metadata() else { continue };
                if meta.is_dir() {
                    if dir != self.path && p.starts_with(self.path.join("refs")) {
                        stack.push(p);
                    }
                    continue;
                }
                let is_lock = p.extension().is_some_and(|x| x == "lock");
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|age| age >= older_than);
                if is_lock && old && std::fs::remove_file(&p).is_ok() {
                    tracing::warn!(lock = %p.display(), "removed a stale git lock left by a crashed writer");
                    removed.push(p);
                }
            }
        }
        removed
    }

    /// Of `ids`, the requests whose record is missing at the branch tip (for
    /// `chiffon audit verify`). Costs one tree lookup per id.
    pub fn verify(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, AuditError> {
        let repo = self.repo();
        let branch = head_branch(&repo)?;
        let Some(tip) = branch_tip(&repo, &branch)? else {
            return Ok(ids.to_vec());
        };
        let tree = repo
            .find_commit(tip)
            .and_then(|c| c.tree())
            .map_err(AuditError::git("read tip tree"))?;
        let mut missing = Vec::new();
        for &id in ids {
            if entry_id(&tree, &record_path(id))?.is_none()
                && entry_id(&tree, &legacy_record_path(id))?.is_none()
            {
                missing.push(id);
            }
        }
        Ok(missing)
    }

    /// The newest `limit` commits of the branch, newest first: (commit id, first line).
    pub fn log(&self, limit: usize) -> Result<Vec<(String, String)>, AuditError> {
        let repo = self.repo();
        let branch = head_branch(&repo)?;
        let mut out = Vec::new();
        let mut next = branch_tip(&repo, &branch)?;
        while let Some(id) = next {
            if out.len() >= limit {
                break;
            }
            let commit = repo
                .find_commit(id)
                .map_err(AuditError::git("read commit"))?;
            let subject = String::from_utf8_lossy(commit.message_bytes())
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            out.push((id.to_string(), subject));
            next = commit.parent_ids().next();
        }
        Ok(out)
    }

    /// [`GitTrail::commit_request`] on tokio's blocking pool.
    pub async fn commit_request_async(
        self: &Arc<Self>,
        record: RequestRecord,
    ) -> Result<String, AuditError> {
        let trail = Arc::clone(self);
        blocking(move || trail.commit_request(&record)).await
    }

    /// [`GitTrail::find_commit_for`] on tokio's blocking pool.
    pub async fn find_commit_for_async(
        self: &Arc<Self>,
        id: Uuid,
    ) -> Result<Option<String>, AuditError> {
        let trail = Arc::clone(self);
        blocking(move || trail.find_commit_for(id)).await
    }

    /// [`GitTrail::verify`] on tokio's blocking pool.
    pub async fn verify_async(self: &Arc<Self>, ids: Vec<Uuid>) -> Result<Vec<Uuid>, AuditError> {
        let trail = Arc::clone(self);
        blocking(move || trail.verify(&ids)).await
    }

    /// [`GitTrail::log`] on tokio's blocking pool.
    pub async fn log_async(
        self: &Arc<Self>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, AuditError> {
        let trail = Arc::clone(self);
        blocking(move || trail.log(limit)).await
    }
}

/// A record ready to commit.
struct Prepared {
    id: Uuid,
    author: Signature<'static>,
    content: Vec<u8>,
    message: String,
    path: String,
}

/// Why one try at a batch did not land.
enum BatchError {
    /// Another writer moved or locked the branch: build the batch again on the new tip.
    Race(String),
    Failed(AuditError),
}

impl From<AuditError> for BatchError {
    fn from(e: AuditError) -> Self {
        BatchError::Failed(e)
    }
}

/// Packs are merged once there are more than this many. A merge copies every byte of the
/// packs it merges (and when that cannot be done, packs their objects afresh): letting
/// batches' packs gather first means each object is merged fewer times (measured with the
/// benchmark, 2,000 requests, when merging still searched for deltas: merging above 4 packs
/// was 8% of the process's CPU), while a lookup still looks through a handful of packs (git
/// itself waits for 50).
const PACK_MERGE_ABOVE: usize = 16;

/// How many objects a pack index (version 2, SHA-1) lists: its header alone is read.
fn pack_objects(idx: &Path) -> std::io::Result<usize> {
    use std::io::Read;
    let mut file = std::fs::File::open(idx)?;
    let mut header = [0u8; 8 + 1024];
    file.read_exact(&mut header)?;
    if header[..4] != [0xff, b't', b'O', b'c'] || header[4..8] != [0, 0, 0, 2] {
        return Err(not_an_index());
    }
    Ok(u32::from_be_bytes([header[1028], header[1029], header[1030], header[1031]]) as usize)
}

/// The entries of the pack index at `idx`.
fn read_pack_index(idx: &Path) -> std::io::Result<Vec<IndexEntry>> {
    super::pack::read_index(&std::fs::read(idx)?).ok_or_else(not_an_index)
}

fn not_an_index() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "not a v2 pack index")
}

/// A merge reads and writes packs in pieces of this size: it holds the index entries of
/// the packs it merges, never their bytes.
const COPY_CHUNK: usize = 64 * 1024;

/// A pack that holds this many objects (about 13,000 requests' records) or more is never
/// merged again: a merge holds its packs' index entries (about 32 bytes an object), so
/// this bounds its memory whatever the trail's history, and the bytes it copies.
const PACK_MERGE_MAX_OBJECTS: usize = 1 << 16;

/// The packs (each with the entries its index lists: id, offset, CRC-32, and the pack
/// file's path) written as one pack in `pack_dir`, whose entries are theirs, copied byte
/// for byte and streamed (`COPY_CHUNK` at a time), with its index: no delta search, no
/// recompression, no hashing of the objects again, so a merge costs what copying it costs.
/// Each pack is self-contained (a batch's pack holds its deltas' bases), and each is
/// copied in one piece and in order, so a delta still finds its base (by id, or at the same
/// distance back). Returns the new pack's checksum (its name), once it and its index are
/// synced in place. `None` when an object is in more than one pack (the index would list
/// it twice), a pack is not a version 2 or 3 pack of the objects its index lists, or an
/// entry's bytes do not match its index's CRC-32 (the objects are then packed afresh, from
/// what libgit2 reads of them); nothing is left behind then.
fn concat_packs(
    pack_dir: &Path,
    sources: &[(Vec<IndexEntry>, PathBuf)],
) -> std::io::Result<Option<[u8; 20]>> {
    use sha1::Digest as _;
    use std::io::Read as _;
    let mut seen = std::collections::HashSet::new();
    let mut count: u32 = 0;
    for (entries, _) in sources {
        let Some(n) = u32::try_from(entries.len())
            .ok()
            .and_then(|n| count.checked_add(n))
        else {
            return Ok(None);
        };
        count = n;
        if !entries.iter().all(|e| seen.insert(e.0)) {
            return Ok(None);
        }
    }
    drop(seen);
    let (tmp, file) = super::pack::temp_file(pack_dir, "pack")?;
    let written = (|| -> std::io::Result<Option<[u8; 20]>> {
        let mut out = HashingWriter {
            inner: std::io::BufWriter::with_capacity(COPY_CHUNK, file),
            sha: sha1::Sha1::new(),
            len: 0,
        };
        out.write_all(b"PACK\0\0\0\x02")?;
        out.write_all(&count.to_be_bytes())?;
        let mut entries = Vec::with_capacity(count as usize);
        let mut chunk = vec![0u8; COPY_CHUNK];
        for (listed, path) in sources {
            let file = std::fs::File::open(path)?;
            let len = file.metadata()?.len();
            // Entries are a few hundred bytes: read ahead, not one read per entry.
            let mut src = std::io::BufReader::with_capacity(COPY_CHUNK, file);
            let mut header = [0u8; 12];
            if len < 32 {
                return Ok(None);
            }
            src.read_exact(&mut header)?;
            if &header[..4] != b"PACK"
                || !matches!(header[4..8], [0, 0, 0, 2] | [0, 0, 0, 3])
                || header[8..12] != (listed.len() as u32).to_be_bytes()
            {
                return Ok(None);
            }
            // Each entry's bytes, from its offset to the next entry's, copied and checked
            // against its CRC-32 on the way; bytes before the first entry (none in a pack
            // git or this trail wrote) are copied as they are.
            let mut by_offset: Vec<&IndexEntry> = listed.iter().collect();
            by_offset.sort_unstable_by_key(|e| e.1);
            let end = len - 20;
            let shift = out.len - 12;
            let mut at = 12;
            for (i, &&(_, offset, crc)) in by_offset.iter().enumerate() {
                let next = by_offset.get(i + 1).map_or(end, |e| e.1);
                if offset < at || next < offset || next > end {
                    return Ok(None);
                }
                if i == 0 {
                    copy_range(&mut src, &mut out, offset - at, &mut chunk, None)?;
                }
                let mut hasher = crc32fast::Hasher::new();
                copy_range(
                    &mut src,
                    &mut out,
                    next - offset,
                    &mut chunk,
                    Some(&mut hasher),
                )?;
                if hasher.finalize() != crc {
                    return Ok(None);
                }
                at = next;
            }
            if by_offset.is_empty() {
                copy_range(&mut src, &mut out, end - 12, &mut chunk, None)?;
            }
            entries.extend(
                listed
                    .iter()
                    .map(|(id, offset, crc)| (*id, offset + shift, *crc)),
            );
        }
        let checksum: [u8; 20] = out.sha.finalize().into();
        let mut file = out.inner.into_inner().map_err(|e| e.into_error())?;
        file.write_all(&checksum)?;
        file.sync_all()?;
        drop(file);
        let idx = super::pack::build_index(entries, &checksum);
        super::pack::install(pack_dir, &tmp, &checksum, &idx)?;
        Ok(Some(checksum))
    })();
    if !matches!(written, Ok(Some(_))) {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes through to `inner`, hashing what it writes and counting it.
struct HashingWriter<W> {
    inner: W,
    sha: sha1::Sha1,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use sha1::Digest as _;
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copies the next `n` bytes of `src` to `out`, `chunk` at a time, feeding them to `crc`.
fn copy_range(
    src: &mut impl std::io::Read,
    out: &mut impl Write,
    mut n: u64,
    chunk: &mut [u8],
    mut crc: Option<&mut crc32fast::Hasher>,
) -> std::io::Result<()> {
    while n > 0 {
        let take = n.min(chunk.len() as u64) as usize;
        src.read_exact(&mut chunk[..take])?;
        if let Some(crc) = crc.as_deref_mut() {
            crc.update(&chunk[..take]);
        }
        out.write_all(&chunk[..take])?;
        n -= take as u64;
    }
    Ok(())
}

/// Which of the packs (their indexes, each with its object count) a merge takes: none
/// while there are at most `PACK_MERGE_ABOVE` packs under `PACK_MERGE_MAX_OBJECTS`
/// objects (larger ones are left as they are and not counted); otherwise, smallest first,
/// all those up to the largest pack that holds fewer than twice the objects of all the
/// packs smaller than it together (none when that is only the smallest).
fn packs_to_merge(mut packs: Vec<(PathBuf, usize)>) -> Vec<PathBuf> {
    packs.retain(|(_, n)| *n < PACK_MERGE_MAX_OBJECTS);
    if packs.len() <= PACK_MERGE_ABOVE {
        return Vec::new();
    }
    packs.sort_by_key(|(_, n)| *n);
    let mut split = 0;
    let mut sum = 0usize;
    for (i, (_, n)) in packs.iter().enumerate() {
        if i > 0 && *n < 2 * sum {
            split = i + 1;
        }
        sum += n;
    }
    if split < 2 {
        return Vec::new();
    }
    packs.truncate(split);
    packs.into_iter().map(|(idx, _)| idx).collect()
}

/// Geometric repacking (as `git repack --geometric=2`): with the packs sorted by object
/// count, the smallest ones are merged into one until every pack holds at least twice the
/// objects of all smaller packs together. Each object is rewritten O(log n) times over the
/// trail's life (and not at all once its pack holds `PACK_MERGE_MAX_OBJECTS`), and a batch
/// looks through O(log n) packs plus the large ones (one for about 13,000 requests), so a
/// commit's cost stays about flat as history grows; a merge streams the packs' bytes and
/// holds at most the index entries of packs under the cap, so its memory stays flat too.
/// The merged pack is written and synced before the packs it replaces are removed; a pack
/// with a `.keep` file is left alone.
fn merge_small_packs(path: &Path) -> Result<(), AuditError> {
    let repo = Repository::open(path).map_err(AuditError::git("open repository"))?;
    let pack_dir = repo.path().join("objects").join("pack");
    let mut packs: Vec<(PathBuf, usize)> = Vec::new();
    for idx in list_files(&pack_dir)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|x| x == "idx"))
    {
        if idx.with_extension("keep").exists() {
            continue;
        }
        match pack_objects(&idx) {
            Ok(n) => packs.push((idx, n)),
            // Removed by another process's merge meanwhile: it is in that merge.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AuditError::Git {
                    context: "read pack index",
                    source: Box::new(e),
                })
            }
        }
    }
    let merged = packs_to_merge(packs);
    if merged.is_empty() {
        return Ok(());
    }
    let mut sources = Vec::with_capacity(merged.len());
    for idx in &merged {
        match read_pack_index(idx) {
            Ok(entries) => sources.push((entries, idx.with_extension("pack"))),
            // Merged and removed by another process meanwhile: not ours to finish.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(AuditError::Git {
                    context: "read pack",
                    source: Box::new(e),
                })
            }
        }
    }
    let name = match concat_packs(&pack_dir, &sources) {
        Ok(Some(checksum)) => hex::encode(checksum),
        // A pack merged and removed by another process meanwhile: not ours to finish.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(AuditError::Git {
                context: "write merged pack",
                source: Box::new(e),
            })
        }
        // An object in two packs (a batch rebuilt after a lost race writes its objects
        // again), or an entry that does not match its index: packed afresh, each object
        // once, through libgit2 (which reads and checks each object, and writes and
        // indexes the pack itself, to files), then synced.
        Ok(None) => {
            let mut builder = repo.packbuilder().map_err(AuditError::git("merge packs"))?;
            for oid in sources
                .iter()
                .flat_map(|(entries, _)| entries.iter().map(|e| e.0))
            {
                builder
                    .insert_object(oid, None)
                    .map_err(AuditError::git("merge packs"))?;
            }
            builder
                .write(&pack_dir, 0)
                .map_err(AuditError::git("merge packs"))?;
            let name = builder
                .name()
                .map_err(AuditError::git("merge packs"))?
                .ok_or_else(|| AuditError::Git {
                    context: "merge packs",
                    source: "libgit2 wrote a pack without a name".into(),
                })?
                .to_string();
            for ext in ["pack", "idx"] {
                sync_file(&pack_dir.join(format!("pack-{name}.{ext}")))?;
            }
            sync_file(&pack_dir)?;
            name
        }
    };
    // The new pack indexes exactly the objects of the packs it replaces (a damaged entry
    // would be indexed under another id): otherwise the old packs stay, and nothing is lost.
    let mut expected: Vec<Oid> = sources
        .into_iter()
        .flat_map(|(entries, _)| entries.into_iter().map(|e| e.0))
        .collect();
    expected.sort_unstable();
    expected.dedup();
    let new_idx = pack_dir.join(format!("pack-{name}.idx"));
    match read_pack_index(&new_idx).map(|entries| entries.into_iter().map(|e| e.0).collect::<Vec<_>>()) {
        Ok(ids) if ids == expected => {}
        Ok(ids) => {
            return Err(AuditError::Git {
                context: "merge packs",
                source: format!(
                    "the merged pack {} holds {} objects, not the {} of the packs it merges: they are kept",
                    new_idx.display(),
                    ids.len(),
                    expected.len()
                )
                .into(),
            })
        }
        Err(e) => {
            return Err(AuditError::Git {
                context: "read merged pack index",
                source: Box::new(e),
            })
        }
    }
    // Every object of the merged packs is now in the new one, on disk: the old ones go,
    // index first so that no reader finds a pack without its index.
    for idx in &merged {
        for ext in ["idx", "pack", "rev"] {
            match std::fs::remove_file(idx.with_extension(ext)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(AuditError::Git {
                        context: "remove merged pack",
                        source: Box::new(e),
                    })
                }
            }
        }
    }
    sync_file(&pack_dir)
}

/// Hands the heap's free pages back to the system (glibc keeps what a burst of small
/// allocations freed, such as libgit2's caches of rebuilt objects, for its own reuse).
#[allow(unsafe_code)]
fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn list_files(dir: &Path) -> std::collections::HashSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// `fsync` of a file or a folder (libgit2 writes without it).
fn sync_file(path: &Path) -> Result<(), AuditError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| AuditError::Git {
            context: "fsync",
            source: Box::new(e),
        })
}

/// Creates a bare repository at `path` so that nobody ever sees it half made: it is
/// initialised in a sibling folder and renamed into place. When several processes start at
/// once, one rename wins and the others open what it made.
fn init_atomically(path: &Path) -> Result<Repository, BoxError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    let name = path
        .file_name()
        .ok_or("the path has no final folder name")?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.init-{}", Uuid::new_v4().simple()));
    let mut opts = RepositoryInitOptions::new();
    opts.bare(true)
        .mkpath(true)
        .no_reinit(true)
        .initial_head(DEFAULT_BRANCH);
    drop(Repository::init_opts(&tmp, &opts)?);
    // Renaming onto an empty folder replaces it; onto a repository another process just
    // made, it fails, and that repository is the one to use.
    if std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    match Repository::open(path) {
        Ok(repo) => Ok(repo),
        // The rename failed and the folder is still empty (a mount point, say): fall back
        // to initialising in place.
        Err(e) if e.code() == GitCode::NotFound && is_empty_dir(path) => {
            Ok(Repository::init_opts(path, &opts)?)
        }
        Err(e) => Err(Box::new(e)),
    }
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Result<T, AuditError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AuditError::Task(e.to_string()))?
}

/// Another writer holds the branch's lock or moved it since we read it.
fn is_race(e: &git2::Error) -> bool {
    matches!(
        e.code(),
        GitCode::Modified | GitCode::Locked | GitCode::Exists
    )
}

fn record_bytes(record: &RequestRecord) -> Result<Vec<u8>, AuditError> {
    let mut bytes =
        serde_json::to_vec_pretty(&record.document).map_err(|e| AuditError::InvalidRecord {
            id: record.id,
            reason: e.to_string(),
        })?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn signature(record: &RequestRecord) -> Result<Signature<'static>, AuditError> {
    let invalid = |reason: String| AuditError::InvalidRecord {
        id: record.id,
        reason,
    };
    let name = record.author_name.trim();
    let email = record.author_email.trim();
    if name.is_empty() {
        return Err(invalid("the author (approver) name is empty".into()));
    }
    for (what, value) in [("name", name), ("email", email)] {
        if value.contains(['<', '>', '\n', '\r', '\0']) {
            return Err(invalid(format!(
                "the author {what} {value:?} contains `<`, `>` or a line break"
            )));
        }
    }
    Signature::now(name, email).map_err(|e| invalid(e.message().to_string()))
}

fn commit_message(record: &RequestRecord, path: &str) -> String {
    let mut message = subject_line(record.id, &record.summary);
    message.push_str("\n\n");
    let summary = record.summary.trim();
    if summary.lines().count() > 1 || summary.chars().count() > MAX_SUBJECT_CHARS {
        message.push_str(summary);
        message.push_str("\n\n");
    }
    message.push_str(&format!(
        "Record: {path}\nChiffon-Request: {}\nApproved-by: {} <{}>\n",
        record.id.hyphenated(),
        record.author_name.trim(),
        record.author_email.trim(),
    ));
    if let Some(a) = &record.anchor {
        message.push_str(&format!("{ANCHOR_TRAILER} {} {}\n", a.seq, a.hash));
    }
    // The commit is written byte for byte: a NUL in the summary (the request's own text)
    // would end the message early for some readers.
    if message.contains('\0') {
        message = message.replace('\0', "\u{FFFD}");
    }
    message
}

const ANCHOR_TRAILER: &str = "Audit-Chain:";

/// The anchor in a commit message, if it has one.
fn parse_anchor(message: &str) -> Option<ChainAnchor> {
    let line = message
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(ANCHOR_TRAILER))?;
    let mut parts = line.split_whitespace();
    let seq = parts.next()?.parse().ok()?;
    let hash = parts.next()?;
    (hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit())).then(|| ChainAnchor {
        seq,
        hash: hash.to_string(),
    })
}

/// The symbolic target of `HEAD` (the branch commits go to), even when it is unborn.
fn head_branch(repo: &Repository) -> Result<String, AuditError> {
    let head = repo
        .find_reference("HEAD")
        .map_err(AuditError::git("read HEAD"))?;
    head.symbolic_target()
        .map_err(AuditError::git("read HEAD"))?
        .map(str::to_string)
        .ok_or_else(|| {
            AuditError::Layout("HEAD is detached; it must name a branch to commit to".into())
        })
}

fn branch_tip(repo: &Repository, branch: &str) -> Result<Option<Oid>, AuditError> {
    match repo.refname_to_id(branch) {
        Ok(id) => Ok(Some(id)),
        Err(e) if e.code() == GitCode::NotFound => Ok(None),
        Err(e) => Err(AuditError::git("read branch")(e)),
    }
}

/// The blob id at `path` in `tree`, if there is one.
fn entry_id(tree: &git2::Tree<'_>, path: &str) -> Result<Option<Oid>, AuditError> {
    match tree.get_path(Path::new(path)) {
        Ok(entry) if entry.kind() == Some(ObjectType::Blob) => Ok(Some(entry.id())),
        Ok(_) => Err(AuditError::Layout(format!("{path} is not a file"))),
        Err(e) if e.code() == GitCode::NotFound => Ok(None),
        Err(e) => Err(AuditError::git("read tree")(e)),
    }
}

/// The folders a batch changes, as git stores them (a tree's raw content) with their ids:
/// the branch tip's at first, then each version the batch writes.
struct Folders<'a> {
    odb: &'a git2::Odb<'a>,
    root: Option<(Oid, Vec<u8>)>,
    requests: Option<(Oid, Vec<u8>)>,
    /// Shard folders read or written so far (`None`: not in `requests`).
    shards: std::collections::HashMap<String, Option<(Oid, Vec<u8>)>>,
}

const FILE_MODE: &[u8] = b"100644";
const DIR_MODE: &[u8] = b"40000";

impl Folders<'_> {
    fn shard(&mut self, shard: &str) -> Result<Option<&(Oid, Vec<u8>)>, AuditError> {
        if !self.shards.contains_key(shard) {
            let found = match &self.requests {
                Some((_, tree)) => tree_entry(tree, shard.as_bytes(), true)?
                    .map(|id| Ok::<_, AuditError>((id, read_tree(self.odb, id)?)))
                    .transpose()?,
                None => None,
            };
            self.shards.insert(shard.to_string(), found);
        }
        Ok(self.shards.get(shard).and_then(Option::as_ref))
    }

    /// The blob at `requests/SHARD/FILE`, if there is one.
    fn record(&mut self, shard: &str, file: &str) -> Result<Option<Oid>, AuditError> {
        match self.shard(shard)? {
            Some((_, tree)) => tree_entry(tree, file.as_bytes(), false),
            None => Ok(None),
        }
    }

    /// Adds `requests/SHARD/FILE` = `blob`: the three folders on its path get a new version
    /// each, added to `pack` (as a delta against the previous version when the pack has
    /// it). Returns the new root folder's id.
    fn insert(
        &mut self,
        pack: &mut super::pack::PackBuilder,
        shard: &str,
        file: &str,
        blob: Oid,
    ) -> Result<Oid, AuditError> {
        self.shard(shard)?;
        let old = self.shards.get_mut(shard).and_then(Option::take);
        let new = tree_with(old.as_ref(), file.as_bytes(), FILE_MODE, blob)?;
        let shard_id = add_tree(pack, &new, old.as_ref())?;
        self.shards.insert(shard.to_string(), Some((shard_id, new)));
        let old = self.requests.take();
        let new = tree_with(old.as_ref(), shard.as_bytes(), DIR_MODE, shard_id)?;
        let requests_id = add_tree(pack, &new, old.as_ref())?;
        self.requests = Some((requests_id, new));
        let old = self.root.take();
        let new = tree_with(old.as_ref(), REQUESTS_DIR.as_bytes(), DIR_MODE, requests_id)?;
        let root_id = add_tree(pack, &new, old.as_ref())?;
        self.root = Some((root_id, new));
        Ok(root_id)
    }
}

/// Adds a folder's new version to `pack`, against its `previous` one when there is one.
fn add_tree(
    pack: &mut super::pack::PackBuilder,
    tree: &[u8],
    previous: Option<&(Oid, Vec<u8>)>,
) -> Result<Oid, AuditError> {
    let base = previous.map(|(id, data)| (*id, data.as_slice()));
    pack.add(ObjectType::Tree, tree, base)
        .map_err(|e| AuditError::Git {
            context: "pack the batch",
            source: Box::new(e),
        })
}

/// The raw content of the tree `id`.
fn read_tree(odb: &git2::Odb<'_>, id: Oid) -> Result<Vec<u8>, AuditError> {
    let object = odb.read(id).map_err(AuditError::git("read tree"))?;
    if object.kind() != ObjectType::Tree {
        return Err(AuditError::Layout(format!("{id} is not a folder")));
    }
    Ok(object.data().to_vec())
}

/// One entry of a raw tree, and where it ends in the tree.
struct RawEntry<'a> {
    mode: &'a [u8],
    name: &'a [u8],
    id: Oid,
    end: usize,
}

/// The entries of a raw tree, in order (an error for a damaged one, then nothing).
fn tree_entries(tree: &[u8]) -> impl Iterator<Item = Result<RawEntry<'_>, AuditError>> {
    let damaged = || AuditError::Layout("a folder of the audit repository is damaged".into());
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= tree.len() {
            return None;
        }
        let entry = (|| {
            let space = tree[at..]
                .iter()
                .position(|&b| b == b' ')
                .ok_or_else(damaged)?
                + at;
            let nul = tree[space..]
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(damaged)?
                + space;
            let id = tree.get(nul + 1..nul + 21).ok_or_else(damaged)?;
            let id = Oid::from_bytes(id).map_err(|_| damaged())?;
            Ok(RawEntry {
                mode: &tree[at..space],
                name: &tree[space + 1..nul],
                id,
                end: nul + 21,
            })
        })();
        match &entry {
            Ok(e) => at = e.end,
            Err(_) => at = tree.len(),
        }
        Some(entry)
    })
}

/// The id of the entry `name` of a raw tree, a folder when `dir` and a file otherwise.
fn tree_entry(tree: &[u8], name: &[u8], dir: bool) -> Result<Option<Oid>, AuditError> {
    for entry in tree_entries(tree) {
        let RawEntry {
            mode,
            name: entry_name,
            id,
            ..
        } = entry?;
        if entry_name == name {
            let is_dir = mode == DIR_MODE;
            if is_dir != dir || mode == b"160000" {
                let name = String::from_utf8_lossy(name);
                return Err(AuditError::Layout(if dir {
                    format!("`{name}` is not a folder")
                } else {
                    format!("{name} is not a file")
                }));
            }
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// Git's order of tree entries: by name, a folder's name compared as if it ended in `/`.
fn git_order(a: &[u8], a_dir: bool, b: &[u8], b_dir: bool) -> std::cmp::Ordering {
    let n = a.len().min(b.len());
    a[..n].cmp(&b[..n]).then_with(|| {
        let next = |name: &[u8], dir: bool| name.get(n).copied().or(dir.then_some(b'/'));
        next(a, a_dir).cmp(&next(b, b_dir))
    })
}

/// A raw tree: `base` (or an empty one) with the entry `name` set to `id` with `mode`, in
/// git's order.
fn tree_with(
    base: Option<&(Oid, Vec<u8>)>,
    name: &[u8],
    mode: &[u8],
    id: Oid,
) -> Result<Vec<u8>, AuditError> {
    let base = base.map(|(_, t)| t.as_slice()).unwrap_or_default();
    let dir = mode == DIR_MODE;
    // Where the new entry goes, and the end of the entry it replaces.
    let mut at = base.len();
    let mut resume = base.len();
    let mut start = 0;
    for entry in tree_entries(base) {
        let RawEntry {
            mode: entry_mode,
            name: entry_name,
            end,
            ..
        } = entry?;
        if entry_name == name {
            if (entry_mode == DIR_MODE) != dir {
                return Err(AuditError::Layout(format!(
                    "`{}` is in the way of the trail's records",
                    String::from_utf8_lossy(name)
                )));
            }
            (at, resume) = (start, end);
            break;
        }
        if git_order(entry_name, entry_mode == DIR_MODE, name, dir).is_gt() {
            (at, resume) = (start, start);
            break;
        }
        start = end;
    }
    let mut out = Vec::with_capacity(base.len() + name.len() + 28);
    out.extend_from_slice(&base[..at]);
    out.extend_from_slice(mode);
    out.push(b' ');
    out.extend_from_slice(name);
    out.push(0);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&base[resume..]);
    Ok(out)
}

/// `requests/SHARD/FILE` as its shard and file names.
fn split_record_path(path: &str) -> Result<(&str, &str), AuditError> {
    let mut parts = path.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(REQUESTS_DIR), Some(shard), Some(file), None) => Ok((shard, file)),
        _ => Err(AuditError::Layout(format!("odd record path {path}"))),
    }
}

/// A signature as a commit writes it: `NAME <EMAIL> SECONDS +HHMM`.
fn signature_text(sig: &Signature<'_>) -> String {
    let when = sig.when();
    let offset = when.offset_minutes();
    format!(
        "{} <{}> {} {}{:02}{:02}",
        String::from_utf8_lossy(sig.name_bytes()),
        String::from_utf8_lossy(sig.email_bytes()),
        when.seconds(),
        if offset < 0 { '-' } else { '+' },
        offset.unsigned_abs() / 60,
        offset.unsigned_abs() % 60
    )
}

/// The commit on the first-parent chain from `tip` that added `path`: the oldest commit in
/// the unbroken run (from the tip back) whose tree has it.
fn introducing_commit(repo: &Repository, tip: Oid, path: &str) -> Result<Option<Oid>, AuditError> {
    let mut found = None;
    let mut next = Some(tip);
    while let Some(id) = next {
        let commit = repo
            .find_commit(id)
            .map_err(AuditError::git("read commit"))?;
        let tree = commit.tree().map_err(AuditError::git("read tree"))?;
        if entry_id(&tree, path)?.is_none() {
            break;
        }
        found = Some(id);
        next = commit.parent_ids().next();
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packs(counts: &[usize]) -> Vec<(PathBuf, usize)> {
        counts
            .iter()
            .enumerate()
            .map(|(i, n)| (PathBuf::from(format!("pack-{i}.idx")), *n))
            .collect()
    }

    fn names(merged: Vec<PathBuf>) -> Vec<String> {
        merged
            .into_iter()
            .map(|p| p.display().to_string())
            .collect()
    }

    #[test]
    fn a_merge_takes_the_small_packs_geometrically() {
        // 16 packs: none merged yet.
        assert!(packs_to_merge(packs(&[5; PACK_MERGE_ABOVE])).is_empty());
        // 17 of 5 objects: all of them (each holds less than twice the ones before).
        assert_eq!(packs_to_merge(packs(&[5; PACK_MERGE_ABOVE + 1])).len(), 17);
        // A pack of 1,000 beside 16 small ones holds more than twice them: left alone.
        let mut counts = vec![5; PACK_MERGE_ABOVE];
        counts.insert(3, 1000);
        let merged = names(packs_to_merge(packs(&counts)));
        assert_eq!(merged.len(), 16);
        assert!(!merged.contains(&"pack-3.idx".to_string()), "{merged:?}");
    }

    #[test]
    fn large_packs_are_never_merged_nor_counted() {
        // Large packs, however many, do not make a merge: the small ones are too few.
        let mut counts = vec![PACK_MERGE_MAX_OBJECTS; 20];
        counts.extend([5; PACK_MERGE_ABOVE]);
        assert!(packs_to_merge(packs(&counts)).is_empty());
        // With one small pack more, the small ones are merged and the large ones left as
        // they are, even where the geometric rule alone would take them.
        counts.push(5);
        counts.push(PACK_MERGE_MAX_OBJECTS + 7);
        let merged = packs_to_merge(packs(&counts));
        assert_eq!(merged.len(), PACK_MERGE_ABOVE + 1);
        let large: Vec<String> = (0..20)
            .map(|i| format!("pack-{i}.idx"))
            .chain([format!("pack-{}.idx", counts.len() - 1)])
            .collect();
        assert!(
            names(merged).iter().all(|m| !large.contains(m)),
            "a large pack is merged"
        );
        // Just under the cap, a pack still merges with its peers.
        let mut near = vec![5; PACK_MERGE_ABOVE];
        near.push(PACK_MERGE_MAX_OBJECTS - 1);
        near.push(PACK_MERGE_MAX_OBJECTS - 1);
        assert_eq!(packs_to_merge(packs(&near)).len(), PACK_MERGE_ABOVE + 2);
    }
}
