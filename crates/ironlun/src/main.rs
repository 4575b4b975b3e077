//! `ironlun`: userspace iSCSI target.
//!
//! `ironlun serve [-c FILE] [--listen ADDR] [--data-dir DIR]`. Without a config file it serves
//! the embedded default: target `iqn.2026-11.io.ironlun:lab` with a 1 GiB sparse-file LUN 0 under
//! the data directory, on 127.0.0.1:3260. It prints `listening ADDR` and `url iscsi://…` lines on
//! stdout once the portals are bound. SIGINT / SIGTERM shut down gracefully.

use clap::{Parser, Subcommand};
use ironlun::config::Config;
use ironlun::server::Server;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ironlun",
    version,
    about = "Userspace iSCSI target with SCSI-3 persistent reservations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured targets (or the embedded default).
    Serve {
        /// TOML configuration file (see conf/reference.toml). Without it: the embedded default.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// Listen on this address instead of the configured portals (port 0: any free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory for LUN files with relative paths (default: ./ironlun-data).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Worker threads of the runtime (overrides `[runtime] worker_threads`; default: one per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Check a configuration file and print what it describes.
    Check {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IRONLUN_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Check { config } => match Config::load(&config, None) {
            Ok(c) => {
                for t in &c.targets {
                    println!("target {}", t.name);
                    for l in &t.luns {
                        println!(
                            "  lun {} {:?} size={:?} block_size={}",
                            l.id, l.backstore, l.size, l.block_size
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ironlun: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve {
            config,
            listen,
            data_dir,
            workers,
        } => serve(config, listen, data_dir, workers),
    }
}

fn serve(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    workers: Option<usize>,
) -> ExitCode {
    let mut cfg = match &config {
        Some(path) => match Config::load(path, data_dir.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ironlun: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::embedded_default(data_dir.unwrap_or_else(|| PathBuf::from("ironlun-data"))),
    };
    if let Some(addr) = listen {
        let tpgt = cfg.portals.first().map_or(1, |p| p.tpgt);
        cfg.portals = vec![ironlun::config::Portal { listen: addr, tpgt }];
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(w) = workers.or(cfg.runtime.worker_threads) {
        rt.worker_threads(w.max(1));
    }
    rt.max_blocking_threads(cfg.runtime.blocking_threads.unwrap_or(64));
    let rt = match rt.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ironlun: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let server = match Server::bind(&cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ironlun: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addrs = server.local_addrs();
        {
            let mut out = std::io::stdout().lock();
            for a in &addrs {
                let _ = writeln!(out, "listening {a}");
            }
            if let (Some(a), Some(t)) = (addrs.first(), cfg.targets.first()) {
                for l in &t.luns {
                    let _ = writeln!(out, "url iscsi://{a}/{}/{}", t.name, l.id);
                }
            }
            let _ = out.flush();
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received");
            let _ = tx.send(true);
        });
        server.run(rx).await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
