//! Builds the state, starts the actors, runs the HTTP server on a given listener, and shuts it
//! all down in order: stop accepting, cancel turns (each stores its partial reply), close the
//! sockets, flush storage.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix::prelude::*;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{Cache, CacheSettings};
use crate::cluster::events::Event;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::conversation::{Deps, MemorySettings, Registry};
use crate::metrics::Metrics;
use crate::provider::{ProviderActor, ProviderHandle, Router};
use crate::server::{routes, ws::SocketHub, AppState, CatchPanic};
use crate::store::{Store, StoreError};
use crate::tenant::usage::{UsageRecorder, UsageWriter};
use crate::tenant::{Auth, Governor, Prices};
use crate::tokens::ContextBudget;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot serve: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Refused(String),
}

/// A running server.
pub struct AppHandle {
    pub addr: SocketAddr,
    pub dev_mode: bool,
    server: actix_web::dev::ServerHandle,
    state: web::Data<AppState>,
    arbiters: Vec<Arbiter>,
    shutdown_timeout: std::time::Duration,
    usage_writer: UsageWriter,
}

/// Whether `listen` is a loopback address (development mode is allowed only there).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Opens the store the config asks for: sled in `data_dir`, or Redis in cluster mode.
///
/// # Errors
/// When sled cannot open the directory, or the Redis URL is malformed (an unreachable Redis
/// is not an error: the node starts not-ready and serves once Redis answers).
pub fn open_store(config: &Config) -> Result<Store, AppError> {
    match &config.cluster {
        None => Ok(Store::open_with(
            &config.data_dir,
            config.storage.cache_mb << 20,
        )?),
        Some(c) => {
            let url = c
                .url()
                .ok_or_else(|| AppError::Refused("cluster.redis_url: not set".into()))?;
            let redis = crate::cluster::redis::Redis::connect(
                &url,
                "parley:",
                crate::cluster::redis::Timeouts::default(),
            )?;
            std::fs::create_dir_all(&config.data_dir)?;
            Ok(Store::open_redis(&redis, &config.data_dir)?)
        }
    }
}

/// This node's part in the cluster, when the config has a `[cluster]` section.
fn cluster_of(
    config: &Config,
    addr: SocketAddr,
    store: &Store,
) -> Result<Option<Cluster>, AppError> {
    let Some(c) = &config.cluster else {
        return Ok(None);
    };
    let redis = store.redis().ok_or_else(|| {
        AppError::Refused("cluster mode needs the store on Redis (app::open_store)".into())
    })?;
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty());
    let advertise = match (&c.advertise, &host) {
        (Some(a), _) => a.clone(),
        // On a wildcard address the host name is what the other nodes can reach (a container's
        // name in a compose network, a pod's in Kubernetes).
        (None, Some(host)) if addr.ip().is_unspecified() => format!("{host}:{}", addr.port()),
        (None, None) if addr.ip().is_unspecified() => {
            return Err(AppError::Refused(format!(
                "cluster.advertise: required when listening on {addr} (the address other nodes reach this one at)"
            )))
        }
        (None, _) => addr.to_string(),
    };
    let node = c
        .node_id
        .clone()
        .unwrap_or_else(|| format!("{}:{}", host.as_deref().unwrap_or("parley"), addr.port()));
    Ok(Some(Cluster::new(
        redis.clone(),
        node,
        advertise,
        std::time::Duration::from_millis(c.lease_ms),
    )))
}

/// Renews this node's leases every third of the lease time, and stops the actors of
/// conversations whose lease another node holds now.
fn keep_leases(cluster: Cluster, registry: Registry, stop: CancellationToken) {
    actix::spawn(async move {
        let mut tick = tokio::time::interval(cluster.lease() / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match cluster.renew(&registry.live_ids()) {
                Ok(lost) => lost.iter().for_each(|id| registry.lost(id)),
                Err(e) => tracing::warn!(error = %e, "leases not renewed"),
            }
        }
    });
}

/// Acts on what other nodes announce (a key revoked), until `stop`.
fn hear_events(
    state: web::Data<AppState>,
    redis: crate::cluster::redis::Redis,
    stop: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    crate::cluster::events::listen(redis, tx);
    actix::spawn(async move {
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
            };
            match event {
                Event::KeyRevoked { key_id } => {
                    state.auth.forget_known();
                    state.sockets.revoke(&key_id);
                    state.registry.key_revoked(&key_id);
                }
                // Events may have been missed: keys are looked up again.
                Event::Resync => state.auth.forget_known(),
            }
        }
    });
}

