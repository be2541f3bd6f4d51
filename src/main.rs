//! `parley`: parse the command line, load the config, start tracing, run `serve` or
//! `mock-upstream` until SIGINT/SIGTERM.

use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use parley::cli::{Cli, Command, MockArgs, ServeArgs};
use parley::config::Config;
use parley::{app, mock_upstream, telemetry};

/// mimalloc in place of glibc's allocator: 11–14 % less CPU per request at full load
/// (`scripts/bench/cpu.sh`, README), and freed pages go back to the system by themselves about
/// a second after they fall free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    // `serve` sets telemetry up from its config; the other commands log to stderr.
    let _telemetry = if matches!(cli.command, Command::Serve(_)) {
        None
    } else {
        telemetry::init(&parley::config::TelemetryConfig::default()).ok()
    };
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::MockUpstream(args) => mock(&args),
        Command::RouteEval(args) => route_eval(&args),
    }
}

fn route_eval(args: &parley::cli::RouteEvalArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&anyhow::anyhow!("cannot start a runtime: {e}")),
    };
    match runtime.block_on(parley::routing::eval::command(args)) {
        Ok(report) => {
            use std::io::Write as _;
            // The report is the command's output; a closed pipe is the reader's choice.
            let _ = std::io::stdout().write_all(report.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&anyhow::anyhow!(e)),
    }
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = &args.listen {
        config.listen.clone_from(listen);
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir.clone_from(dir);
    }
    let has_env = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    config.validate(has_env)?;
    // Refuse before binding: development mode (no admin key) is for loopback only.
    let addr = config.listen_addr()?;
    if !has_env(&config.auth.admin_key_env) && !app::is_loopback(&addr) {
        anyhow::bail!(
            "no admin key: set {} to serve on {addr} (development mode runs only on loopback)",
            config.auth.admin_key_env
        );
    }
    Ok(config)
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match load_config(args) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let telemetry = match telemetry::init(&config.telemetry) {
        Ok(t) => t,
        Err(e) => return fail(&anyhow::anyhow!(e)),
    };
    raise_fd_limit();
    let system = actix_web::rt::System::new();
    let result = system.block_on(async move {
        let store = app::open_store(&config)
            .map_err(|e| anyhow::anyhow!("cannot open storage in {}: {e}", config.data_dir.display()))?;
        let listener =
            TcpListener::bind(&config.listen).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let handle = app::start(config, listener, store)?;
        if handle.dev_mode {
            tracing::warn!("development mode: no admin key set; requests without a key act as tenant \"local\"");
        }
        tracing::info!("listening on {}", handle.addr);
        wait_for_signal().await;
        handle.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    });
    // The spans still buffered go out before the process ends.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Every socket is a file descriptor, and the usual soft limit (1024) is far below what one
/// server holds: raise it to the hard limit. A failure only means fewer sockets, never no start.
/// Transparent huge pages off for this process: where the kernel gives them to every large
/// mapping (`/sys/kernel/mm/transparent_hugepage/enabled` = `always`), each of the allocator's
/// arenas would hold 2 MiB pages of which a gateway touches a few KiB (idle RSS 78 MiB against
/// 22 with them off, measured with mimalloc asking for them). A kernel that cannot switch
/// them off (before Linux 3.15) leaves them as they were.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and reads or writes no memory of ours.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit raised to the hard limit"),
        Err(e) => tracing::debug!(error = %e, "open file limit not raised"),
    }
}

fn mock(args: &MockArgs) -> ExitCode {
    let system = actix_web::rt::System::new();
    let result = system.block_on(async move {
        tokio::select! {
            served = mock_upstream::serve(args) => served,
            () = wait_for_signal() => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&anyhow::Error::from(e)),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    tracing::error!("{e:#}");
    // Also on stderr without the log decoration, for people reading a failed start.
    eprintln!("parley: {e:#}");
    ExitCode::FAILURE
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        if let (Ok(mut term), Ok(mut int)) = (term, int) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
