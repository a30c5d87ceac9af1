//! The pod's DNS resolver, shared by the proxies: hickory reading a resolv.conf.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use hickory_resolver::{
    TokioResolver, net::runtime::TokioRuntimeProvider, system_conf::parse_resolv_conf,
};

#[derive(clap::Args, Clone, Debug)]
pub struct ResolverOptions {
    /// resolv.conf the proxies resolve names with (the pod's resolver).
    #[arg(long, env = "EGRESS_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
}

impl Default for ResolverOptions {
    fn default() -> Self {
        ResolverOptions {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

/// Builds a resolver from `opts.resolv_conf`. Caching stays on: callers that need fresh
/// answers bound the TTLs through `ResolverOpts` themselves.
pub fn build(opts: &ResolverOptions) -> Result<TokioResolver> {
    build_with(opts, |_| {})
}

/// Like [`build`], letting the caller adjust the options (cache TTL bounds, timeouts).
pub fn build_with(
    opts: &ResolverOptions,
    adjust: impl FnOnce(&mut hickory_resolver::config::ResolverOpts),
) -> Result<TokioResolver> {
    let path = &opts.resolv_conf;
    // A pod without a resolv.conf (a runtime's `none` network) still serves what needs no
    // names: every lookup then fails, and says why, instead of the proxy not starting.
    let (config, mut ropts) = match std::fs::read(path) {
        Ok(data) => {
            parse_resolv_conf(data).with_context(|| format!("parsing {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "{} does not exist: no nameserver, so host names will not resolve",
                path.display()
            );
            Default::default()
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    adjust(&mut ropts);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    *builder.options_mut() = ropts;
    builder.build().context("building the DNS resolver")
}

#[cfg(test)]
mod tests {
    /// No resolv.conf: the resolver builds (names will not resolve), the proxy still starts.
    #[tokio::test]
    async fn a_missing_resolv_conf_builds_a_resolver_that_resolves_nothing() {
        let opts = super::ResolverOptions {
            resolv_conf: "/nonexistent/resolv.conf".into(),
        };
        let r = super::build(&opts).expect("a resolver without a resolv.conf");
        assert!(r.lookup_ip("example.com.").await.is_err());
    }
}
