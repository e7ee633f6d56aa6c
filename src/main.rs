//! The `magicmx` command: parses arguments, sets up tracing, wires signals.
//! Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use magicmx::config::Config;

#[derive(Parser)]
#[command(
    name = "magicmx",
    version,
    about = "A node of a throttling relay MX network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node.
    Run {
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
        /// Start even though the spool that the marker names is missing,
        /// empty or another one (acknowledged mail in it is given up).
        #[arg(long)]
        new_spool: bool,
    },
    /// Check a config file and exit.
    CheckConfig {
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Inspect the queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// DKIM keys of the node (`[sign]`).
    Sign {
        #[command(subcommand)]
        command: SignCommand,
    },
    /// The network CA and node certificates for gossip.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Postfix policy service for the real MX, alone, on `[policy] listen`.
    Policy {
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Print the MX records to publish for DOMAIN (zone-file syntax); with
    /// --dkim, the node's DKIM selector records for `[sign] domain` instead.
    Zone {
        #[arg(required_unless_present = "dkim")]
        domain: Option<String>,
        /// The domain's real MX host (repeatable).
        #[arg(long = "real-mx", required_unless_present = "dkim", num_args = 1..)]
        real_mx: Vec<String>,
        /// Print the TXT records of the node's DKIM keys (`[sign]` in --config).
        #[arg(long, conflicts_with_all = ["domain", "real_mx", "magic"])]
        dkim: bool,
        /// Preference of the real MX; must be greater than the magic hosts' (10).
        #[arg(long, default_value_t = magicmx::zone::DEFAULT_REAL_PREFERENCE)]
        real_preference: u16,
        /// Magic MX hosts (default: node.hostname from --config).
        #[arg(long, num_args = 1..)]
        magic: Vec<String>,
        /// TTL of the records, in seconds.
        #[arg(long, default_value_t = magicmx::zone::DEFAULT_TTL)]
        ttl: u32,
        /// Read only when no --magic host is given.
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Check a domain's MX records (and with --probe, that its real MX
    /// refuses direct mail from this host); exits non-zero on a failure.
    CheckDomain {
        #[arg(required_unless_present = "dkim")]
        domain: Option<String>,
        #[arg(long)]
        probe: bool,
        /// Check that the DNS publishes the node's DKIM keys (`[sign]`).
        #[arg(long, conflicts_with_all = ["domain", "probe"])]
        dkim: bool,
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Say why mail from this address would be accepted or refused now
    /// (asks the running node through `[admin] listen`).
    Explain {
        ip: std::net::IpAddr,
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    /// A whole network in one process on loopback: three nodes with gossip,
    /// a real MX and DNS, a person and a flood; prints what happens and the
    /// dashboard addresses. Needs no config.
    Demo {
        /// Stop this many seconds after the start (Ctrl-C stops it sooner).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum SignCommand {
    /// Make the keys `[sign]` needs under `data_dir/dkim/` (those missing;
    /// existing keys are kept) and print their TXT records.
    Init {
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the network CA: DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Issue a node certificate: DIR/NAME.pem and DIR/NAME.key; its key's
    /// fingerprint is appended to DIR/network_keys (for `[policy] network_keys`).
    Issue {
        name: String,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queued messages: id, sender, recipients, attempts, next attempt,
    /// last error; then the damaged ones with the reason.
    List {
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    /// With the node stopped: copy every readable message out of a damaged
    /// spool into a fresh one, which takes its place (the damaged one is
    /// moved aside), and list what could not be read.
    Salvage {
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    /// Quarantined mail: list, release (relay it), delete.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    List {
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    Release {
        id: String,
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
    Delete {
        id: String,
        #[arg(long, short, default_value = "node.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("magicmx: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, new_spool } => {
            let config = load(&config)?;
            init_tracing();
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutdown requested");
                    signal.cancel();
                });
                magicmx::run_with(config, shutdown, magicmx::spool::OpenOptions { new_spool }).await
            })
        }
        Command::CheckConfig { config } => {
            let c = load(&config)?;
            println!(
                "{}: ok (node {}, listening on {:?}, accepting {:?})",
                config.display(),
                c.node.name,
                c.smtp.listen,
                c.accept.domains
            );
            Ok(())
        }
        Command::Queue {
            command: QueueCommand::List { config },
        } => {
            let c = load(&config)?;
            let listing = magicmx::spool::Spool::list_readonly(&c.node.data_dir.join("spool"))?;
            print!(
                "{}",
                magicmx::spool_listing(&listing.entries, &listing.damaged)
            );
            Ok(())
        }
        Command::Queue {
            command: QueueCommand::Salvage { config },
        } => {
            let c = load(&config)?;
            let dir = c.node.data_dir.join("spool");
            let report = magicmx::spool::salvage(&dir)?;
            println!(
                "{} message(s) copied into a fresh spool in {}; the damaged spool is in {}",
                report.copied.len(),
                dir.display(),
                report.moved_to.display()
            );
            for (what, why) in &report.lost {
                println!("could not read {what}: {why}");
            }
            println!("{} could not be read", report.lost.len());
            Ok(())
        }
        Command::Queue {
            command: QueueCommand::Quarantine { command },
        } => quarantine(command),
        Command::Ca {
            command: CaCommand::Init { dir },
        } => {
            magicmx::gossip::ca::init(&dir)?;
            println!("network CA written to {}", dir.join("ca.pem").display());
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Issue { name, dir },
        } => {
            magicmx::gossip::ca::issue(&name, &dir)?;
            println!(
                "certificate for {name} written to {}; its key is listed in {}",
                dir.join(format!("{name}.pem")).display(),
                dir.join(magicmx::gossip::ca::NETWORK_KEYS).display()
            );
            Ok(())
        }
        Command::Policy { config } => {
            let config = load(&config)?;
            init_tracing();
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutdown requested");
                    signal.cancel();
                });
                magicmx::policy::run(config, shutdown).await
            })
        }
        Command::Zone {
            dkim: true,
            ttl,
            config,
            ..
        } => {
            let c = load(&config)?;
            let (signing, keys) = dkim_keys(&c, false)?;
            print!(
                "{}",
                magicmx::sign::zone_text(&magicmx::sign::records(&signing, &keys), ttl)
            );
            Ok(())
        }
        Command::Sign {
            command: SignCommand::Init { config },
        } => {
            let c = load(&config)?;
            let (signing, keys) = dkim_keys(&c, true)?;
            print!(
                "{}",
                magicmx::sign::zone_text(
                    &magicmx::sign::records(&signing, &keys),
                    magicmx::zone::DEFAULT_TTL
                )
            );
            Ok(())
        }
        Command::Zone {
            domain,
            real_mx,
            real_preference,
            magic,
            ttl,
            config,
            dkim: false,
        } => {
            let domain = domain.unwrap_or_default();
            let magic = if magic.is_empty() {
                vec![load(&config)?.node.hostname]
            } else {
                magic
            };
            let real: Vec<(String, u16)> =
                real_mx.into_iter().map(|h| (h, real_preference)).collect();
            print!(
                "{}",
                magicmx::zone::zone_records(&domain, &real, &magic, ttl)?
            );
            Ok(())
        }
        Command::CheckDomain {
            dkim: true, config, ..
        } => {
            let c = load(&config)?;
            let (signing, keys) = dkim_keys(&c, false)?;
            let report = block_on(async {
                let dns = magicmx::dns::Dns::new(&c.dns)?;
                anyhow::Ok(magicmx::zone::check_dkim(&dns, &signing, &keys).await)
            })?;
            print!("{report}");
            if !report.ok() {
                anyhow::bail!("{}: {} check(s) failed", report.domain, report.failures());
            }
            Ok(())
        }
        Command::CheckDomain {
            domain,
            probe,
            config,
            dkim: false,
        } => {
            let domain = domain.unwrap_or_default();
            let c = load(&config)?;
            let report = block_on(async {
                let dns = magicmx::dns::Dns::new(&c.dns)?;
                anyhow::Ok(magicmx::zone::check_domain(&dns, &c, &domain, probe).await)
            })?;
            print!("{report}");
            if !report.ok() {
                anyhow::bail!("{domain}: {} check(s) failed", report.failures());
            }
            Ok(())
        }
        Command::Demo { seconds } => {
            // The demo prints its own story; of the nodes' logs, errors only.
            if std::env::var_os("MAGICMX_LOG").is_none() {
                std::env::set_var("MAGICMX_LOG", "error");
            }
            init_tracing();
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(async {
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    signal.cancel();
                });
                magicmx::demo::run(magicmx::demo::Options { seconds }, shutdown).await
            })?;
            println!(
                "summary: person {}/{} relayed; flood {} accepted, {} refused, {} quarantined, {} relayed",
                report.ham_relayed,
                report.ham_sent,
                report.flood_accepted,
                report.flood_refused,
                report.quarantined,
                report.flood_relayed
            );
            if !report.told() {
                anyhow::bail!("the demo did not show what it should (see above)");
            }
            Ok(())
        }
        Command::Explain { ip, config } => {
            let c = load(&config)?;
            let addr = admin_addr(&c)?;
            let (code, body) = block_on(magicmx::admin::request(
                addr,
                "GET",
                &format!("/explain?ip={ip}"),
                None,
            ))?;
            if code != 200 {
                anyhow::bail!("the node answered {code}: {}", body.trim());
            }
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!("{ip}: {}", v["verdict"].as_str().unwrap_or("?"));
            println!("block:   {}", v["block"].as_str().unwrap_or("?"));
            for k in ["connections", "messages", "recipients"] {
                println!(
                    "{k:<12} {} of {} in the window",
                    v["counts"][k], v["limits"][k]
                );
            }
            println!(
                "penalty:  {}s left, {} offense(s)",
                v["penalty_left_secs"], v["offenses"]
            );
            let sus = &v["suspect"];
            println!(
                "suspect:  score {} ({})",
                sus["score"],
                sus["level"].as_str().unwrap_or("?")
            );
            let why = match v["greylist"].as_str().unwrap_or("?") {
                "disabled" => "no (greylisting is off or the address is trusted)",
                "pool_passed" => "no (the pool passed or delivered within pass_ttl)",
                "not_suspect" => "no (not a suspect; mode suspects)",
                "suspect" => "yes (a suspect block)",
                "unknown" => "yes (a pool never seen delivering; mode unknown)",
                "all" => "yes (mode all)",
                _ => "?",
            };
            for r in sus["reasons"].as_array().into_iter().flatten() {
                let what = match (r["kind"].as_str(), r["of"].as_str()) {
                    (Some("dnsbl"), Some(zone)) => format!("listed in {zone}"),
                    (Some("protocol"), Some(test)) => format!("failed the {test} test"),
                    (Some(kind), _) => kind.replace('_', " "),
                    _ => "?".into(),
                };
                println!(
                    "  {:+} {what} ({})",
                    r["weight"].as_i64().unwrap_or(0),
                    r["detail"].as_str().unwrap_or("")
                );
            }
            println!("greylist: {why}");
            println!(
                "origins:  {} node(s) counted it in the window",
                v["origins"]
            );
            if let Some(owners) = v["owners"].as_array() {
                let names: Vec<&str> = owners.iter().filter_map(|o| o.as_str()).collect();
                println!("owners:   {}", names.join(", "));
            }
            for r in v["owner_reports"].as_array().into_iter().flatten() {
                println!(
                    "  {} reports {} connections, {} messages, {} recipients from {} origin(s)",
                    r["owner"].as_str().unwrap_or("?"),
                    r["counts"]["connections"],
                    r["counts"]["messages"],
                    r["counts"]["recipients"],
                    r["origins"]
                );
            }
            Ok(())
        }
    }
}

