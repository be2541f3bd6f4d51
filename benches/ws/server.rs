//! parley as a separate process (the built binary), so that its RSS and limits can be read from
//! `/proc/<pid>`: a tempdir with a config and a store, the built-in `mock` provider with a known
//! TTFT behind route `mock`, the cache off, loopback on a free port.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct ServerProc {
    pub addr: SocketAddr,
    pub pid: u32,
    child: Child,
    dir: tempfile::TempDir,
}

impl ServerProc {
    /// Starts `bin serve` and waits (at most 30 s) until it accepts connections.
    pub fn start(bin: &Path, upstream_ttft_ms: u64) -> anyhow::Result<Self> {
        Self::start_with(bin, upstream_ttft_ms, "")
    }

    /// As [`ServerProc::start`], with `extra` appended to the config (a `[cluster]` section).
    pub fn start_with(bin: &Path, upstream_ttft_ms: u64, extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let config = format!(
            r#"listen = "{addr}"
data_dir = "{data}"

[auth]
admin_key_env = "PARLEY_WSBENCH_NO_ADMIN_KEY"

[cache]
enabled = false

[[providers]]
name = "mock"
kind = "mock"
ttft_ms = {upstream_ttft_ms}

[[routes]]
model = "mock"
targets = [{{ provider = "mock", model = "mock-1" }}]
{extra}
"#,
            data = dir.path().join("data").display(),
        );
        let config_path = dir.path().join("parley.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("WS_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("PARLEY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let mut server = Self {
            addr,
            pid: child.id(),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                bail!("parley exited at start ({status}):\n{}", server.log());
            }
            if Instant::now() > deadline {
                bail!("parley did not listen within 30 s:\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `RssAnon`, `RssFile`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid, field)
    }

    /// The server's open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(0, |d| d.count())
    }

    /// The server's "Max open files" line of `/proc/<pid>/limits` (soft, hard).
    pub fn nofile(&self) -> String {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid));
        limits
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .map(|l| {
                        l.split_whitespace()
                            .skip(3)
                            .take(2)
                            .collect::<Vec<_>>()
                            .join("/")
                    })
            })
            .unwrap_or_else(|| "?".into())
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The CPU time (user + system) processes `pids` have used so far between them, in
/// milliseconds (`None` when there are none, or one is gone).
pub fn cpu_ms(pids: &[u32]) -> Option<f64> {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if pids.is_empty() || hz <= 0 {
        return None;
    }
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
        ticks += fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    }
    Some(ticks as f64 * 1000.0 / hz as f64)
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

impl Drop for ServerProc {
    /// SIGTERM (the server closes its sockets and flushes), then SIGKILL after 20 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
