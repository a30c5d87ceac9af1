//! The proxies' threads: one current-thread tokio runtime per CPU, each accepting on its own
//! listener of an SO_REUSEPORT group (`listener::listen_each`), which the kernel spreads new
//! connections over. Everything a connection does then runs on the thread that accepted it:
//! its task, its upstream connection's task, the pooled connections it reuses. On a
//! multi-thread runtime the same work hops between threads (a task woken by another thread's
//! I/O, an idle thread woken to steal), and each hop is a futex wake and often an IPI. An HTTP
//! request crosses three tasks (the client's connection, the upstream connection, the response
//! body): with a runtime per thread the HTTP proxy spent 0.80x the CPU per keep-alive request
//! and 0.84-0.89x per request on a new connection, and served 1.1-1.3x the requests a second
//! (`cargo xtask bench-ab`, BENCHMARKS.md, 2026-12-04); the DNS proxy, one task per
//! connection, 0.99x. HAProxy and nginx are built the same way.
//!
//! The calling thread's runtime is worker 0; it also runs what there is one of (the metrics
//! server, the signal handler, the DNS proxy's name watchers).
use std::{future::Future, num::NonZeroUsize, thread};

use anyhow::{Context as _, Result, anyhow};
use tokio::{
    runtime::{Builder, Handle, Runtime},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

/// How many threads the proxies serve on.
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerOptions {
    /// Threads the HTTP and DNS proxies serve on, each with its own listening socket. Default:
    /// the CPUs this process may use (its affinity and cgroup CPU quota, e.g. a pod's CPU
    /// limit).
    #[arg(long = "proxy-threads", env = "EGRESS_PROXY_THREADS", value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

impl WorkerOptions {
    pub fn count(&self) -> usize {
        self.threads
            .or_else(|| thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get)
    }
}

/// The runtimes, started; dropping it stops the extra threads (their tasks are dropped).
pub struct Workers {
    main: Runtime,
    handles: Vec<Handle>,
    threads: Vec<thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Workers {
    /// A current-thread runtime for the calling thread and `n - 1` more, each on its own thread.
    pub fn start(n: usize) -> Result<Workers> {
        let main = current_thread()?;
        let stop = CancellationToken::new();
        let mut handles = vec![main.handle().clone()];
        let mut threads = Vec::new();
        for i in 1..n.max(1) {
            let rt = current_thread()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            let thread = thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))
                .context("starting a proxy thread")?;
            threads.push(thread);
        }
        Ok(Workers {
            main,
            handles,
            threads,
            stop,
        })
    }

    /// Runs `fut` on the calling thread's runtime (worker 0) until it completes.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.main.block_on(fut)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn current_thread() -> Result<Runtime> {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `serve(item)` for each of `items` on the runtime of `handles` at the same position (one
/// item per worker), until all have returned; the first error (or panic) ends the others.
pub async fn run_each<T, F, Fut>(handles: &[Handle], items: Vec<T>, serve: F) -> Result<()>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for (handle, item) in handles.iter().zip(items) {
        set.spawn_on(serve(item), handle);
    }
    while let Some(done) = set.join_next().await {
        done.map_err(|e| anyhow!("a proxy thread's task failed: {e}"))??;
    }
    Ok(())
}
