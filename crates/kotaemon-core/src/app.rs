//! Assembles the agent from its configuration: event bus, metrics, upstream pool, pipeline,
//! background tasks, HTTP router. Everything is built and checked here, at start-up, so a bad
//! config fails `serve` and `doctor` instead of the first request.

use crate::api::auth::Clients;
use crate::api::{self, ApiState};
use crate::audit::AuditLog;
use crate::config::{Config, ConfigError};
use crate::cost::CloudBudget;
use crate::cost::Ledger;
use crate::events::metrics as m;
use crate::events::{EventBus, TurnEvent};
use crate::pipeline::{Pipeline, TurnError};
use crate::plugins::{self, PluginDeps};
use crate::queue::JobQueue;
use crate::stages::act::Act;
use crate::stages::{self, StageDeps};
use crate::tools::{self, ToolRegistry};
use crate::turn::{Origin, Reply, Turn, TurnCtx};
use crate::upstream::breaker::Breaker;
use crate::upstream::openai::OpenAiUpstream;
use crate::upstream::pool::{Member, Pool};
use crate::upstream::{health, Upstream};
use crate::wire::ChatRequest;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct App {
    pub config: Config,
    pub bus: EventBus,
    pub pool: Arc<Pool>,
    pub pipeline: Pipeline,
    /// Tools the agent runs on the device (the tool loop and rules draw from it).
    pub tools: Arc<ToolRegistry>,
    /// The tool loop (pending actions are confirmed or rejected through it).
    pub act: Option<Arc<Act>>,
    clients: Arc<Clients>,
    /// Parts that are configured but not serving (local model, cache), and why. The agent
    /// runs without them; `doctor` reports them.
    pub warnings: Vec<String>,
    /// Cloud GPU lifecycle controllers (`[[gpu]]`), run by `start_background`.
    gpu: Vec<crate::cost::lifecycle::Controller>,
    /// The durable job queue (`[queue]`); its workers run with the background tasks.
    pub queue: Option<Arc<JobQueue>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// The process-wide Prometheus recorder (the `metrics` facade has one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(m::OVERHEAD.into()), m::OVERHEAD_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(m::CACHE_SIMILARITY.into()),
                        m::SIMILARITY_BUCKETS,
                    )
                })
                .and_then(|b| b.set_buckets(m::LATENCY_BUCKETS));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder is installed already (an embedding program's).
            let _ = metrics::set_global_recorder(recorder);
            m::describe();
            handle
        })
        .clone()
}

type MemberFactory = Box<dyn FnOnce(EventBus, crate::upstream::breaker::BreakerConfig) -> Member>;

/// Loads the local model named by `[local]`; the pool member is made once the bus exists.
#[cfg(feature = "llama")]
fn load_local(config: &Config) -> Result<MemberFactory, String> {
    let path = crate::models::resolve(&config.local.model, &config.local.models_dir())
        .map_err(|e| e.to_string())?;
    let upstream = crate::upstream::local::LocalUpstream::load(&config.local, &path)?;
    let name: Arc<str> = config.local.name.as_str().into();
    Ok(Box::new(move |bus, breaker| {
        Member::new(
            Arc::new(upstream),
            1,
            Default::default(),
            Breaker::new(name, breaker, bus),
        )
        .local()
    }))
}

#[cfg(not(feature = "llama"))]
fn load_local(_config: &Config) -> Result<MemberFactory, String> {
    Err("this build has no local model support (cargo feature `llama`)".into())
}

impl App {
    /// Builds every component, collecting every problem before failing.
    pub fn build(config: Config) -> Result<App, ConfigError> {
        Self::build_with_upstreams(config, Vec::new(), None)
    }

