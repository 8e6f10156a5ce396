//! Remote MX hosts for delivery tests: `sluice-load sink` processes on
//! 127.0.0.2, 127.0.0.3 ... (port 0 unless told), killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::poll;

/// The `sluice-load` binary, built next to `sluice` by `cargo test --workspace`.
pub fn load_bin() -> PathBuf {
    let bin = Path::new(super::BIN)
        .parent()
        .expect("binary directory")
        .join("sluice-load");
    assert!(
        bin.exists(),
        "{} is missing: run the delivery tests with `cargo test --workspace` (or `cargo build -p sluice-load` first)",
        bin.display()
    );
    bin
}

/// A running sink.
pub struct Sink {
    child: Child,
    /// Bound addresses, in `--listen` order.
    pub addrs: Vec<SocketAddr>,
    /// Its files: `received`, `stats.json`, `store/`, `log`.
    pub dir: PathBuf,
}

impl Sink {
    /// Starts a sink listening on `listen` (e.g. `["127.0.0.2:0"]`) with
    /// extra arguments; files go to `dir/name/`.
    pub fn start(dir: &Path, name: &str, listen: &[&str], extra: &[&str]) -> Sink {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready");
        let mut cmd = Command::new(load_bin());
        cmd.arg("sink");
        for l in listen {
            cmd.args(["--listen", l]);
        }
        cmd.arg("--ready-file")
            .arg(&ready)
            .arg("--received")
            .arg(dir.join("received"))
            .arg("--stats-file")
            .arg(dir.join("stats.json"))
            .arg("--store")
            .arg(dir.join("store"))
            .args(["--quiet", "--threads", "1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap());
        let mut child = cmd.spawn().unwrap();
        let text = poll("sink ready file", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "sink exited ({status}): {}",
                    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&ready).ok()
        });
        let addrs = text.lines().map(|l| l.trim().parse().unwrap()).collect();
        Sink { child, addrs, dir }
    }

    /// The first bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// One line per accepted message (its Message-ID value).
    pub fn received(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("received"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `n` messages were accepted; returns them.
    pub fn wait_received(&self, n: usize) -> Vec<String> {
        poll(&format!("{n} messages at the sink"), || {
            let r = self.received();
            (r.len() >= n).then_some(r)
        })
    }

    /// The stats file (see `sluice-load sink --stats-file`) once `ready`
    /// holds: the sink rewrites it about once a second, so poll.
    pub fn stats_when(&self, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        poll("sink stats", || {
            let text = std::fs::read_to_string(self.dir.join("stats.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            ready(&v).then_some(v)
        })
    }

    /// Every stored message: (body, envelope JSON), in arrival order.
    pub fn stored(&self) -> Vec<(String, serde_json::Value)> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.join("store"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .filter_map(|eml| {
                let body = std::fs::read_to_string(eml).ok()?;
                let json = std::fs::read_to_string(eml.with_extension("json")).ok()?;
                Some((body, serde_json::from_str(&json).ok()?))
            })
            .collect()
    }

    /// Waits until `n` messages are stored; returns them.
    pub fn wait_stored(&self, n: usize) -> Vec<(String, serde_json::Value)> {
        poll(&format!("{n} stored messages at the sink"), || {
            let s = self.stored();
            (s.len() >= n).then_some(s)
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that is free on `ip` now (for a host that must be down, or must
/// come up later on a known address).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
