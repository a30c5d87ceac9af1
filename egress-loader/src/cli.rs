//! The command line: one clap definition in which every setting is a flag and its OpenShift
//! environment variable, and the dispatch to the modes.
use std::{collections::BTreeMap, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::{
    config, dataplane::DataplaneOptions, dns_proxy::DnsProxyOptions, http_proxy::HttpProxyOptions,
    metrics::MetricsOptions, modes, redirect, resolver::ResolverOptions, workers::WorkerOptions,
};

const ABOUT: &str = "The OpenShift egress router, with redirect mode in eBPF.

Reads the same environment variables as the OpenShift egress-router images; every variable can also
be given as the flag shown below.";

const LONG_ABOUT: &str = "The OpenShift egress router, with redirect mode in eBPF.

Reads the same environment variables as the OpenShift egress-router images; every variable can also
be given as the flag shown below. Run with no arguments, it is whichever container of OpenShift's
pod specs its environment describes (one image for all of them):

  EGRESS_ROUTER_MODE=init                the redirect pod's init container: set up macvlan0,
                                         attach the eBPF dataplane, exit 0 (it keeps working)
  EGRESS_ROUTER_MODE unset or legacy     the one container of the legacy redirect pod: the same,
                                         then stay until SIGTERM
  EGRESS_ROUTER_MODE=http-proxy          the HTTP proxy pod's init container: set up macvlan0, exit 0
  EGRESS_HTTP_PROXY_DESTINATION only     its proxy container: serve port 8080 (any non-root user,
                                         no capabilities), through the route the init container set
  EGRESS_ROUTER_MODE=dns-proxy           the DNS proxy pod's init container: set up macvlan0, let
                                         the pod listen below port 1024 unprivileged, exit 0
  EGRESS_DNS_PROXY_DESTINATION only      its proxy container: one TCP listener per line
  EGRESS_ROUTER_MODE=unit-test, EGRESS_HTTP_PROXY_MODE=unit-test, EGRESS_DNS_PROXY_MODE=unit-test
                                         print what OpenShift's image would generate (nftables
                                         rules, squid ACLs, haproxy.cfg), change nothing

One process for both roles of a proxy pod (set up macvlan0, then serve) is an extension, asked for
explicitly: EGRESS_ROUTER_MODE=http-proxy or dns-proxy with EGRESS_ONE_PROCESS=true.

Every long-running role (legacy, the proxies, `egress-router exporter` beside an init-mode
dataplane) serves /metrics, /healthz and /readyz on EGRESS_METRICS_ADDRESS (0.0.0.0:9190).";

