//! The few system calls the executor needs that std does not offer: signalling a whole
//! process group and reaping a child with its resource usage (`wait4`).
#![allow(unsafe_code)]

use crate::agent::ChildUsage;

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitKind {
    Code(i32),
    Signal(i32),
}

/// Sends `signal` to every process of the group `pgid`. Errors (group already gone) are
/// ignored: the caller only needs the group to be gone afterwards.
pub(crate) fn kill_group(pgid: u32, signal: i32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: killpg takes plain integers and has no memory-safety preconditions.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

/// Fault injection for the crash tests: with `CHIFFON_AGENT_FAILPOINT=NAME` in the
/// environment, the agent dies by SIGKILL (no cleanup, no ack, like `kill -9`) when it
/// reaches the point `NAME`. Points: `before_publish` (the step ran and its result is in the
/// ledger, nothing sent yet) and `before_ack` (the result is published and confirmed, the
/// request not acked). Unset in normal use; read once.
pub(crate) fn failpoint(name: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("CHIFFON_AGENT_FAILPOINT").ok());
    if point.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint reached: killing this process");
        // SAFETY: kill and getpid take plain integers and have no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// The name of the environment variable that marks every process of one playbook run.
pub(crate) const PLAY_MARKER: &str = "CHIFFON_PLAY";

/// Sends `signal` to the group `pgid` and to every process whose environment carries
/// `CHIFFON_PLAY=marker`. ansible-core's workers call `setsid()`, so they (and the modules
/// they run) leave the playbook's group; they keep its environment, which is how they are
/// found, even after their parent died and they were reparented.
pub(crate) fn kill_play(pgid: u32, marker: &str, signal: i32) {
    kill_group(pgid, signal);
    kill_marked(marker, signal);
}

/// Sends `signal` to every process (but this one) whose environment carries
/// `CHIFFON_PLAY=marker`; nothing for an empty marker.
pub(crate) fn kill_marked(marker: &str, signal: i32) {
    if marker.is_empty() {
        return;
    }
    let needle = format!("{PLAY_MARKER}={marker}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let Ok(pid) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill takes plain integers and has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
}

/// Blocks until child `pid` exits and reaps it, returning its exit and resource usage.
///
/// `ru_utime + ru_stime` covers the child and every descendant it waited for (ansible's
/// workers); `ru_maxrss` is the peak resident set of the largest single process among them,
/// not the sum of concurrent ones (a lower bound of the tree's peak, which is what Linux
/// records).
pub(crate) fn wait_child(pid: u32) -> std::io::Result<(ExitKind, ChildUsage)> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; zeroed is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: the pointers are to live locals of the right types.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let exit = if libc::WIFEXITED(status) {
        ExitKind::Code(libc::WEXITSTATUS(status))
    } else {
        ExitKind::Signal(libc::WTERMSIG(status))
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        exit,
        ChildUsage {
            cpu_seconds: secs(usage.ru_utime) + secs(usage.ru_stime),
            // Linux reports ru_maxrss in KiB.
            peak_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
        },
    ))
}

/// Whether any process is still in group `pgid` (scans /proc; Linux only).
pub fn process_group_alive(pgid: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| {
            // Fields after the `(comm)`: state ppid pgrp …
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let pgrp = f.nth(1).and_then(|p| p.parse::<u32>().ok());
            pgrp == Some(pgid) && state != Some("Z")
        })
}

/// The start time of process `pid` (clock ticks since boot, `/proc/PID/stat` field 22):
/// with the pid, it names one process even after the pid is reused.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // After `(comm)`: state is field 3, starttime field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether a live process of group `pgid` runs a command line containing `needle`.
pub(crate) fn group_runs(pgid: u32, needle: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .any(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                return false;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let pgrp = f.nth(1).and_then(|p| p.parse::<u32>().ok());
            pgrp == Some(pgid)
                && state != Some("Z")
                && std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
}
