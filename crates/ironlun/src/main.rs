//! `ironlun`: userspace iSCSI target.
//!
//! `ironlun serve [-c FILE] [--listen ADDR] [--data-dir DIR] [--admin ADDR|off]`. Without a
//! config file it serves the embedded default: target `iqn.2026-11.io.ironlun:lab` with a 1 GiB
//! sparse-file LUN 0 under the data directory, on 127.0.0.1:3260, and the admin API on the
//! owner-only Unix socket `<data_dir>/admin.sock`. Once bound it prints `listening ADDR` lines,
//! `url iscsi://…` lines and (when the admin API runs) one `admin unix:PATH` (or
//! `admin http://ADDR`) line on stdout. SIGINT / SIGTERM shut down
//! gracefully.
//!
//! `ironlun ctl [--admin URL] [--token-file FILE] reservations|ownership [TARGET/LUN] [--json]`,
//! `ctl own TARGET/LUN HOST [--epoch N]`, `ctl handover prepare|commit|abort TARGET/LUN --from S
//! --to D --epoch N [--deadline-ms N] [--on-deadline abort|refuse]`, `ctl events [--since N]`
//! `ctl port-group [ID STATE] [--json]` (ALUA) and `ctl cluster [move TARGET LUN GATEWAY]` ask a running daemon's admin API. Exit status: 0 done, 1 the daemon refused or is unreachable,
//! 2 usage.
//!
//! `ironlun migrate --admin URL --lun TARGET/LUN --from HOST_S --to HOST_D [hooks…]` hands an
//! LU's write access from one host to another at a live migration's switchover
//! ([`ironlun_cli::migrate`]). Exit status: 0 migrated, 1 rolled back or stuck, 2 usage.
//!
//! `ironlun vhd create|info|check` makes, describes and checks VHD images (`vhd_cmd`); `check`
//! exits as `qemu-img check`: 0 clean, 2 corruptions, 3 leaks only, 1 not completed.

use ironlun_cli::vhd_cmd;