const RULES_HELP: &str = "\
EGRESS_DESTINATION (redirect modes), one rule a line, '#' comments and blank lines skipped:
  <localport> <proto> <ip>               80 tcp 203.0.113.25
  <localport> <proto> <ip> <remoteport>  8080 tcp 203.0.113.25 80
  <ip>                                   203.0.113.26   (fallback: everything else; last line)
  proto is tcp, udp or sctp in any case; tabs and trailing '# comments' are accepted.
  Destinations are IPv4 (the eBPF dataplane is IPv4-only); numbers take no leading zeros.
  SCTP rules may change the port too (the dataplane updates SCTP's CRC32c); unit-test mode
  refuses SCTP rules, as OpenShift's router image has no SCTP.

EGRESS_HTTP_PROXY_DESTINATION (http-proxy mode), checked in order, first match wins:
  www.example.com      exactly that host
  *.example.com        the domain and all its subdomains
  203.0.113.0/24       an address or CIDR (literal in the request, or what a name resolves to)
  !<rule>              same match, but deny
  *                    everything (only as the last rule)
  A request that matches no rule is denied (403).

EGRESS_DNS_PROXY_DESTINATION (dns-proxy mode), one listener a line:
  <localport> <ip or name> [<remoteport>]   8443 db.example.com 443

Examples:
  EGRESS_SOURCE=192.168.12.99/24 EGRESS_GATEWAY=192.168.12.1 \\
  EGRESS_DESTINATION='80 tcp 203.0.113.25' egress-router
  egress-router check        validate the environment and exit
  egress-router status       counters and connection table of the redirect dataplane
  egress-router exporter     serve an init-mode dataplane's metrics until SIGTERM";

#[derive(Parser, Debug)]
#[command(name = "egress-router", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = RULES_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub env: EnvSettings,
    #[command(flatten)]
    pub dataplane: DataplaneOptions,
    #[command(flatten)]
    pub http: HttpProxyOptions,
    #[command(flatten)]
    pub dns: DnsProxyOptions,
    #[command(flatten)]
    pub resolver: ResolverOptions,
    #[command(flatten)]
    pub metrics: MetricsOptions,
    #[command(flatten)]
    pub workers: WorkerOptions,
    /// Log lines as text, or as JSON objects (one a line).
    #[arg(
        long,
        env = "EGRESS_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate the configuration and print it as parsed; needs no root, changes nothing.
    Check {
        /// Print instead the file OpenShift's image writes for this configuration: the `nft -f`
        /// input (table, chains, rules) in the redirect modes, squid.conf for the HTTP proxy,
        /// haproxy.cfg for the DNS proxy (with this machine's /etc/resolv.conf nameservers).
        #[arg(long)]
        openshift: bool,
    },
    /// Print the redirect dataplane's counters and connection table.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the redirect dataplane's metrics and health probes until SIGTERM: the
    /// long-running companion of init mode, whose process exits. Finds the maps as `status`
    /// does (the pins, or the program attached to the cluster interface: CAP_SYS_ADMIN);
    /// changes nothing.
    Exporter,
    /// Render an EgressRouter (network.operator.openshift.io/v1, YAML or JSON) into what
    /// OpenShift's cluster network operator creates for it (the NetworkAttachmentDefinition of
    /// the egress-router CNI plugin and the Deployment), plus a Service; print them as YAML.
    /// Invalid resources are refused, naming the field. Needs no cluster.
    RenderEgressrouter {
        /// The EgressRouter manifest (`-` for stdin).
        file: std::path::PathBuf,
    },
}

/// The OpenShift contract, read raw; `config::parse` validates all of it at once.
#[derive(Args, Debug, Clone, Default)]
pub struct EnvSettings {
    /// A.B.C.D or A.B.C.D/len: the address the outside world sees.
    #[arg(long, env = "EGRESS_SOURCE")]
    pub egress_source: Option<String>,
    /// The gateway for EGRESS_SOURCE's network.
    #[arg(long, env = "EGRESS_GATEWAY")]
    pub egress_gateway: Option<String>,
    /// Redirect rules (see below).
    #[arg(long, env = "EGRESS_DESTINATION")]
    pub egress_destination: Option<String>,
    /// init, legacy (default), http-proxy, dns-proxy or unit-test.
    #[arg(long, env = "EGRESS_ROUTER_MODE")]
    pub egress_router_mode: Option<String>,
    /// Non-empty: verbose logging.
    #[arg(long, env = "EGRESS_ROUTER_DEBUG")]
    pub egress_router_debug: Option<String>,
    /// HTTP proxy rules (see below).
    #[arg(long, env = "EGRESS_HTTP_PROXY_DESTINATION")]
    pub egress_http_proxy_destination: Option<String>,
    /// unit-test: validate and print the HTTP proxy rules, then exit.
    #[arg(long, env = "EGRESS_HTTP_PROXY_MODE")]
    pub egress_http_proxy_mode: Option<String>,
    /// DNS proxy rules (see below).
    #[arg(long, env = "EGRESS_DNS_PROXY_DESTINATION")]
    pub egress_dns_proxy_destination: Option<String>,
    /// unit-test: validate and print the DNS proxy rules, then exit.
    #[arg(long, env = "EGRESS_DNS_PROXY_MODE")]
    pub egress_dns_proxy_mode: Option<String>,
    /// Non-empty: log every proxied connection.
    #[arg(long, env = "EGRESS_DNS_PROXY_DEBUG")]
    pub egress_dns_proxy_debug: Option<String>,
    /// `name:count;...`: how many addresses each DNS proxy name has, for the haproxy.cfg the
    /// DNS proxy unit-test mode prints (OpenShift's image looks them up).
    #[arg(long, env = "EGRESS_DNS_SERVERS")]
    pub egress_dns_servers: Option<String>,
    /// true: with EGRESS_ROUTER_MODE http-proxy or dns-proxy, set up macvlan0 and then serve the
    /// proxy in this process (one container for both roles) instead of exiting.
    #[arg(long, env = "EGRESS_ONE_PROCESS")]
    pub egress_one_process: Option<String>,
}