/// `[sign]` and the node's keys (made when missing, with `create`).
fn dkim_keys(
    c: &Config,
    create: bool,
) -> anyhow::Result<(magicmx::config::Signing, magicmx::sign::Keys)> {
    let signing = c
        .signing()
        .ok_or_else(|| anyhow::anyhow!("sign.domain: is not set (signing is off)"))?;
    let (keys, made) = magicmx::sign::load_or_create(&signing, &c.node.data_dir, create)?;
    for p in made {
        eprintln!("made {}", p.display());
    }
    Ok((signing, keys))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

fn admin_addr(c: &Config) -> anyhow::Result<std::net::SocketAddr> {
    magicmx::admin_addr(c).ok_or_else(|| {
        anyhow::anyhow!("admin.listen: not set (or the node is not running); the command talks to the running node through it")
    })
}

fn quarantine(command: QuarantineCommand) -> anyhow::Result<()> {
    match command {
        QuarantineCommand::List { config } => {
            let c = load(&config)?;
            let listing = magicmx::spool::Spool::list_readonly(&c.node.data_dir.join("spool"))?;
            let q: Vec<_> = listing
                .entries
                .into_iter()
                .filter(|e| e.quarantined)
                .collect();
            print!("{}", magicmx::spool_listing(&q, &[]));
            Ok(())
        }
        QuarantineCommand::Release { id, config } => quarantine_action(&config, &id, "release"),
        QuarantineCommand::Delete { id, config } => quarantine_action(&config, &id, "delete"),
    }
}

fn quarantine_action(config: &std::path::Path, id: &str, action: &str) -> anyhow::Result<()> {
    let c = load(config)?;
    let addr = admin_addr(&c)?;
    let path = format!("/quarantine/{action}?id={id}");
    let token = magicmx::admin::read_token(&c.node.data_dir);
    let (code, body) = block_on(magicmx::admin::request(
        addr,
        "POST",
        &path,
        token.as_deref(),
    ))?;
    if code != 200 {
        anyhow::bail!("{}", body.trim());
    }
    print!("{body}");
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MAGICMX_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("MAGICMX_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        // Colours for a person at a terminal only: journald, files and
        // pipes get plain text.
        use std::io::IsTerminal;
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// Returns on SIGINT or SIGTERM. SIGHUP (whose default would end the
/// process) is logged and ignored: the node does not reload its config; an
/// operator restarts it, which loses nothing.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => tracing::warn!(
                "SIGHUP ignored: magicmx does not reload node.toml; run `magicmx check-config`, then restart"
            ),
        }
    }
}