    /// Like [`App::build`]; `extra` upstreams join the pool after the configured ones (tests
    /// and embedders), `seed` fixes balancing and jitter.
    pub fn build_with_upstreams(
        config: Config,
        extra: Vec<(Arc<dyn Upstream>, u32)>,
        seed: Option<u64>,
    ) -> Result<App, ConfigError> {
        let metrics = metrics_handle();
        drop(metrics);
        let mut problems = config.problems();
        let audit = match AuditLog::open(&config.audit) {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!("audit.dir: {e}"));
                AuditLog::disabled()
            }
        };
        let ledger = match Ledger::open(&config.usage) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("usage.path: {e}"));
                Ledger::disabled()
            }
        };
        let bus = EventBus::new(1024).with_audit(audit).with_ledger(ledger);
        let mut members = Vec::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            match OpenAiUpstream::new(u, &format!("upstreams[{i}]")) {
                Ok(up) => {
                    let name: Arc<str> = u.name.as_str().into();
                    let breaker = Breaker::new(name, config.pool.breaker.clone(), bus.clone());
                    members.push(Member::new(
                        Arc::new(up),
                        u.weight,
                        u.models.clone(),
                        breaker,
                    ));
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        let mut warnings = Vec::new();
        if config.local.enabled {
            match load_local(&config) {
                Ok(member) => members.push(member(bus.clone(), config.pool.breaker.clone())),
                Err(e) if config.local.required => problems.push(format!("local.model: {e}")),
                Err(e) => {
                    tracing::error!("local model unavailable, serving from the cloud only: {e}");
                    warnings.push(format!("local model: {e}"));
                }
            }
        }
        for (up, weight) in extra {
            let breaker = Breaker::new(up.name().clone(), config.pool.breaker.clone(), bus.clone());
            members.push(Member::new(up, weight, Default::default(), breaker));
        }
        let clients = match Clients::build(&config.server.api_keys, &config.server.clients) {
            Ok(c) => c,
            Err(mut p) => {
                problems.append(&mut p);
                Clients::default()
            }
        };
        let pool = Arc::new(Pool::new(members, config.pool.clone(), seed));
        let gpu =
            crate::cost::lifecycle::build(&config.gpu, &pool, &bus).unwrap_or_else(|mut p| {
                problems.append(&mut p);
                Vec::new()
            });
        let queue = if config.queue.enabled {
            match JobQueue::open(&config.queue) {
                Ok(q) => Some(q),
                Err(e) => {
                    problems.push(format!("queue.path: {e}"));
                    None
                }
            }
        } else {
            None
        };
        let budget = Arc::new(CloudBudget::new(&config.budget));
        if config.usage.enabled {
            // Spending limits hold across restarts: today's and this month's spending so far.
            match crate::cost::ledger::spending_now(&config.usage.db_path()) {
                Ok(rows) => budget.preload(&rows),
                Err(e) => problems.push(format!("usage.path: cannot read spending so far: {e}")),
            }
        }
        let tools = match tools::build(&config.tools) {
            Ok(t) => t,
            Err(mut p) => {
                problems.append(&mut p);
                Arc::new(ToolRegistry::new())
            }
        };
        let act = match Act::new(&config.stages.act, tools.clone()) {
            Ok(a) => a.map(Arc::new),
            Err(mut p) => {
                problems.append(&mut p);
                None
            }
        };
        let deps = StageDeps {
            pool: pool.clone(),
            budget,
            tools: tools.clone(),
            act: act.clone(),
            contacts: config.tools.contacts.clone(),
        };
        let pipeline = match stages::build(&config.stages, &deps) {
            Ok((p, mut w)) => {
                warnings.append(&mut w);
                Some(p)
            }
            Err(mut p) => {
                problems.append(&mut p);
                None
            }
        };
        problems.dedup();
        match pipeline {
            Some(pipeline) if problems.is_empty() => {
                for member in pool.members() {
                    m::record(&TurnEvent::HealthChanged {
                        upstream: member.name().clone(),
                        healthy: true,
                    });
                }
                Ok(App {
                    config,
                    bus,
                    pool,
                    pipeline,
                    tools,
                    act,
                    clients: Arc::new(clients),
                    warnings,
                    gpu,
                    queue,
                    stop: CancellationToken::new(),
                    tasks: TaskTracker::new(),
                })
            }
            _ => Err(ConfigError {
                source_name: None,
                problems,
            }),
        }
    }

    /// Starts background work (health checks, GPU lifecycle, MCP connections, plugins).
    /// Stopped by [`App::shutdown`].
    pub fn start_background(&self) {
        self.tasks.spawn(health::run(
            self.pool.clone(),
            self.bus.clone(),
            self.stop.clone(),
        ));
        for controller in &self.gpu {
            controller.spawn(self.stop.clone(), &self.tasks);
        }
        if let Some(queue) = &self.queue {
            crate::queue::spawn_workers(
                queue.clone(),
                crate::queue::WorkerDeps {
                    pipeline: self.pipeline.clone(),
                    pool: self.pool.clone(),
                    bus: self.bus.clone(),
                },
                self.stop.clone(),
                &self.tasks,
            );
        }
        tools::mcp::spawn_connections(
            &self.config.tools.mcp,
            self.tools.clone(),
            self.stop.clone(),
            &self.tasks,
        );
        plugins::start(
            &self.config.plugins,
            &self.plugin_deps(),
            &self.stop,
            &self.tasks,
        );
    }

    fn plugin_deps(&self) -> PluginDeps {
        PluginDeps {
            pipeline: self.pipeline.clone(),
            bus: self.bus.clone(),
            turn_timeout: Duration::from_millis(self.config.server.turn_timeout_ms),
        }
    }

    /// Runs an in-process plugin on every bus event until the app shuts down (see
    /// `examples/slow_turn_alarm.rs`).
    pub fn spawn_event_component<C>(&self, component: Arc<C>)
    where
        C: plugins::Component<Input = Arc<TurnEvent>, Output = ()>,
    {
        plugins::spawn_event_component(component, &self.plugin_deps(), &self.stop, &self.tasks);
    }

    /// A handle plugins and embedders use to ask the agent (a whole turn).
    pub fn agent_handle(&self) -> plugins::AgentHandle {
        plugins::AgentHandle::new(self.plugin_deps())
    }

    pub fn router(&self) -> axum::Router {
        let state = ApiState {
            pipeline: self.pipeline.clone(),
            pool: self.pool.clone(),
            bus: self.bus.clone(),
            clients: self.clients.clone(),
            metrics: metrics_handle(),
            turn_timeout: Duration::from_millis(self.config.server.turn_timeout_ms),
            turn_slots: Arc::new(Semaphore::new(self.config.server.max_concurrent_turns)),
            act: self.act.clone(),
            queue: self.queue.clone(),
        };
        api::router(state, &self.config.server)
    }

    /// Serves the API on a bound listener until `shutdown` resolves; in-flight requests are
    /// drained, background tasks stopped.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        if self.clients.is_empty() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "!!! listening on a non-loopback address WITHOUT client API keys: anyone who can reach \
                 this address can use your cloud upstreams. Set server.api_keys. !!!"
            );
        }
        self.start_background();
        let router = self.router();
        tracing::info!(%addr, stages = ?self.pipeline.stage_names(), upstreams = self.pool.members().len(), "kotaemon is listening");
        // TCP_NODELAY on every accepted socket: without it small SSE events and responses on
        // kept-alive connections wait for delayed ACKs (~40 ms).
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        // Peer addresses for the log of refused requests.
        let result = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        self.shutdown().await;
        result
    }

    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        // What finished turns recorded is committed before the process may exit.
        self.bus.ledger().flush().await;
    }

    /// Runs one turn in-process (CLI `ask` and `chat`). The context tells, once the reply is
    /// consumed, what the stages decided (e.g. a pending action).
    pub async fn run_turn(
        &self,
        origin: Origin,
        request: ChatRequest,
    ) -> Result<(Reply, TurnCtx), TurnError> {
        let turn = Turn::new(
            self.bus.clone(),
            origin,
            request,
            Duration::from_millis(self.config.server.turn_timeout_ms),
        );
        let ctx = turn.ctx.clone();
        self.pipeline.run(turn).await.map(|r| (r, ctx))
    }

    /// Confirms or rejects a pending action in-process (CLI `chat`).
    pub async fn decide_action(
        &self,
        id: &str,
        decision: crate::stages::act::Decision,
    ) -> Result<Reply, crate::stages::act::ActError> {
        let Some(act) = &self.act else {
            return Err(crate::stages::act::ActError::UnknownAction(id.to_string()));
        };
        act.resume(
            id,
            decision,
            self.bus.clone(),
            Duration::from_millis(self.config.server.turn_timeout_ms),
        )
        .await
        .map(|(reply, _)| reply)
    }
}