impl EnvSettings {
    /// The settings as the variable map `config::parse` reads.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let pairs = [
            ("EGRESS_SOURCE", &self.egress_source),
            ("EGRESS_GATEWAY", &self.egress_gateway),
            ("EGRESS_DESTINATION", &self.egress_destination),
            ("EGRESS_ROUTER_MODE", &self.egress_router_mode),
            ("EGRESS_ROUTER_DEBUG", &self.egress_router_debug),
            (
                "EGRESS_HTTP_PROXY_DESTINATION",
                &self.egress_http_proxy_destination,
            ),
            ("EGRESS_HTTP_PROXY_MODE", &self.egress_http_proxy_mode),
            (
                "EGRESS_DNS_PROXY_DESTINATION",
                &self.egress_dns_proxy_destination,
            ),
            ("EGRESS_DNS_PROXY_MODE", &self.egress_dns_proxy_mode),
            ("EGRESS_DNS_PROXY_DEBUG", &self.egress_dns_proxy_debug),
            ("EGRESS_DNS_SERVERS", &self.egress_dns_servers),
            ("EGRESS_ONE_PROCESS", &self.egress_one_process),
        ];
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
            .collect()
    }
}

fn init_logging(debug: bool, format: LogFormat) {
    let filter = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        // One object a line, the event's fields at the top level next to "message".
        LogFormat::Json => logs.json().flatten_event(true).try_init(),
    };
}

pub fn main() -> ExitCode {
    // Invoked by a container runtime as the `egress-router` CNI plugin (OpenShift 4.x).
    if crate::cni::invoked() {
        return crate::cni::main();
    }
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Status { json }) => {
            init_logging(false, cli.log_format);
            return report(crate::dataplane::status::print(&cli.dataplane, *json));
        }
        Some(Command::RenderEgressrouter { file }) => return render_egressrouter(file),
        Some(Command::Exporter) => {
            // The exporter reads no EGRESS_* variable but the debug switch.
            let debug = cli
                .env
                .egress_router_debug
                .as_deref()
                .is_some_and(|v| !v.is_empty());
            init_logging(debug, cli.log_format);
            return report(redirect::exporter(&cli.dataplane, &cli.metrics));
        }
        _ => {}
    }
    let cfg = match config::parse(&cli.env.to_map()) {
        Ok(cfg) => cfg,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(1);
        }
    };
    init_logging(cfg.debug, cli.log_format);
    match cli.command {
        Some(Command::Check { openshift }) => {
            if openshift {
                print!(
                    "{}",
                    config::openshift_config(&cfg, &modes::pod_nameservers(&cli.resolver))
                );
            } else {
                print!("{}", config::describe(&cfg));
            }
            ExitCode::SUCCESS
        }
        _ => report(modes::run(&cfg, &cli)),
    }
}

fn render_egressrouter(file: &std::path::Path) -> ExitCode {
    let text = if file == std::path::Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
    } else {
        std::fs::read_to_string(file)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("egress-router: reading {}: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    // YAML is a superset of JSON: one parser for both.
    let resource: serde_json::Value = match serde_norway::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("egress-router: {} is not YAML: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    match config::egressrouter::render_egressrouter(&resource) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in problems {
                eprintln!("{}: {p}", file.display());
            }
            ExitCode::from(1)
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-router: {e:#}");
            ExitCode::from(1)
        }
    }
}
