//! A real `redis-server` for tests and benchmarks: started on a free loopback port in a
//! temporary directory, with the persistence cluster mode needs (`appendonly yes`,
//! `appendfsync always`), stopped when dropped. Needs `redis-server` on the `PATH` (Debian's
//! package `redis-server`; `.ci/run` installs it).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    _tmp: Option<tempfile_dir::Dir>,
}

/// A temporary directory removed on drop (the crate's dev-dependency `tempfile` is not
/// available to library code, and this is all it needs).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> std::io::Result<Self> {
            let path = std::env::temp_dir().join(format!(
                "parley-redis-{}-{}",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TestRedis {
    /// Starts a server and waits until it answers.
    ///
    /// # Errors
    /// When `redis-server` is missing or does not answer within 10 s.
    pub fn start() -> std::io::Result<Self> {
        let tmp = tempfile_dir::Dir::new()?;
        let mut redis = Self {
            child: None,
            port: free_port()?,
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        };
        redis.spawn()?;
        Ok(redis)
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot start redis-server (install Debian's redis-server): {e}"),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(self.url()).map_err(std::io::Error::other)?;
        loop {
            let up = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not answer in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL: what it acknowledged is in its append-only file).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory, with what it had stored.
    ///
    /// # Errors
    /// As [`TestRedis::start`].
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
