//! A real etcd cluster for tests: `n` members on 127.0.0.1 (free ports picked at start), each
//! a process this harness started, stopped by its PID (SIGKILL on drop), data in a temporary
//! directory. Needs `etcd` and `etcdctl` (Debian `etcd-server`, `etcd-client`;
//! `scripts/install-deps.sh` installs them); a missing one fails the test.

use crate::tools::require_tool;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member: its name, ports, and process while it runs.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A running etcd cluster ([module docs](self)).
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    initial: String,
}

/// Ports free on 127.0.0.1 right now (bound to port 0, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

impl EtcdCluster {
    /// Start `n` members and wait until every one reports healthy (hang guard 60 s).
    pub fn start(n: usize) -> EtcdCluster {
        require_tool("etcd");
        require_tool("etcdctl");
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("e{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            dir: tempfile::tempdir().expect("tempdir"),
            initial,
        };
        for i in 0..n {
            c.spawn(i, "new");
        }
        c.wait_healthy(&(0..n).collect::<Vec<_>>());
        c
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("e{i}.data"))
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let data = self.data_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("e{i}.log")))
            .expect("etcd log file");
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-token", "ironlun-test"])
            .args(["--initial-cluster-state", state])
            // etcd's defaults (100 ms heartbeats, 1 s election timeout): shorter ones make
            // leaders flap when the tests load both cores. A lease's TTL is at least 1.5 s.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        m.child = Some(child);
    }

    /// `host:port` of every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect()
    }

    /// Member `i`'s PID, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// SIGKILL member `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start member `i` again on its data directory (after [`EtcdCluster::kill9`]), and wait
    /// until it is healthy.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        self.spawn(i, "existing");
        self.wait_healthy(&[i]);
    }

    /// Send `sig` (`STOP`, `CONT`, …) to member `i`.
    pub fn signal(&self, i: usize, sig: &str) {
        let pid = self.pid(i).expect("member runs");
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Whether member `i` is the raft leader now (`etcdctl endpoint status`: its MemberID is
    /// the Leader it reports).
    pub fn is_leader(&self, i: usize) -> bool {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints()[i]])
            .args(["endpoint", "status", "-w", "fields"])
            .output()
            .expect("etcdctl");
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("\"{name}\" : ")))
                .map(str::to_owned)
        };
        let (member, leader) = (field("MemberID"), field("Leader"));
        assert!(
            member.is_some(),
            "etcdctl endpoint status of member {i}: {text}"
        );
        member == leader
    }

    /// The log of member `i` so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("e{i}.log"))).unwrap_or_default()
    }

    /// Wait until `etcdctl endpoint health` passes on each of `members`.
    fn wait_healthy(&self, members: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for &i in members {
            let endpoint = self.endpoints()[i].clone();
            loop {
                let out = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args([
                        "--endpoints",
                        &endpoint,
                        "--command-timeout=2s",
                        "endpoint",
                        "health",
                    ])
                    .output()
                    .expect("etcdctl");
                if out.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} not healthy: {}{}\nlog:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.log(i)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
    }
}