use clap::{Parser, Subcommand};
use ironlun::admin::AdminServer;
use ironlun::config::Config;
use ironlun::server::Server;
use ironlun_cli::ctl;
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
enum CtlCommand {
    /// Persistent reservations per LU: generation, APTPL, reservation, registrations.
    Reservations {
        /// Only this LU, as TARGET/LUN (e.g. iqn.2026-11.io.ironlun:lab/0).
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: Option<(String, u64)>,
        /// Print the admin API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make HOST (an initiator name) the target-managed owner of an LU: only its nexuses
    /// write, every other host reads.
    Own {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: (String, u64),
        /// Initiator name of the owning host.
        host: String,
        /// Epoch of this ownership decision (default: one above the LU's).
        #[arg(long)]
        epoch: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// End HOST's target-managed ownership of an LU: its registration and reservation go and
    /// the initiators manage PR again (what a cluster resource's stop does).
    Release {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: (String, u64),
        /// Initiator name of the owning host.
        host: String,
        /// Epoch of this decision (default: the LU's next).
        #[arg(long)]
        epoch: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Fail an LU (or every LU of a host) over from a failed host: its registrations go, its
    /// commands are aborted and drained before the answer, HOST owns the LU.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["lun", "all_of"])))]
    Failover {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN", requires = "from")]
        lun: Option<(String, u64)>,
        /// The failed host (initiator name).
        #[arg(long, value_name = "DEAD", requires = "lun")]
        from: Option<String>,
        /// Every LU this failed host owns, instead of one LU.
        #[arg(long, value_name = "DEAD", conflicts_with_all = ["lun", "from", "epoch"])]
        all_of: Option<String>,
        /// The host that takes the LU (initiator name).
        #[arg(long, value_name = "HOST")]
        to: String,
        /// Epoch of this decision (default: the LU's next); a retry with the same epoch
        /// changes nothing.
        #[arg(long)]
        epoch: Option<u64>,
        /// Fail over even though the failed host still has a session on the LU (it has been
        /// fenced by the cluster, or is known to be gone).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Owner, epoch, PRgeneration and handover in progress per LU.
    Ownership {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: Option<(String, u64)>,
        #[arg(long)]
        json: bool,
    },
    /// Target-side handover of an LU from one host to another.
    Handover {
        #[command(subcommand)]
        step: HandoverCommand,
    },
    /// ALUA target port groups and their states; with ID and STATE (active_optimized,
    /// active_non_optimized, standby, unavailable, transitioning) set that group's state first.
    PortGroup {
        /// Target port group id.
        #[arg(requires = "state")]
        id: Option<u16>,
        /// New access state of group ID.
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Cluster mode: the gateways with their leases and each LU's active gateway;
    /// `cluster move TARGET LUN GATEWAY` makes GATEWAY the active one for that LU first.
    Cluster {
        #[command(subcommand)]
        command: Option<ClusterCommand>,
        #[arg(long)]
        json: bool,
    },
    /// PR OUT, ownership and handover events.
    Events {
        /// Only events with a sequence number above this.
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long)]
        json: bool,
    },
    /// LUNs: list them, or add, remove or grow one while the daemon runs (saved to its
    /// config file).
    Lun {
        #[command(subcommand)]
        command: LunCommand,
    },
    /// Targets with their LUNs, allowed initiators and whether CHAP is required.
    Target {
        #[command(subcommand)]
        command: TargetCommand,
    },
    /// iSCSI portals: list, add (bound at once) or remove (stops accepting; its connections
    /// keep running).
    Portal {
        #[command(subcommand)]
        command: PortalCommand,
    },
    /// A target's allowed initiators; removing one closes its sessions to the target.
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// Re-read the daemon's config file and apply the difference (as SIGHUP does).
    Reload {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TargetCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a target (no LUNs yet: `ctl lun add`).
    Add {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a target with its LUNs; its sessions are closed.
    Remove {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PortalCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    Add {
        /// IP:PORT to listen on.
        listen: SocketAddr,
        /// Portal group tag (one the daemon already serves).
        #[arg(long)]
        tpgt: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    Remove {
        listen: SocketAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AclCommand {
    List {
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Allow an initiator name or `*`/`?` pattern (a target without an ACL then admits only it).
    Add {
        target: String,
        initiator: String,
        #[arg(long)]
        json: bool,
    },
    Remove {
        target: String,
        initiator: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LunCommand {
    /// Every LUN with its backstore, size in bytes and block size.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a LUN to a target; its sessions see it at their next command.
    Add {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: (String, u64),
        /// ram, file, uring, vhd or block (an rbd LUN needs a pool and an image: add it to
        /// the config file).
        #[arg(long)]
        backstore: String,
        /// Size with a unit (512M, 10G, 1GiB) or bytes.
        #[arg(long)]
        size: Option<String>,
        /// Backstore path (relative to the daemon's data directory); must resolve inside the
        /// data directory or one of `[admin] allowed_paths` (else 403).
        #[arg(long)]
        path: Option<String>,
        /// 512 or 4096.
        #[arg(long)]
        block_size: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a LUN; commands to it then fail with LOGICAL UNIT NOT SUPPORTED.
    Remove {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: (String, u64),
        #[arg(long)]
        json: bool,
    },
    /// Take a LUN offline (flushed first): media commands get NOT READY, OFFLINE.
    Offline {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: (String, u64),
        #[arg(long)]
        json: bool,
    },
    /// Bring a LUN back online: sessions get NOT READY TO READY CHANGE.
    Online {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: (String, u64),
        #[arg(long)]
        json: bool,
    },
    /// Grow a LUN (shrinking is refused); sessions get CAPACITY DATA HAS CHANGED.
    Resize {
        #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
        lun: (String, u64),
        /// New size with a unit (512M, 10G) or bytes.
        size: String,
        #[arg(long)]
        json: bool,
    },
}

/// Arguments shared by the handover steps.
#[derive(clap::Args)]
struct HandoverStepArgs {
    #[arg(value_parser = ctl::parse_selector, value_name = "TARGET/LUN")]
    lun: (String, u64),
    /// Initiator name of the current owner.
    #[arg(long)]
    from: String,
    /// Initiator name of the new owner.
    #[arg(long)]
    to: String,
    /// Epoch of the handover (above the LU's).
    #[arg(long)]
    epoch: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Make GATEWAY the active/optimized gateway of LUN LUN of TARGET (an etcd
    /// compare-and-swap; every gateway follows it).
    Move {
        target: String,
        lun: u64,
        gateway: String,
    },
}

#[derive(Subcommand)]
enum HandoverCommand {
    /// Check the destination is logged in; nothing changes (unless --commit-on-write).
    Prepare {
        #[command(flatten)]
        args: HandoverStepArgs,
        /// Commit the handover when the destination first writes (one node): for hypervisors
        /// with no hook between the source's pause and the destination's resume.
        #[arg(long)]
        commit_on_write: bool,
        /// With --commit-on-write: how long the source's commands in flight may take at that
        /// commit before they are aborted (default 5000).
        #[arg(long, requires = "commit_on_write")]
        deadline_ms: Option<u64>,
    },
    /// Fence the source, drain or abort its commands, flush, move ownership.
    Commit {
        #[command(flatten)]
        args: HandoverStepArgs,
        /// How long the source's commands in flight may take (default 5000).
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// After the deadline: abort the source's commands, or refuse the handover.
        #[arg(long, value_name = "abort|refuse")]
        on_deadline: Option<ironlun_api::OnDeadline>,
    },
    /// Before commit: lift any fence; the source stays the only writer.
    Abort(HandoverStepArgs),
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
        /// Admin API address (overrides `[admin] listen`): `unix:PATH`, or `IP:PORT` (port 0:
        /// any free port; needs `[admin] token_file`), or `off`. Default: the Unix socket
        /// `<data_dir>/admin.sock` (`$RUNTIME_DIRECTORY/admin.sock` under systemd).
        #[arg(long, value_name = "unix:PATH|IP:PORT|off")]
        admin: Option<String>,
        /// Log lines on stderr as text or one JSON object per line [env: IRONLUN_LOG_FORMAT]
        /// [default: text]. Text has ANSI colours only when stderr is a terminal and NO_COLOR
        /// is unset.
        #[arg(long, value_enum, value_name = "FORMAT")]
        log_format: Option<ironlun::logging::LogFormat>,
    },
    /// Ask a running daemon through its admin API.
    Ctl {
        /// Admin API: `unix:PATH` (or a socket path) or `http://HOST:PORT` [env: IRONLUN_ADMIN]
        /// [default: unix:/run/ironlun/admin.sock if it exists, else
        /// unix:ironlun-data/admin.sock].
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// File holding the bearer token (`[admin] token_file` of the daemon)
        /// [env: IRONLUN_ADMIN_TOKEN_FILE].
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Print the admin API's JSON instead of a table (also accepted after the subcommand).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Hand an LU from one host to another at a live migration's switchover.
    Migrate(ironlun_cli::migrate::MigrateArgs),
    /// Create, describe or check a VHD image.
    Vhd {
        #[command(subcommand)]
        command: vhd_cmd::VhdCommand,
    },
    /// Check a configuration file and print what it describes.
    Check {
        #[arg(short = 'c', long = "config")]
        config: PathBuf,
    },
    /// Print the shell completion script for SHELL.
    Completions {
        #[arg(value_enum)]
        shell: ironlun_cli::cli_docs::Shell,
    },
    /// Print the ironlun(1) manual page (roff), or write one page per subcommand into DIR.
    Man {
        /// Write ironlun.1, ironlun-serve.1, ironlun-ctl.1, ... into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Ctl {
        admin,
        token_file,
        json,
        command,
    } = cli.command
    {
        return run_ctl(admin, token_file, json, command);
    }
    if let Command::Vhd { command } = &cli.command {
        let mut out = std::io::stdout().lock();
        return ExitCode::from(vhd_cmd::main(command, &mut out));
    }
    if let Command::Migrate(args) = cli.command {
        let mut out = std::io::stdout().lock();
        return ExitCode::from(ironlun_cli::migrate::main(&args, &mut out));
    }
    if let Command::Completions { .. } | Command::Man { .. } = &cli.command {
        return cli_docs(&cli.command);
    }
    let log_format = match &cli.command {
        Command::Serve { log_format, .. } => *log_format,
        _ => None,
    };
    match ironlun::logging::LogFormat::resolve(log_format) {
        Ok(f) => ironlun::logging::init(f),
        Err(e) => {
            eprintln!("ironlun: {e}");
            return ExitCode::from(2);
        }
    }
    match cli.command {
        Command::Check { config } => match Config::load(&config, None) {
            Ok(c) => {
                if let Some(cl) = &c.cluster {
                    println!(
                        "cluster {} gateway {} etcd {} (lease {:?}, lock delay {:?})",
                        cl.cluster,
                        cl.name,
                        cl.endpoints.join(","),
                        cl.lease_ttl,
                        cl.lock_delay
                    );
                }
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
            admin,
            log_format: _,
        } => serve(config, listen, data_dir, workers, admin),
        Command::Ctl { .. }
        | Command::Migrate(_)
        | Command::Vhd { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => ExitCode::from(2),
    }
}

/// `ironlun completions SHELL` and `ironlun man [--out-dir DIR]`.
fn cli_docs(command: &Command) -> ExitCode {
    use clap::CommandFactory;
    let mut out = std::io::stdout().lock();
    let result = match command {
        Command::Completions { shell } => {
            ironlun_cli::cli_docs::completions(&mut Cli::command(), *shell, &mut out);
            Ok(())
        }
        Command::Man { out_dir: Some(dir) } => {
            ironlun_cli::cli_docs::man_pages(Cli::command(), dir).map(|files| {
                for f in files {
                    let _ = writeln!(out, "{}", f.display());
                }
            })
        }
        _ => ironlun_cli::cli_docs::man_page(Cli::command(), &mut out),
    };
    match result.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ironlun: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `all_json` is `ctl --json`; each subcommand's own `--json` is ORed with it.
fn run_ctl(
    admin: Option<String>,
    token_file: Option<PathBuf>,
    all_json: bool,
    command: CtlCommand,
) -> ExitCode {
    let url = ctl::admin_url(admin);
    let token_file = token_file.or_else(|| {
        std::env::var_os("IRONLUN_ADMIN_TOKEN_FILE")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let result = ctl::Client::new(&url, token_file.as_deref()).and_then(|client| match command {
        CtlCommand::Reservations { lun, json } => {
            let mut out = std::io::stdout().lock();
            ctl::reservations(&client, lun.as_ref(), json || all_json, &mut out)
        }
        CtlCommand::Own {
            lun,
            host,
            epoch,
            json,
        } => ctl::own(
            &client,
            &lun,
            &host,
            epoch,
            json || all_json,
            &mut std::io::stdout().lock(),
        ),
        CtlCommand::Release {
            lun,
            host,
            epoch,
            json,
        } => ctl::release(
            &client,
            &lun,
            &host,
            epoch,
            json || all_json,
            &mut std::io::stdout().lock(),
        ),
        CtlCommand::Failover {
            lun,
            from,
            all_of,
            to,
            epoch,
            force,
            json,
        } => {
            let scope = match (lun, from, all_of) {
                (Some(lu), Some(from), None) => ctl::FailoverScope::Lu { lu, from, epoch },
                (None, None, Some(dead)) => ctl::FailoverScope::AllOf(dead),
                _ => {
                    return Err(ctl::CtlError(
                        "give TARGET/LUN with --from DEAD, or --all-of DEAD".into(),
                    ))
                }
            };
            ctl::failover(
                &client,
                &scope,
                &to,
                force,
                json || all_json,
                &mut std::io::stdout().lock(),
            )
        }
        CtlCommand::Ownership { lun, json } => ctl::ownership(
            &client,
            lun.as_ref(),
            json || all_json,
            &mut std::io::stdout().lock(),
        ),
        CtlCommand::Events { since, json } => ctl::events(
            &client,
            since,
            json || all_json,
            &mut std::io::stdout().lock(),
        ),
        CtlCommand::Cluster { command, json } => ironlun_cli::cluster::ctl(
            &client,
            command.map(
                |ClusterCommand::Move {
                     target,
                     lun,
                     gateway,
                 }| (target, lun, gateway),
            ),
            json || all_json,
            &mut std::io::stdout().lock(),
        ),
        CtlCommand::PortGroup { id, state, json } => ironlun_cli::port_groups::ctl(
            &client,
            id.zip(state),
            json || all_json,
            &mut std::io::stdout().lock(),
        ),
        CtlCommand::Lun { command } => {
            use ironlun_cli::ctl_config as cc;
            let out = &mut std::io::stdout().lock();
            match command {
                LunCommand::List { json } => cc::list(&client, json || all_json, out),
                LunCommand::Add {
                    lun,
                    backstore,
                    size,
                    path,
                    block_size,
                    json,
                } => {
                    let a = cc::AddArgs {
                        backstore,
                        size,
                        path,
                        block_size,
                    };
                    cc::add(&client, &lun, &a, json || all_json, out)
                }
                LunCommand::Remove { lun, json } => {
                    cc::remove(&client, &lun, json || all_json, out)
                }
                LunCommand::Offline { lun, json } => {
                    cc::set_offline(&client, &lun, true, json || all_json, out)
                }
                LunCommand::Online { lun, json } => {
                    cc::set_offline(&client, &lun, false, json || all_json, out)
                }
                LunCommand::Resize { lun, size, json } => {
                    cc::resize(&client, &lun, &size, json || all_json, out)
                }
            }
        }
        CtlCommand::Target { command } => {
            let out = &mut std::io::stdout().lock();
            match command {
                TargetCommand::List { json } => {
                    ironlun_cli::ctl_config::target_list(&client, json || all_json, out)
                }
                TargetCommand::Add { name, json } => ironlun_cli::ctl_config::target_change(
                    &client,
                    &name,
                    true,
                    json || all_json,
                    out,
                ),
                TargetCommand::Remove { name, json } => ironlun_cli::ctl_config::target_change(
                    &client,
                    &name,
                    false,
                    json || all_json,
                    out,
                ),
            }
        }
        CtlCommand::Portal { command } => {
            use ironlun_cli::ctl_config as cc;
            let out = &mut std::io::stdout().lock();
            match command {
                PortalCommand::List { json } => cc::portal_list(&client, json || all_json, out),
                PortalCommand::Add { listen, tpgt, json } => {
                    cc::portal_add(&client, listen, tpgt, json || all_json, out)
                }
                PortalCommand::Remove { listen, json } => {
                    cc::portal_remove(&client, listen, json || all_json, out)
                }
            }
        }
        CtlCommand::Acl { command } => {
            use ironlun_cli::ctl_config as cc;
            let out = &mut std::io::stdout().lock();
            match command {
                AclCommand::List { target, json } => {
                    cc::acl_list(&client, &target, json || all_json, out)
                }
                AclCommand::Add {
                    target,
                    initiator,
                    json,
                } => cc::acl_change(&client, &target, &initiator, true, json || all_json, out),
                AclCommand::Remove {
                    target,
                    initiator,
                    json,
                } => cc::acl_change(&client, &target, &initiator, false, json || all_json, out),
            }
        }
        CtlCommand::Reload { json } => ironlun_cli::ctl_config::reload(
            &client,
            json || all_json,
            &mut std::io::stdout().lock(),
        ),
        CtlCommand::Handover { step } => {
            let (name, a, deadline_ms, on_deadline, commit_on_write) = match step {
                HandoverCommand::Prepare {
                    args,
                    commit_on_write,
                    deadline_ms,
                } => ("prepare", args, deadline_ms, None, commit_on_write),
                HandoverCommand::Abort(a) => ("abort", a, None, None, false),
                HandoverCommand::Commit {
                    args,
                    deadline_ms,
                    on_deadline,
                } => ("commit", args, deadline_ms, on_deadline, false),
            };
            let h = ctl::HandoverArgs {
                lu: a.lun,
                from: a.from,
                to: a.to,
                epoch: a.epoch,
                deadline_ms,
                on_deadline,
                commit_on_write,
            };
            ctl::handover(
                &client,
                name,
                &h,
                a.json || all_json,
                &mut std::io::stdout().lock(),
            )
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ironlun ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    workers: Option<usize>,
    admin: Option<String>,
) -> ExitCode {
    let mut cfg = match &config {
        Some(path) => match Config::load(path, data_dir.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ironlun: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::embedded_default(
            data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("ironlun-data")),
        ),
    };
    if let Some(addr) = listen {
        let tpgt = cfg.portals.first().map_or(1, |p| p.tpgt);
        cfg.portals = vec![ironlun::config::Portal { listen: addr, tpgt }];
    }
    if let Some(a) = &admin {
        if let Err(e) = cfg.admin.override_listen(a) {
            eprintln!("ironlun: {e}");
            return ExitCode::from(2);
        }
    }
    // Every thread pool is bounded by the configuration and counted together: the main
    // runtime's workers, as many I/O threads (`Server::run` starts one shard per worker), and
    // `blocking_threads` blocking threads split between the main runtime and the shards.
    let worker_threads = workers
        .or(cfg.runtime.worker_threads)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
        .max(1);
    let threads =
        ironlun::server::ThreadPlan::new(worker_threads, cfg.runtime.blocking_threads, &cfg);
    tracing::info!(
        workers = threads.workers,
        io_threads = threads.io_threads,
        blocking_main = threads.blocking_main,
        blocking_per_io_thread = threads.blocking_per_io_thread,
        uring_threads = threads.uring_threads,
        max_threads = threads.max_threads(),
        max_buffered = cfg.limits.max_buffered,
        "runtime threads and memory budget"
    );
    // Before the runtime starts its threads: arenas made before stay as they are.
    if !ironlun::heap::configure(cfg.limits.max_buffered) {
        tracing::debug!("allocator policy not set (not glibc, or a setting refused)");
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    rt.worker_threads(threads.workers);
    rt.max_blocking_threads(threads.blocking_main);
    let rt = match rt.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ironlun: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let server = match Server::bind(&cfg, threads).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("ironlun: {e}");
                return ExitCode::FAILURE;
            }
        };
        let live = ironlun::reconfig::Live::install(
            server.registry(),
            Some(server.control()),
            cfg.clone(),
            ironlun::reconfig::Source {
                path: config.clone(),
                data_dir: data_dir.clone(),
                listen,
                admin_override: admin.is_some(),
            },
        );
        // Installed before the `listening` lines: a SIGHUP after them reloads, never kills.
        tokio::spawn(ironlun::reconfig::on_sighup(live.clone()));
        let services = ironlun::admin::Services {
            registry: server.registry(),
            live: Some(live),
        };
        let admin = match AdminServer::bind(&cfg.admin, &cfg.data_dir, services).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("ironlun: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Handlers first: a SIGTERM right after the lines below must shut down gracefully,
        // not kill the process with the default action.
        let signals = install_signals();
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
            // After the url lines: tools that read `listening` then `url` keep working.
            if let Some(a) = admin.as_ref().and_then(AdminServer::endpoint) {
                let _ = writeln!(out, "admin {a}");
            }
            let _ = out.flush();
        }
        let (tx, rx) = tokio::sync::watch::channel(false);
        // systemd (Type=notify): ready once portals and the admin API are bound.
        let admin_addr = admin.as_ref().and_then(AdminServer::endpoint);
        ironlun::sd_notify::ready(&format!(
            "serving {} target(s) on {} portal(s){}",
            cfg.targets.len(),
            addrs.len(),
            admin_addr.map_or_else(String::new, |a| format!(", admin {a}"))
        ));
        if let Some(every) = ironlun::sd_notify::watchdog_interval() {
            tokio::spawn(ironlun::sd_notify::watchdog(every, rx.clone()));
        }
        let admin_task = admin.map(|a| tokio::spawn(a.run(rx.clone())));
        tokio::spawn(async move {
            wait_for_signal(signals).await;
            tracing::info!("signal received");
            ironlun::sd_notify::stopping();
            let _ = tx.send(true);
        });
        server.run(rx).await;
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        ExitCode::SUCCESS
    })
}

type Signals = (
    std::io::Result<tokio::signal::unix::Signal>,
    std::io::Result<tokio::signal::unix::Signal>,
);

/// SIGTERM and SIGINT handlers (installed when called).
fn install_signals() -> Signals {
    use tokio::signal::unix::{signal, SignalKind};
    (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    )
}

async fn wait_for_signal(signals: Signals) {
    match signals {
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