/// Starts parley on `listener` with an open `store`; must run inside an actix system.
///
/// # Errors
/// When there is no admin key on a non-loopback address, or a part cannot start.
pub fn start(config: Config, listener: TcpListener, store: Store) -> Result<AppHandle, AppError> {
    let config = Arc::new(config);
    let addr = listener.local_addr()?;
    let admin_key = std::env::var(&config.auth.admin_key_env)
        .ok()
        .filter(|k| !k.is_empty())
        .map(SecretString::from);
    let dev_mode = admin_key.is_none();
    if dev_mode && !is_loopback(&addr) {
        return Err(AppError::Refused(format!(
            "no admin key: set {} to serve on {addr} (development mode runs only on loopback)",
            config.auth.admin_key_env
        )));
    }
    let cluster = cluster_of(&config, addr, &store)?;
    let metrics = Metrics::new()?;
    // No token counter is warmed here: each is built on its first count, in under 10 ms and
    // about 4 MB, so a server that only ever sees one encoding never holds the other.
    let http = crate::provider::http::builder().build()?;

    let provider_arbiter = Arbiter::new();
    let providers: Vec<ProviderHandle> = config
        .providers
        .iter()
        .map(|p| {
            let shared = cluster.as_ref().map(|c| c.redis().clone());
            let actor =
                ProviderActor::build(p, http.clone(), |name| std::env::var(name).ok(), shared);
            let (stats, limits, prefill) =
                (actor.stats(), actor.limits(), actor.supports_prefill());
            let addr = ProviderActor::start_in_arbiter(&provider_arbiter.handle(), |_| actor);
            ProviderHandle {
                name: p.name.clone(),
                region: p.region.clone(),
                addr,
                limits,
                stats,
                prefill,
                kind: p.kind,
                limits_tokens: p.tpm > 0,
            }
        })
        .collect();
    let router = Router::new(&config.routes, providers, config.retry.clone());

    let threads = match config.server.conversation_threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => n,
    };
    let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
    let governor = Governor::new(
        store.clone(),
        Prices(config.prices.clone()),
        config.context.reserve_output_tokens,
    );
    // Cluster mode: limits and budgets are counted in Redis, so they add up across nodes.
    let governor = Arc::new(match store.redis().filter(|_| cluster.is_some()) {
        Some(r) => governor.with_redis(r.clone()),
        None => governor,
    });
    let retention = match config.storage.usage_retention_days {
        0 => None,
        days => Some(std::time::Duration::from_secs(u64::from(days) * 86_400)),
    };
    let (usage, usage_writer) = UsageRecorder::start(store.clone(), retention);
    let spec = config.cache.embedder_spec().map_err(AppError::Refused)?;
    let embedder = crate::cache::build_embedder(&spec, &router).map_err(AppError::Refused)?;
    let routing =
        crate::routing::Routing::build(&config.routes, &embedder).map_err(AppError::Refused)?;
    {
        // The examples are embedded off the request path (a local or provider embedder takes
        // a while); a request before that embeds them itself.
        let routing = routing.clone();
        actix::spawn(async move { routing.warm().await });
    }
    let cache = Cache::start(
        CacheSettings {
            enabled: config.cache.enabled,
            min_similarity: config.cache.min_similarity,
            ttl: std::time::Duration::from_secs(config.cache.ttl_secs),
            max_entries: config.cache.max_entries,
            lookup_timeout: std::time::Duration::from_millis(config.cache.lookup_timeout_ms),
            disabled_tenants: config.cache.disabled_tenants.iter().cloned().collect(),
        },
        embedder,
        store.clone(),
        metrics.clone(),
        cluster
            .as_ref()
            .map(|c| crate::cache::sync::Sync::new(c.redis().clone(), c.node().to_owned())),
    )?;
    let deps = Arc::new(Deps {
        cache,
        memory: MemorySettings {
            mode: config.context.memory,
            share: config.context.recall_share,
            min_similarity: config.context.recall_min_similarity,
        },
        store: store.clone(),
        router,
        budget: ContextBudget::new(
            config.context.budget_tokens,
            config.context.reserve_output_tokens,
        ),
        metrics: metrics.clone(),
        idle_timeout: config.idle_timeout(),
        max_queued_turns: config.server.max_queued_turns,
        max_conversations_per_tenant: config.server.max_conversations_per_tenant,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        governor: Arc::clone(&governor),
        usage,
        cluster: cluster.clone(),
        routing,
    });
    let registry = Registry::new(deps, arbiters.iter().map(Arbiter::handle).collect());
    let state = web::Data::new(AppState {
        config: Arc::clone(&config),
        auth: Auth::new(store, admin_key, dev_mode),
        registry,
        metrics,
        sockets: SocketHub::default(),
        governor,
        retries: Default::default(),
        jobs: crate::jobs::Jobs::default(),
    });
    // Jobs a node was running when it stopped are queued again by that node: in cluster mode
    // its id, on one node always the same.
    let job_node = cluster
        .as_ref()
        .map_or_else(|| "local".to_owned(), |c| c.node().to_owned());
    state.jobs.start(
        state.clone(),
        job_node,
        config.jobs.workers,
        state.registry.deps().shutdown.clone(),
    );

    if let Some(cluster) = &cluster {
        let stop = state.registry.deps().shutdown.clone();
        keep_leases(cluster.clone(), state.registry.clone(), stop.clone());
        hear_events(state.clone(), cluster.redis().clone(), stop);
        // Announce this node before it serves, so relays find it.
        if let Err(e) = cluster.renew(&[]) {
            tracing::warn!(error = %e, "Redis cannot be reached yet; serving once it can");
        }
        tracing::info!(
            node = cluster.node(),
            advertise = cluster.advertise(),
            "cluster mode"
        );
    }
    let max_body = config.server.max_frame_bytes;
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        // Runs on each worker thread: conversations its connections start are hosted there.
        crate::conversation::mark_worker_thread();
        App::new()
            .app_data(app_state.clone())
            .wrap(from_fn(crate::server::relay::relay))
            .wrap(from_fn(CatchPanic::handle))
            .wrap(tracing_actix_web::TracingLogger::<
                crate::server::span::SafeRootSpan,
            >::new())
            .configure(|c| routes::configure(c, max_body))
    })
    // Streamed deltas are small writes: without NODELAY, Nagle holds each one for the peer's ACK.
    .tcp_nodelay(true)
    // A WebSocket's request body is never read to its end, so when the socket closes actix
    // would linger for the peer (up to a second by default) before closing the connection,
    // and a client waiting for the TCP close would wait that long. Close at once.
    .client_disconnect_timeout(std::time::Duration::ZERO)
    .listen(listener)?
    .disable_signals()
    .shutdown_timeout(config.server.shutdown_timeout_secs);
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    let server = server.run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    let mut all_arbiters = arbiters;
    all_arbiters.push(provider_arbiter);
    Ok(AppHandle {
        addr,
        dev_mode,
        server: handle,
        state,
        arbiters: all_arbiters,
        shutdown_timeout: config.shutdown_timeout(),
        usage_writer,
    })
}

