//! Real etcd members for the etcd backend's tests: started on loopback with data directories of
//! their own (under the test's directory), stopped and removed when dropped. Needs `etcd` and
//! `etcdctl` on PATH (Debian: etcd-server, etcd-client; `.ci/run` installs them).
//!
//! Self-contained (no `super::` items), so that `benches/etcd_failover.rs` includes it too with
//! `#[path = "../tests/common/etcd.rs"] mod etcd;`.

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster may take to become healthy or elect a leader before the caller fails
/// (the same as `common::DEADLINE`).
const DEADLINE: Duration = Duration::from_secs(30);

/// One member: its URLs, its process while it runs.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) name: String,
    pub(crate) client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A cluster of `n` members on loopback (n = 1: a single member).
#[derive(Debug)]
pub(crate) struct EtcdCluster {
    pub(crate) members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

/// A free loopback port (bound and released; etcd binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs `etcdctl` against `endpoints` with `args`; its stdout, or None if it failed.
pub(crate) fn etcdctl(endpoints: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=2s")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl (Debian package etcd-client)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl EtcdCluster {
    /// Starts `n` members with data under `dir` and waits until the cluster answers.
    pub(crate) fn start(dir: &Path, n: usize) -> EtcdCluster {
        let token = format!(
            "shmlock-t-{}-{}",
            std::process::id(),
            dir.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                Member {
                    client_url: format!("http://127.0.0.1:{}", free_port()),
                    peer_url: format!("http://127.0.0.1:{}", free_port()),
                    data_dir: dir.join(format!("etcd-{name}")),
                    log: dir.join(format!("etcd-{name}.log")),
                    name,
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            token,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_healthy();
        c
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already runs", m.name);
        let state = if m.data_dir.exists() { "existing" } else { "new" };
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            // Fast elections, so that a test of a leader's loss takes a second, not ten.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&m.log).expect("etcd log"))
            .spawn()
            .expect("start etcd (Debian package etcd-server)");
        m.child = Some(child);
    }

    /// All client URLs, joined by commas.
    pub(crate) fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URLs, one per member.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Waits until every running member answers a health check with the cluster's quorum.
    pub(crate) fn wait_healthy(&mut self) {
        let t0 = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.members.len())
                .filter(|&i| self.members[i].child.is_some())
                .collect();
            for &i in &running {
                let m = &mut self.members[i];
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().expect("waitpid")) {
                    panic!(
                        "etcd member {} exited ({status}):\n{}",
                        m.name,
                        fs::read_to_string(&m.log).unwrap_or_default()
                    );
                }
            }
            let healthy = running
                .iter()
                .all(|&i| etcdctl(&self.members[i].client_url, &["endpoint", "health"]).is_some());
            if healthy {
                return;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "etcd did not become healthy within {DEADLINE:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The index of the member that leads now, as the members say (None: no leader).
    pub(crate) fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.child.is_some()
                && etcdctl(&m.client_url, &["endpoint", "status", "-w", "json"]).is_some_and(|json| {
                    let id = json_u64(&json, "\"member_id\":");
                    id.is_some() && id == json_u64(&json, "\"leader\":")
                })
        })
    }

    /// SIGKILLs member `i` (its data stays, for a restart).
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub(crate) fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Freezes member `i` (SIGSTOP): its process and its connections stay, it answers nothing,
    /// as a member cut off by a partition or hung. [`resume`](Self::resume) thaws it.
    pub(crate) fn pause(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Thaws member `i` frozen by [`pause`](Self::pause) (SIGCONT).
    pub(crate) fn resume(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&mut self, i: usize, sig: nix::sys::signal::Signal) {
        let m = &self.members[i];
        let child = m
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("member {} does not run", m.name));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap_or_else(|e| panic!("{sig} to member {}: {e}", m.name));
    }

    /// Is member `i`'s process running (started and not killed)?
    pub(crate) fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Waits until a running member says it leads, and returns its index; panics after the
    /// deadline.
    pub(crate) fn wait_leader(&self) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "no etcd member leads after {DEADLINE:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every member's log.
    pub(crate) fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {}:\n{}", m.name, fs::read_to_string(&m.log).unwrap_or_default()))
            .collect()
    }
}

/// The number after `key` in `json` (etcdctl prints ids as bare numbers).
fn json_u64(json: &str, key: &str) -> Option<u64> {
    let at = json.find(key)? + key.len();
    let digits: String = json[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
            let _ = fs::remove_dir_all(&self.members[i].data_dir);
        }
    }
}

/// Client options with a TTL of `ttl_s` seconds and `label`.
pub(crate) fn opts(ttl_s: u64, label: &str) -> shmlock::etcd::EtcdOptions {
    shmlock::etcd::EtcdOptions {
        ttl: Duration::from_secs(ttl_s),
        label: Some(label.into()),
        ..Default::default()
    }
}

/// A client of the cluster at `endpoints` (comma-separated), TTL `ttl_s` seconds.
pub(crate) fn connect(endpoints: &str, ttl_s: u64, label: &str) -> shmlock::etcd::EtcdClient {
    shmlock::etcd::EtcdClient::connect(endpoints.split(','), opts(ttl_s, label))
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// (holders, waiters) of lock `name`, as `client` reads the cluster.
pub(crate) fn queue_len(client: &shmlock::etcd::EtcdClient, name: &str) -> (usize, usize) {
    let locks = client.locks(name.as_bytes()).expect("locks");
    locks
        .iter()
        .find(|l| l.name == name.as_bytes())
        .map_or((0, 0), |l| (l.holders.len(), l.waiters.len()))
}
