//! The git audit trail against real repositories in temporary folders, checked with the
//! `git` command line as well as through the API: one commit per request with the contract's
//! message and author, idempotent recommits, and no commit lost when threads, several
//! `GitTrail`s and several processes write to one repository at once.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};

use chiffon_core::audit::git::{record_path, AuditError, GitTrail, RequestRecord};
use chiffon_protocol::ErrorCode;
use serde_json::json;
use uuid::Uuid;

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .expect("the git command line is installed");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn record(id: Uuid, summary: &str) -> RequestRecord {
    RequestRecord {
        id,
        summary: summary.into(),
        author_name: "Alice Approver".into(),
        author_email: "alice@example.org".into(),
        anchor: None,
        document: json!({
            "id": id,
            "text": format!("{summary} please"),
            "status": "completed",
            "approver": "alice",
            "plan": { "summary": summary, "steps": [{ "action": "deploy_kuma", "parameters": { "host": "nas" } }] },
            "cost_usd": 0.0123,
            "duration_seconds": 42.5,
        }),
    }
}

fn commit_count(repo: &Path) -> usize {
    git(repo, &["rev-list", "--count", "HEAD"])
        .trim()
        .parse()
        .unwrap()
}

fn files(repo: &Path) -> BTreeSet<String> {
    git(repo, &["ls-tree", "-r", "--name-only", "HEAD"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// `git fsck` exits 0 and reports nothing broken. Dangling commits (a writer that lost the
/// race for the branch leaves its commit unreferenced) are not damage.
fn assert_fsck_clean(repo: &Path) {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["fsck", "--strict", "--no-dangling"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "git fsck failed:\n{text}");
    for bad in ["error", "broken", "missing", "bad", "warning"] {
        assert!(!text.contains(bad), "git fsck reports {bad}:\n{text}");
    }
}

fn new_trail() -> (tempfile::TempDir, GitTrail) {
    let dir = tempfile::tempdir().unwrap();
    let trail = GitTrail::open_or_init(dir.path().join("audit")).unwrap();
    (dir, trail)
}

#[test]
fn a_commit_has_the_record_the_message_and_the_approver() {
    let (_dir, trail) = new_trail();
    let repo = trail.path().to_path_buf();
    let id = Uuid::new_v4();
    let rec = record(id, "Deploy Uptime Kuma to the NAS");
    let commit = trail.commit_request(&rec).unwrap();
    assert_eq!(commit.len(), 40);
    assert!(commit.chars().all(|c| c.is_ascii_hexdigit()));

    assert_eq!(
        git(&repo, &["rev-parse", "--is-bare-repository"]).trim(),
        "true"
    );
    assert_eq!(
        git(&repo, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/main"
    );
    assert_eq!(git(&repo, &["rev-parse", "HEAD"]).trim(), commit);
    assert_eq!(
        git(&repo, &["log", "--format=%s"]).trim(),
        format!("infra({id}): Deploy Uptime Kuma to the NAS")
    );
    assert_eq!(
        git(&repo, &["log", "-1", "--format=%an <%ae>|%cn"]).trim(),
        "Alice Approver <alice@example.org>|chiffon"
    );
    let body = git(&repo, &["log", "-1", "--format=%b"]);
    assert!(body.contains(&format!("Chiffon-Request: {id}")), "{body}");
    assert!(
        body.contains("Approved-by: Alice Approver <alice@example.org>"),
        "{body}"
    );

    let path = record_path(id);
    let id_text = id.to_string();
    // Sharded by a hash of the id (UUIDv7 prefixes are all alike).
    use sha2::Digest;
    let shard = hex::encode(&sha2::Sha256::digest(id_text.as_bytes())[..1]);
    assert_eq!(path, format!("requests/{shard}/{id_text}.json"));
    assert_eq!(files(&repo), BTreeSet::from([path.clone()]));
    let stored = git(&repo, &["show", &format!("HEAD:{path}")]);
    assert!(
        stored.contains("\n  \""),
        "the record is pretty-printed: {stored}"
    );
    assert!(stored.ends_with("}\n"));
    let parsed: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(parsed, rec.document);

    assert_eq!(trail.find_commit_for(id).unwrap(), Some(commit.clone()));
    assert_eq!(
        trail.log(10).unwrap(),
        vec![(
            commit,
            format!("infra({id}): Deploy Uptime Kuma to the NAS")
        )]
    );
    assert_fsck_clean(&repo);
}

#[test]
fn the_summary_is_trimmed_to_one_line_and_kept_whole_in_the_body() {
    let (_dir, trail) = new_trail();
    let id = Uuid::new_v4();
    let summary = "\n   Restart   nginx on web1\nbecause the config changed\n";
    trail.commit_request(&record(id, summary)).unwrap();
    let repo = trail.path();
    assert_eq!(
        git(repo, &["log", "-1", "--format=%s"]).trim(),
        format!("infra({id}): Restart nginx on web1")
    );
    assert!(git(repo, &["log", "-1", "--format=%b"]).contains("because the config changed"));

    let long = "word ".repeat(60);
    let id2 = Uuid::new_v4();
    trail.commit_request(&record(id2, &long)).unwrap();
    let subject = git(repo, &["log", "-1", "--format=%s"]);
    let summary_part = subject
        .trim()
        .strip_prefix(&format!("infra({id2}): "))
        .unwrap();
    assert!(summary_part.chars().count() <= 120, "{subject}");
    assert!(summary_part.ends_with('…'));

    let id3 = Uuid::new_v4();
    trail.commit_request(&record(id3, "   ")).unwrap();
    assert_eq!(
        git(repo, &["log", "-1", "--format=%s"]).trim(),
        format!("infra({id3}): (no summary)")
    );

    // A NUL in the summary (the request's own text) is data, not the message's end: the
    // commit is written whole, with U+FFFD in its place, and the repository stays sound.
    let id4 = Uuid::new_v4();
    trail
        .commit_request(&record(id4, "restart nginx\0 on web1\nand\0more"))
        .unwrap();
    let body = git(repo, &["log", "-1", "--format=%B"]);
    assert!(body.contains("restart nginx\u{FFFD} on web1"), "{body}");
    assert!(body.contains(&format!("Chiffon-Request: {id4}")), "{body}");
    assert_fsck_clean(repo);
}

#[test]
fn recommitting_the_same_request_returns_the_existing_commit() {
    let (_dir, trail) = new_trail();
    let repo = trail.path().to_path_buf();
    let first = record(Uuid::new_v4(), "first");
    let c1 = trail.commit_request(&first).unwrap();
    assert_eq!(trail.commit_request(&first).unwrap(), c1);
    assert_eq!(commit_count(&repo), 1);

    let c2 = trail
        .commit_request(&record(Uuid::new_v4(), "second"))
        .unwrap();
    assert_ne!(c1, c2);
    // The first request's commit is found below the tip, not the tip itself.
    assert_eq!(trail.commit_request(&first).unwrap(), c1);
    assert_eq!(commit_count(&repo), 2);
    assert_eq!(trail.find_commit_for(first.id).unwrap(), Some(c1.clone()));

    // A different record under the same id is refused, naming the existing commit.
    let mut changed = first.clone();
    changed.document["status"] = json!("failed");
    match trail.commit_request(&changed) {
        Err(e @ AuditError::RecordDiffers { .. }) => {
            assert_eq!(e.code(), ErrorCode::Conflict);
            assert!(!e.is_transient());
            match e {
                AuditError::RecordDiffers { id, commit } => {
                    assert_eq!(id, first.id);
                    assert_eq!(commit, c1);
                }
                _ => unreachable!(),
            }
        }
        other => panic!("expected RecordDiffers, got {other:?}"),
    }
    assert_eq!(commit_count(&repo), 2);
    assert_fsck_clean(&repo);
}

#[test]
fn invalid_authors_are_refused_and_nothing_is_written() {
    let (_dir, trail) = new_trail();
    for (name, email) in [
        ("", "a@b"),
        ("   ", "a@b"),
        ("Eve <root>", "a@b"),
        ("Eve", "a@b>\nSigned-off-by: x"),
    ] {
        let mut rec = record(Uuid::new_v4(), "x");
        rec.author_name = name.into();
        rec.author_email = email.into();
        let err = trail.commit_request(&rec).unwrap_err();
        assert!(matches!(err, AuditError::InvalidRecord { .. }), "{err:?}");
        assert_eq!(err.code(), ErrorCode::AuditRecordInvalid);
        assert_eq!(err.code().code(), 5703);
    }
    assert!(trail.log(10).unwrap().is_empty());
    assert!(trail.find_commit_for(Uuid::new_v4()).unwrap().is_none());
}

#[test]
fn verify_finds_missing_requests() {
    let (_dir, trail) = new_trail();
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    // An empty repository has none of them.
    assert_eq!(trail.verify(&ids).unwrap(), ids);
    for (i, id) in ids.iter().enumerate() {
        if i % 2 == 0 {
            trail
                .commit_request(&record(*id, &format!("request {i}")))
                .unwrap();
        }
    }
    assert_eq!(trail.verify(&ids).unwrap(), vec![ids[1], ids[3], ids[5]]);
    assert_eq!(trail.verify(&[ids[0], ids[2]]).unwrap(), Vec::<Uuid>::new());
    assert_eq!(trail.verify(&[]).unwrap(), Vec::<Uuid>::new());
    assert_eq!(trail.find_commit_for(ids[1]).unwrap(), None);
    assert!(trail.find_commit_for(ids[4]).unwrap().is_some());
}

#[test]
fn log_is_newest_first_and_limited() {
    let (_dir, trail) = new_trail();
    let mut made = Vec::new();
    for i in 0..5 {
        let id = Uuid::new_v4();
        made.push((
            trail
                .commit_request(&record(id, &format!("step {i}")))
                .unwrap(),
            id,
        ));
    }
    let log = trail.log(3).unwrap();
    assert_eq!(log.len(), 3);
    for (entry, (commit, id)) in log.iter().zip(made.iter().rev()) {
        assert_eq!(&entry.0, commit);
        assert!(entry.1.starts_with(&format!("infra({id}): step ")));
    }
    assert_eq!(trail.log(100).unwrap().len(), 5);
    assert!(trail.log(0).unwrap().is_empty());
    // The CLI agrees, commit by commit.
    let cli: Vec<String> = git(trail.path(), &["log", "--format=%H %s"])
        .lines()
        .map(str::to_string)
        .collect();
    let api: Vec<String> = trail
        .log(100)
        .unwrap()
        .into_iter()
        .map(|(c, s)| format!("{c} {s}"))
        .collect();
    assert_eq!(cli, api);
}

/// Checks a repository that `writers × per_writer` distinct requests were committed to.
fn assert_all_present(repo: &Path, trail: &GitTrail, ids: &[Uuid], commits: &HashSet<String>) {
    assert_eq!(commit_count(repo), ids.len(), "commits were lost");
    let history: HashSet<String> = git(repo, &["rev-list", "HEAD"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        &history, commits,
        "history differs from the commits returned"
    );
    let expected: BTreeSet<String> = ids.iter().map(|id| record_path(*id)).collect();
    assert_eq!(files(repo), expected);
    assert!(trail.verify(ids).unwrap().is_empty());
    // History is linear: every commit has at most one parent.
    assert_eq!(git(repo, &["rev-list", "--merges", "HEAD"]).trim(), "");
    let subjects = git(repo, &["log", "--format=%s"]);
    for id in ids {
        assert!(
            subjects.contains(&format!("infra({id}): ")),
            "no commit for {id}"
        );
    }
    assert_fsck_clean(repo);
}

#[test]
fn four_threads_with_their_own_handles_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let path = path.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                // Each thread opens its own `GitTrail`: they coordinate only through the
                // branch's compare-and-swap, as separate processes would.
                // Opened concurrently on a path that does not exist yet: the repository
                // must appear once, whole. Unwrapped after the barrier so that a failure
                // cannot leave the other threads waiting forever.
                let trail = GitTrail::open_or_init(&path);
                barrier.wait();
                let trail = trail.unwrap();
                (0..25)
                    .map(|i| {
                        let id = Uuid::new_v4();
                        let commit = trail
                            .commit_request(&record(id, &format!("thread {t} request {i}")))
                            .unwrap();
                        (id, commit)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(Uuid, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let ids: Vec<Uuid> = results.iter().map(|(id, _)| *id).collect();
    let commits: HashSet<String> = results.iter().map(|(_, c)| c.clone()).collect();
    assert_eq!(commits.len(), 100);
    let trail = GitTrail::open_or_init(&path).unwrap();
    assert_all_present(&path, &trail, &ids, &commits);
    for (id, commit) in &results {
        assert_eq!(trail.find_commit_for(*id).unwrap().as_ref(), Some(commit));
    }
}

#[test]
fn four_threads_sharing_one_handle_lose_nothing() {
    let (_dir, trail) = new_trail();
    let trail = Arc::new(trail);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let trail = Arc::clone(&trail);
            std::thread::spawn(move || {
                (0..25)
                    .map(|i| {
                        let id = Uuid::new_v4();
                        (
                            id,
                            trail
                                .commit_request(&record(id, &format!("{t}/{i}")))
                                .unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(Uuid, String)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let ids: Vec<Uuid> = results.iter().map(|(id, _)| *id).collect();
    let commits: HashSet<String> = results.into_iter().map(|(_, c)| c).collect();
    assert_all_present(trail.path(), &trail, &ids, &commits);
}

#[test]
fn two_trails_on_one_path_interleave_and_race() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let a = Arc::new(GitTrail::open_or_init(&path).unwrap());
    let b = Arc::new(GitTrail::open_or_init(&path).unwrap());
    let mut ids = Vec::new();
    let mut commits = HashSet::new();
    // Alternating: each sees the other's commits as its parent.
    for i in 0..6 {
        let trail = if i % 2 == 0 { &a } else { &b };
        let id = Uuid::new_v4();
        commits.insert(
            trail
                .commit_request(&record(id, &format!("alternating {i}")))
                .unwrap(),
        );
        ids.push(id);
    }
    // The same request from both instances at once: one commit, both get its id.
    let shared = record(Uuid::new_v4(), "submitted by both instances");
    let barrier = Arc::new(Barrier::new(2));
    let racers: Vec<_> = [Arc::clone(&a), Arc::clone(&b)]
        .into_iter()
        .map(|trail| {
            let shared = shared.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                trail.commit_request(&shared).unwrap()
            })
        })
        .collect();
    let got: Vec<String> = racers.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got[0], got[1], "one request, one commit");
    commits.insert(got[0].clone());
    ids.push(shared.id);
    // And many distinct ones at once.
    let writers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, trail)| {
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| {
                        let id = Uuid::new_v4();
                        (
                            id,
                            trail
                                .commit_request(&record(id, &format!("{w}:{i}")))
                                .unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (id, commit) in writers.into_iter().flat_map(|h| h.join().unwrap()) {
        ids.push(id);
        commits.insert(commit);
    }
    assert_all_present(&path, &a, &ids, &commits);
    assert_eq!(a.log(1000).unwrap(), b.log(1000).unwrap());
}

const CHILD_REPO: &str = "CHIFFON_AUDIT_GIT_CHILD_REPO";
const CHILD_COUNT: usize = 15;

/// Run by `several_processes_lose_nothing` in child processes; does nothing on its own.
#[test]
#[ignore = "helper: run in child processes by several_processes_lose_nothing"]
fn helper_child_process_writer() {
    let Ok(path) = std::env::var(CHILD_REPO) else {
        return;
    };
    let trail = GitTrail::open_or_init(&path).unwrap();
    for i in 0..CHILD_COUNT {
        let id = Uuid::new_v4();
        let commit = trail
            .commit_request(&record(
                id,
                &format!("process {} request {i}", std::process::id()),
            ))
            .unwrap();
        println!("COMMITTED {id} {commit}");
    }
}

#[test]
fn several_processes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "helper_child_process_writer",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                ])
                .args(["--test-threads", "1"])
                .env(CHILD_REPO, &path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    let mut commits = HashSet::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.split_once("COMMITTED ").map(|(_, rest)| rest))
            .collect();
        assert_eq!(lines.len(), CHILD_COUNT, "child output:\n{stdout}");
        for line in lines {
            let (id, commit) = line.split_once(' ').unwrap();
            ids.push(id.parse().unwrap());
            commits.insert(commit.to_string());
        }
    }
    let trail = GitTrail::open_or_init(&path).unwrap();
    assert_all_present(&path, &trail, &ids, &commits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_wrappers_run_on_the_blocking_pool() {
    let (_dir, trail) = new_trail();
    let trail = Arc::new(trail);
    let records: Vec<RequestRecord> = (0..20)
        .map(|i| record(Uuid::new_v4(), &format!("async {i}")))
        .collect();
    let tasks: Vec<_> = records
        .iter()
        .cloned()
        .map(|r| {
            let trail = Arc::clone(&trail);
            tokio::spawn(async move { trail.commit_request_async(r).await })
        })
        .collect();
    let mut commits = HashSet::new();
    for t in tasks {
        commits.insert(t.await.unwrap().unwrap());
    }
    let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
    assert_eq!(commits.len(), 20);
    assert!(trail.verify_async(ids.clone()).await.unwrap().is_empty());
    assert_eq!(trail.log_async(100).await.unwrap().len(), 20);
    let found = trail.find_commit_for_async(ids[0]).await.unwrap().unwrap();
    assert!(commits.contains(&found));
    assert_all_present(trail.path(), &trail, &ids, &commits);
}

#[test]
fn an_existing_repository_is_reused_on_its_own_branch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("existing");
    std::fs::create_dir(&path).unwrap();
    git(&path, &["-c", "init.defaultBranch=trunk", "init", "-q"]);
    std::fs::write(path.join("README"), "audit trail\n").unwrap();
    git(&path, &["add", "README"]);
    git(
        &path,
        &[
            "-c",
            "user.name=Setup",
            "-c",
            "user.email=setup@example.org",
            "commit",
            "-q",
            "-m",
            "initial",
        ],
    );
    let trail = GitTrail::open_or_init(&path).unwrap();
    let id = Uuid::new_v4();
    let commit = trail
        .commit_request(&record(id, "on top of a human commit"))
        .unwrap();
    assert_eq!(
        git(&path, &["rev-parse", "refs/heads/trunk"]).trim(),
        commit
    );
    assert_eq!(commit_count(&path), 2);
    // The earlier content is kept alongside the record.
    assert_eq!(
        files(&path),
        BTreeSet::from(["README".to_string(), record_path(id)])
    );
    // Reopening with a second instance sees the same history.
    let again = GitTrail::open_or_init(&path).unwrap();
    assert_eq!(again.find_commit_for(id).unwrap(), Some(commit));
    assert_fsck_clean(&path);
}

#[test]
fn a_folder_with_other_content_is_not_turned_into_a_repository() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a repo").unwrap();
    let err = GitTrail::open_or_init(dir.path()).unwrap_err();
    assert!(matches!(err, AuditError::Open { .. }), "{err:?}");
    assert_eq!(err.code(), ErrorCode::GitCommitFailed);
    assert!(!dir.path().join("HEAD").exists());

    // An empty folder, or a missing one with missing parents, is created.
    let empty = tempfile::tempdir().unwrap();
    GitTrail::open_or_init(empty.path()).unwrap();
    assert!(empty.path().join("HEAD").exists());
    let nested = dir.path().join("a/b/c");
    GitTrail::open_or_init(&nested).unwrap();
    assert_eq!(
        git(&nested, &["rev-parse", "--is-bare-repository"]).trim(),
        "true"
    );
}

#[test]
fn records_share_shard_folders_without_overwriting_each_other() {
    let (_dir, trail) = new_trail();
    // Forty fixed ids over 256 hash shards: some share a folder.
    let ids: Vec<Uuid> = (0..40u128).map(Uuid::from_u128).collect();
    for id in &ids {
        trail.commit_request(&record(*id, "shard")).unwrap();
    }
    let listed = git(
        trail.path(),
        &["ls-tree", "--name-only", "HEAD", "requests/"],
    );
    let shards: Vec<&str> = listed.lines().collect();
    assert!(shards.len() < 40, "some records share a shard: {shards:?}");
    assert!(shards
        .iter()
        .all(|s| s.len() == "requests/ab".len() && s[9..].chars().all(|c| c.is_ascii_hexdigit())));
    assert_eq!(files(trail.path()).len(), 40);
    assert!(trail.verify(&ids).unwrap().is_empty());
}

#[test]
fn a_stale_lock_is_cleared_and_a_fresh_one_kept() {
    let (_dir, trail) = new_trail();
    trail
        .commit_request(&record(Uuid::new_v4(), "before"))
        .unwrap();
    let lock = trail.path().join("refs/heads/main.lock");
    std::fs::write(&lock, "").unwrap();
    // Young: a live writer may hold it.
    assert!(trail
        .clear_stale_locks(std::time::Duration::from_secs(3600))
        .is_empty());
    assert!(lock.exists());
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    std::fs::File::options()
        .write(true)
        .open(&lock)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(
        trail.clear_stale_locks(std::time::Duration::from_secs(10)),
        vec![lock.clone()]
    );
    trail
        .commit_request(&record(Uuid::new_v4(), "after"))
        .unwrap();
    assert_eq!(commit_count(trail.path()), 2);
}

#[test]
fn verify_records_catches_amends_and_rewritten_history() {
    use chiffon_core::audit::git::{record_digest, ExpectedRecord};
    let (_dir, trail) = new_trail();
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    let ra = record(a, "first");
    let rb = record(b, "second");
    let ca = trail.commit_request(&ra).unwrap();
    let cb = trail.commit_request(&rb).unwrap();
    let expect = |id, commit: &str, r: &RequestRecord| ExpectedRecord {
        id,
        commit: commit.to_string(),
        digest: Some(record_digest(r).unwrap()),
    };
    let both = [expect(a, &ca, &ra), expect(b, &cb, &rb)];
    assert!(trail.verify_records(&both).unwrap().is_empty());
    // A writer of the repository amends `a`'s record in a new commit on top.
    let repo = git2::Repository::open(trail.path()).unwrap();
    let tip = repo.head().unwrap().peel_to_commit().unwrap();
    let mut idx = git2::Index::new().unwrap();
    idx.read_tree(&tip.tree().unwrap()).unwrap();
    let blob = repo.blob(b"{\"id\": \"forged\"}\n").unwrap();
    let mut entry = idx
        .get_path(std::path::Path::new(&record_path(a)), 0)
        .unwrap();
    entry.id = blob;
    idx.add(&entry).unwrap();
    let tree = repo.find_tree(idx.write_tree_to(&repo).unwrap()).unwrap();
    let sig = git2::Signature::now("mallory", "m@x").unwrap();
    repo.commit(Some("HEAD"), &sig, &sig, "tidy", &tree, &[&tip])
        .unwrap();
    let problems = trail.verify_records(&both).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].id, a);
    assert!(
        problems[0].reason.contains("changed after it was written"),
        "{problems:?}"
    );
    // History rewritten: the branch reset to before `b` and `b` re-made elsewhere.
    let first = repo.find_commit(git2::Oid::from_str(&ca).unwrap()).unwrap();
    repo.reference("refs/heads/main", first.id(), true, "force")
        .unwrap();
    trail
        .commit_request(&record(Uuid::new_v4(), "inserted"))
        .unwrap();
    let cb2 = trail.commit_request(&rb).unwrap();
    assert_ne!(cb2, cb);
    let problems = trail.verify_records(&[expect(b, &cb, &rb)]).unwrap();
    assert!(
        problems[0].reason.contains("not in the branch's history"),
        "{problems:?}"
    );
    // A stored id no commit has, and one that is no commit id at all.
    let problems = trail
        .verify_records(&[
            expect(b, &"7".repeat(40), &rb),
            expect(b, "not-a-commit", &rb),
            expect(b, &cb2, &rb),
        ])
        .unwrap();
    let reasons: Vec<&str> = problems.iter().map(|p| p.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "its stored commit does not exist",
            "its stored commit id is not a commit id"
        ]
    );
}

/// `audit verify` reads the branch's history once and checks page after page of requests
/// against it; what reading cached is let go afterwards, and the trail goes on as before.
#[test]
fn pages_of_records_are_checked_against_one_history_read() {
    use chiffon_core::audit::git::{record_digest, ExpectedRecord};
    let (_dir, trail) = new_trail();
    let records: Vec<RequestRecord> = (0..6)
        .map(|i| record(Uuid::now_v7(), &format!("request {i}")))
        .collect();
    let commits: Vec<String> = trail
        .commit_batch(&records)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let expected: Vec<ExpectedRecord> = records
        .iter()
        .zip(&commits)
        .map(|(r, c)| ExpectedRecord {
            id: r.id,
            commit: c.clone(),
            digest: Some(record_digest(r).unwrap()),
        })
        .collect();
    // The last record's commit is taken off the branch and re-made elsewhere.
    let repo = git2::Repository::open(trail.path()).unwrap();
    let before_last = repo
        .find_commit(git2::Oid::from_str(&commits[4]).unwrap())
        .unwrap();
    repo.reference("refs/heads/main", before_last.id(), true, "force")
        .unwrap();
    trail
        .commit_request(&record(Uuid::now_v7(), "inserted"))
        .unwrap();
    assert_ne!(trail.commit_request(&records[5]).unwrap(), commits[5]);
    let history = trail.history().unwrap();
    for page in expected[..5].chunks(2) {
        assert!(trail.verify_records_in(&history, page).unwrap().is_empty());
    }
    let problems = trail.verify_records_in(&history, &expected[5..]).unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].reason.contains("not in the branch's history"),
        "{problems:?}"
    );
    trail.release_caches().unwrap();
    let after = record(Uuid::now_v7(), "after the release");
    let commit = trail.commit_request(&after).unwrap();
    let page = [ExpectedRecord {
        id: after.id,
        commit,
        digest: Some(record_digest(&after).unwrap()),
    }];
    assert!(trail.verify_records(&page).unwrap().is_empty());
    assert_fsck_clean(trail.path());
}

#[test]
fn the_chain_head_is_anchored_in_commit_messages() {
    use chiffon_core::audit::git::ChainAnchor;
    let (_dir, trail) = new_trail();
    assert_eq!(trail.latest_anchor(10).unwrap(), None);
    let mut r = record(Uuid::new_v4(), "anchored");
    let hash = "ab".repeat(32);
    r.anchor = Some(ChainAnchor {
        seq: 42,
        hash: hash.clone(),
    });
    trail.commit_request(&r).unwrap();
    trail
        .commit_request(&record(Uuid::new_v4(), "plain"))
        .unwrap();
    let body = git(trail.path(), &["log", "-2", "--format=%B"]);
    assert!(body.contains(&format!("Audit-Chain: 42 {hash}")), "{body}");
    assert_eq!(
        trail.latest_anchor(10).unwrap(),
        Some(ChainAnchor { seq: 42, hash })
    );
}

#[test]
fn a_stale_lock_gives_a_clear_error_not_a_hang() {
    let (_dir, trail) = new_trail();
    trail
        .commit_request(&record(Uuid::new_v4(), "before the crash"))
        .unwrap();
    // What a writer that died while moving the branch leaves behind.
    let lock = trail.path().join("refs/heads/main.lock");
    std::fs::write(&lock, "").unwrap();
    let err = trail
        .commit_request(&record(Uuid::new_v4(), "blocked"))
        .unwrap_err();
    match &err {
        AuditError::Contention { last_error, .. } => {
            assert!(last_error.contains("main.lock"), "{last_error}")
        }
        other => panic!("expected Contention, got {other:?}"),
    }
    assert_eq!(err.code(), ErrorCode::GitCommitFailed);
    assert!(err.is_transient());
    assert!(err.to_string().contains("main.lock"), "{err}");
    assert_eq!(commit_count(trail.path()), 1);
    // Once the lock is gone, commits go through again.
    std::fs::remove_file(&lock).unwrap();
    trail
        .commit_request(&record(Uuid::new_v4(), "after"))
        .unwrap();
    assert_eq!(commit_count(trail.path()), 2);
    assert_fsck_clean(trail.path());
}

/// What a pack index (v2) says its pack holds: the object count.
fn pack_objects(idx: &Path) -> usize {
    let bytes = std::fs::read(idx).unwrap();
    assert_eq!(&bytes[..4], b"\xfftOc");
    u32::from_be_bytes(bytes[1028..1032].try_into().unwrap()) as usize
}

/// A batch's pack holds what the batch wrote (a blob, three trees, a commit per record),
/// not the whole tree again, and small packs are merged as they come: after many batches
/// there are a handful of packs holding each object about once, so a batch's work does not
/// grow with the trail's history. The merged repository is whole (`git fsck`) and every
/// record is still found.
#[test]
fn packs_hold_each_batch_once_and_stay_few_as_history_grows() {
    let (dir, trail) = new_trail();
    let repo = dir.path().join("audit");
    let mut ids = Vec::new();
    let mut commits = HashSet::new();
    for i in 0..300 {
        let batch: Vec<RequestRecord> = (0..1 + i % 3)
            .map(|_| record(Uuid::now_v7(), "deploy uptime kuma"))
            .collect();
        for (r, c) in batch.iter().zip(trail.commit_batch(&batch)) {
            ids.push(r.id);
            commits.insert(c.unwrap());
        }
    }
    let packs: Vec<PathBuf> = std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    let objects: usize = packs.iter().map(|p| pack_objects(p)).sum();
    // 600 records: at most 5 objects each (records in one shard share a shard tree).
    assert!(
        objects <= 5 * ids.len(),
        "{objects} objects in {} packs for {} records: packs repeat objects",
        packs.len(),
        ids.len()
    );
    // Merged geometrically once there are more than 16: never more (see PACK_MERGE_ABOVE).
    assert!(
        packs.len() <= 16,
        "{} packs after 300 batches: small packs are not merged",
        packs.len()
    );
    assert_eq!(commit_count(&repo), ids.len());
    assert_fsck_clean(&repo);
    assert_all_present(&repo, &trail, &ids, &commits);
}

/// Writes `objects` (ids, one per line) as a pack of git's own making into the trail, with
/// offset deltas as `git repack` writes them, and returns its index's path.
fn git_pack(repo: &Path, objects: &str) -> PathBuf {
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["pack-objects", "--delta-base-offset", "objects/pack/pack"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), objects.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let name = String::from_utf8(out.stdout).unwrap();
    repo.join(format!("objects/pack/pack-{}.idx", name.trim()))
}

/// A new trail with three records committed: its folder, the trail, the repository, the
/// records' ids and their commits.
fn trail_with_three_records() -> (
    tempfile::TempDir,
    GitTrail,
    std::path::PathBuf,
    Vec<Uuid>,
    HashSet<String>,
) {
    let (dir, trail) = new_trail();
    let repo = dir.path().join("audit");
    let mut ids = Vec::new();
    let mut commits = HashSet::new();
    for _ in 0..3 {
        let r = record(Uuid::now_v7(), "deploy uptime kuma");
        commits.insert(trail.commit_request(&r).unwrap());
        ids.push(r.id);
    }
    (dir, trail, repo, ids, commits)
}

/// Commits batches until the pack `idx` has been merged into another (and is gone).
fn batches_until_merged(
    trail: &GitTrail,
    idx: &Path,
    ids: &mut Vec<Uuid>,
    commits: &mut HashSet<String>,
) {
    for _ in 0..200 {
        if !idx.exists() {
            return;
        }
        let r = record(Uuid::now_v7(), "deploy uptime kuma");
        commits.insert(trail.commit_request(&r).unwrap());
        ids.push(r.id);
    }
    panic!("{} was never merged", idx.display());
}

/// Merging copies packs' entries as they are, git's own offset deltas included (a pack
/// someone else wrote into the trail): every object stays readable and the repository whole.
#[test]
fn packs_with_offset_deltas_are_merged_whole() {
    let (dir, trail, repo, mut ids, mut commits) = trail_with_three_records();
    // Similar blobs, so that git deltifies them against each other.
    let base: String = (0..200).map(|i| format!("line {i} of a note\n")).collect();
    let blobs: Vec<String> = (0..12)
        .map(|i| {
            let path = dir.path().join(format!("note-{i}"));
            std::fs::write(&path, format!("{base}edit {i}\n")).unwrap();
            git(&repo, &["hash-object", "-w", path.to_str().unwrap()])
                .trim()
                .to_string()
        })
        .collect();
    let idx = git_pack(&repo, &(blobs.join("\n") + "\n"));
    git(&repo, &["prune-packed"]);
    let verify = git(&repo, &["verify-pack", "-v", idx.to_str().unwrap()]);
    assert!(
        verify.lines().any(|l| l.split_whitespace().count() >= 7),
        "git wrote no deltas, nothing to test:\n{verify}"
    );
    batches_until_merged(&trail, &idx, &mut ids, &mut commits);
    for b in &blobs {
        git(&repo, &["cat-file", "-e", b]);
    }
    assert_fsck_clean(&repo);
    assert_all_present(&repo, &trail, &ids, &commits);
}

/// An object in two packs (as a batch rebuilt after a lost race leaves it) is merged once:
/// the merge does not fail on the duplicate, and nothing is lost.
#[test]
fn an_object_in_two_packs_is_merged_once() {
    let (_dir, trail, repo, mut ids, mut commits) = trail_with_three_records();
    // Every object of the branch again, in a pack of its own.
    let objects = git(&repo, &["rev-list", "--objects", "HEAD"]);
    let idx = git_pack(&repo, &objects);
    batches_until_merged(&trail, &idx, &mut ids, &mut commits);
    assert_fsck_clean(&repo);
    assert_all_present(&repo, &trail, &ids, &commits);
}

/// The trail writes its packs and their indexes itself (folders as deltas against their
/// previous version in the batch, merges by concatenation): each index is byte for byte the
/// one `git index-pack` makes of the pack, no delta chain is longer than git's default 50,
/// and the repository is whole with every record readable by git, after a large batch (one
/// folder changed 300 times in it) and enough small ones to merge packs.
#[test]
fn the_trails_own_packs_are_what_git_itself_indexes() {
    let (dir, trail) = new_trail();
    let repo = dir.path().join("audit");
    let mut ids = Vec::new();
    let mut commits = HashSet::new();
    let mut batches: Vec<Vec<RequestRecord>> = vec![(0..300)
        .map(|i| record(Uuid::now_v7(), &format!("deploy uptime kuma #{i}")))
        .collect()];
    batches.extend((0..40).map(|i| {
        (0..1 + i % 3)
            .map(|_| record(Uuid::now_v7(), "restart the nas"))
            .collect()
    }));
    for batch in &batches {
        for (r, c) in batch.iter().zip(trail.commit_batch(batch)) {
            ids.push(r.id);
            commits.insert(c.unwrap());
        }
    }
    let packs: Vec<PathBuf> = std::fs::read_dir(repo.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    assert!(packs.len() <= 16, "{} packs: none merged", packs.len());
    let mut chains = 0;
    for pack in &packs {
        let ours = std::fs::read(pack.with_extension("idx")).unwrap();
        let theirs = dir.path().join("git.idx");
        git(
            &repo,
            &[
                "index-pack",
                "-o",
                theirs.to_str().unwrap(),
                pack.to_str().unwrap(),
            ],
        );
        assert!(
            std::fs::read(&theirs).unwrap() == ours,
            "git indexes {} differently",
            pack.display()
        );
        std::fs::remove_file(&theirs).unwrap();
        let verify = git(&repo, &["verify-pack", "-v", pack.to_str().unwrap()]);
        for line in verify.lines() {
            if let Some(n) = line.strip_prefix("chain length = ") {
                let n: usize = n.split(':').next().unwrap().trim().parse().unwrap();
                assert!(n <= 50, "a delta chain of {n}:\n{verify}");
                chains += 1;
            }
        }
    }
    assert!(
        chains > 0,
        "no deltas written: the folders are stored whole"
    );
    assert_eq!(commit_count(&repo), ids.len());
    assert_fsck_clean(&repo);
    assert_all_present(&repo, &trail, &ids, &commits);
    // Every record reads back as written, through git.
    for batch in &batches {
        for r in batch.iter().step_by(7) {
            let shown = git(&repo, &["show", &format!("HEAD:{}", record_path(r.id))]);
            let doc: serde_json::Value = serde_json::from_str(&shown).unwrap();
            assert_eq!(doc, r.document);
        }
    }
}