impl AppHandle {
    /// The shared state (for tests and benches that look inside).
    pub fn state(&self) -> &web::Data<AppState> {
        &self.state
    }

    /// Stops accepting, cancels turns and waits until their replies are stored, closes the
    /// sockets, stops the server and flushes storage.
    ///
    /// # Errors
    /// When the final flush fails.
    pub async fn shutdown(self) -> Result<(), StoreError> {
        tracing::info!("shutting down");
        if let Some(cluster) = &self.state.registry.deps().cluster {
            cluster.leave();
        }
        self.server.pause().await;
        self.state.registry.shutdown(self.shutdown_timeout).await;
        self.state.sockets.close_all();
        self.server.stop(true).await;
        // Every turn and request has ended: store the usage records still queued, and let the
        // cache worker finish what it was sent and end, before the last flush.
        self.usage_writer.finish().await;
        self.state.registry.deps().cache.stop().await;
        let flushed = self.state.store().flush().await;
        // Joining the arbiters drops the actors they host, and with them the last handles on
        // the store, so its directory lock is released when this returns.
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        let arbiters = self.arbiters;
        let _ =
            tokio::task::spawn_blocking(move || arbiters.into_iter().for_each(|a| drop(a.join())))
                .await;
        self.state.store().idle().await;
        flushed?;
        tracing::info!("storage flushed; bye");
        Ok(())
    }
}
