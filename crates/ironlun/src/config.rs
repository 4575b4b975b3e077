//! The daemon's TOML configuration: portals, negotiation offers, targets and their LUNs.
//!
//! Every error names the file, the line and the key (`conf/ironlun.toml:12: target[0].lun[1].block_size: …`).
//! Without a file the daemon serves [`Config::embedded_default`]. `conf/reference.toml` documents
//! every key; a test parses every file in `conf/`.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

mod cluster;
pub use cluster::Cluster;

/// The embedded default target name.
pub const DEFAULT_TARGET: &str = "iqn.2026-11.io.ironlun:lab";
/// The iSCSI well-known port (RFC 7143 §13.4? — IANA 3260).
pub const DEFAULT_PORT: u16 = 3260;

/// A configuration error with its location.
#[derive(Debug)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}: {}", self.file, l, self.key, self.message),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Raw file shape (serde). Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    portal: Vec<RawPortal>,
    #[serde(default)]
    negotiation: Option<RawNegotiation>,
    data_dir: Option<Spanned<String>>,
    #[serde(default)]
    runtime: Option<RawRuntime>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    limits: Option<RawLimits>,
    #[serde(default)]
    target: Vec<RawTarget>,
    #[serde(default)]
    discovery: Option<RawDiscovery>,
    #[serde(default)]
    admin: Option<RawAdmin>,
    #[serde(default)]
    port_group: Vec<RawPortGroup>,
    cluster: Option<cluster::RawCluster>,
}

/// `[[port_group]]`: an ALUA target port group (SPC-4 §5.16).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortGroup {
    id: Spanned<i64>,
    state: Option<Spanned<String>>,
    #[serde(default)]
    tpgts: Option<Spanned<Vec<u16>>>,
}

/// `[admin]`: the HTTP/JSON admin API.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    enabled: Option<bool>,
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    allowed_paths: Option<Vec<Spanned<String>>>,
}

/// `[discovery]`: discovery sessions (SendTargets).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    chap: Option<RawChap>,
}

/// `chap = { user, secret, mutual_user, mutual_secret }` of a target or of `[discovery]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChap {
    user: Spanned<String>,
    secret: Spanned<String>,
    mutual_user: Option<Spanned<String>>,
    mutual_secret: Option<Spanned<String>>,
}

/// Never prints the secrets.
impl fmt::Debug for RawChap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawChap")
            .field("user", self.user.get_ref())
            .finish_non_exhaustive()
    }
}

/// `[limits]`: daemon-wide bounds.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<Spanned<usize>>,
    max_buffered: Option<Spanned<SizeValue>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<Spanned<usize>>,
    blocking_threads: Option<Spanned<usize>>,
    busy_poll_us: Option<Spanned<u64>>,
}

/// `[timeouts]`, in whole seconds.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    nop_interval: Option<Spanned<u64>>,
    nop_timeout: Option<Spanned<u64>>,
    login_timeout: Option<Spanned<u64>>,
    discovery_idle: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortal {
    listen: Spanned<String>,
    #[serde(default)]
    tpgt: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNegotiation {
    header_digest: Option<Spanned<Vec<String>>>,
    data_digest: Option<Spanned<Vec<String>>>,
    initial_r2t: Option<bool>,
    immediate_data: Option<bool>,
    max_recv_data_segment_length: Option<Spanned<u32>>,
    max_burst_length: Option<Spanned<u32>>,
    first_burst_length: Option<Spanned<u32>>,
    default_time2wait: Option<Spanned<u16>>,
    default_time2retain: Option<Spanned<u16>>,
    max_outstanding_r2t: Option<Spanned<u16>>,
    cmd_window: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Spanned<String>,
    alias: Option<String>,
    #[serde(default)]
    lun: Vec<RawLun>,
    /// Initiator names and `*`/`?` patterns that may log in; absent: everyone, empty: nobody.
    allowed_initiators: Option<Vec<Spanned<String>>>,
    max_sessions: Option<Spanned<usize>>,
    /// Per-initiator LUN masking.
    #[serde(default)]
    initiator: Vec<RawInitiator>,
    /// CHAP required to log in to this target.
    chap: Option<RawChap>,
    /// Who may send TARGET WARM RESET / TARGET COLD RESET: "chap", "all" or "none".
    allow_target_reset: Option<Spanned<String>>,
}

/// `[[target.initiator]]`: the LUNs one initiator (name or pattern) sees.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInitiator {
    name: Spanned<String>,
    luns: Spanned<Vec<Spanned<u64>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLun {
    id: Spanned<u64>,
    backstore: Spanned<String>,
    path: Option<Spanned<String>>,
    size: Option<Spanned<SizeValue>>,
    block_size: Option<Spanned<u32>>,
    serial: Option<Spanned<String>>,
    naa: Option<Spanned<String>>,
    #[serde(default)]
    read_only: bool,
    thin: Option<bool>,
    write_cache: Option<bool>,
    physical_block_size: Option<Spanned<u32>>,
    direct: Option<Spanned<bool>>,
    ring_depth: Option<Spanned<u32>>,
    pool: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    ceph_conf: Option<Spanned<String>>,
    client: Option<Spanned<String>>,
    sanitize_rate: Option<Spanned<SizeValue>>,
    #[serde(default)]
    offline: bool,
    persist_reservations: Option<Spanned<String>>,
}

/// An RBD pool, image or client id as librados takes it: 1 to 255 characters, no '/' or
/// '@' (they separate pool, image and snapshot), no whitespace or control characters.
fn rbd_name_ok(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && !s
            .chars()
            .any(|c| c == '/' || c == '@' || c.is_whitespace() || c.is_control())
}

/// A size as an integer (bytes) or a string with a unit ("1GiB", "512MiB", "4096").
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub portals: Vec<Portal>,
    pub negotiation: Negotiation,
    /// Where relative LUN paths live (and where the default LUN is created).
    pub data_dir: PathBuf,
    pub targets: Vec<Target>,
    pub runtime: Runtime,
    /// The `[limits]` table.
    pub limits: Limits,
    /// The `[timeouts]` table: NOP-In pings, login and discovery-idle bounds per connection.
    pub timeouts: ironlun_iscsi::connection::Timeouts,
    /// `[discovery] chap`: CHAP required for discovery sessions.
    pub discovery_chap: Option<ironlun_iscsi::chap::ChapConfig>,
    /// The `[admin]` table: the admin API.
    pub admin: Admin,
    /// `[[port_group]]`: ALUA target port groups as configured (portals listed in none join
    /// group 1 when the daemon builds its LUs, see [`ironlun_scsi::alua::PortGroups::new`]).
    pub port_groups: Vec<ironlun_scsi::alua::PortGroup>,
    /// `[cluster]`: this daemon as a gateway of several ([`Cluster`]); `None`: one node.
    pub cluster: Option<Cluster>,
}

/// File name of the admin API's Unix socket in its default directory ([`default_admin_socket`]).
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    /// A Unix socket, mode 0600 (only the daemon's user, root included, can connect); `None`:
    /// the default path, [`default_admin_socket`] of the data directory.
    Unix(Option<PathBuf>),
    /// TCP (`IP:PORT`): only with a bearer token (`token_file`), whatever the address.
    Tcp(SocketAddr),
}

/// The default admin socket: `$RUNTIME_DIRECTORY/admin.sock` under systemd (the unit's
/// `RuntimeDirectory=ironlun`, i.e. `/run/ironlun/admin.sock`), else `<data_dir>/admin.sock`.
pub fn default_admin_socket(data_dir: &Path) -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd lists several directories separated by ':' when the unit names several.
        Some(d) => {
            let first = d
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            PathBuf::from(first).join(ADMIN_SOCKET_NAME)
        }
        None => data_dir.join(ADMIN_SOCKET_NAME),
    }
}

/// The `[admin]` table: where the HTTP/JSON admin API listens and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// `false`: no admin API (`ironlun ctl` cannot reach the daemon).
    pub enabled: bool,
    /// Unix socket (the default) or TCP.
    pub listen: AdminListen,
    /// A file holding the bearer token every request must carry; `None`: no token (only
    /// allowed on the Unix socket). Required for TCP.
    pub token_file: Option<PathBuf>,
    /// Where `token_file` was configured (`file:line: admin.token_file`), for later errors.
    pub token_origin: String,
    /// Directories (absolute) besides `data_dir` where LUN files, VHD images and block devices
    /// added through the admin API may live (`admin.allowed_paths`); see
    /// [`crate::reconfig::confine_lun_path`]. The config file's own LUN paths are not limited.
    pub allowed_paths: Vec<PathBuf>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            enabled: true,
            listen: AdminListen::Unix(None),
            token_file: None,
            token_origin: "admin.token_file".into(),
            allowed_paths: Vec::new(),
        }
    }
}

/// Parse an admin address: `unix:PATH` (relative to `base`) or `IP:PORT`.
fn parse_admin_listen(text: &str, base: &Path) -> Result<AdminListen, String> {
    if let Some(p) = text.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("unix: needs a socket path, e.g. unix:/run/ironlun/admin.sock".into());
        }
        return Ok(AdminListen::Unix(Some(base.join(p))));
    }
    text.parse::<SocketAddr>()
        .map(AdminListen::Tcp)
        .map_err(|_| {
            "expected unix:PATH or IP:PORT, e.g. unix:/run/ironlun/admin.sock or 127.0.0.1:3262"
                .to_string()
        })
}

/// The message for a TCP admin address without a token.
fn tcp_needs_token(addr: SocketAddr) -> String {
    format!(
        "admin API on TCP {addr} needs a bearer token: set admin.token_file (a file with one line of at least 16 characters), or leave admin.listen unset to use the owner-only Unix socket"
    )
}

impl Admin {
    /// Apply `--admin unix:PATH|IP:PORT|off`. TCP needs `[admin] token_file` (as in the file).
    pub fn override_listen(&mut self, arg: &str) -> Result<(), String> {
        if arg.eq_ignore_ascii_case("off") {
            self.enabled = false;
            return Ok(());
        }
        let cwd = Path::new("");
        let listen =
            parse_admin_listen(arg, cwd).map_err(|e| format!("--admin {arg:?}: {e} or off"))?;
        if let AdminListen::Tcp(addr) = listen {
            if self.token_file.is_none() {
                return Err(format!("--admin {addr}: {}", tcp_needs_token(addr)));
            }
        }
        self.enabled = true;
        self.listen = listen;
        Ok(())
    }
}

/// The `[limits]` table: daemon-wide bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Live sessions (normal and discovery) the daemon admits; logins beyond it fail with
    /// OUT OF RESOURCES (RFC 7143 §11.13.5).
    pub max_sessions: usize,
    /// Bytes of payload held for peers, daemon-wide ([`crate::budget::MemoryBudget`]): Data-In
    /// of commands in flight or waiting on a slow socket, and received Data-Out. A connection
    /// whose next command finds no room stops reading until room frees.
    pub max_buffered: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: ironlun_iscsi::acl::DEFAULT_MAX_SESSIONS,
            max_buffered: crate::budget::DEFAULT_MAX_BUFFERED,
        }
    }
}

/// Smallest `max_buffered` (1 MiB): below it even a modest READ runs alone.
pub const MAX_BUFFERED_MIN: u64 = 1 << 20;
/// Largest `max_buffered` (1 TiB).
pub const MAX_BUFFERED_MAX: u64 = 1 << 40;

/// Largest `max_sessions` (a session needs a TSIH, a 16-bit non-zero number: RFC 7143 §11.12.6).
pub const MAX_SESSIONS_BOUND: usize = 65535;

/// The `[runtime]` table: threads of the async runtimes and of their blocking pools, and the
/// connections' busy polling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// Async worker threads of the main runtime, and as many I/O threads (connection shards,
    /// see [`crate::server`]); `None`: one per core.
    pub worker_threads: Option<usize>,
    /// Blocking threads (file-backstore I/O, state-file writes, flushes) of all runtimes
    /// together, split between the main runtime and the I/O threads
    /// ([`crate::server::blocking_split`]); `None`: 16 per runtime, at least
    /// [`DEFAULT_BLOCKING_THREADS`] ([`crate::server::default_blocking_threads`]).
    pub blocking_threads: Option<usize>,
    /// `busy_poll_us`: how long a connection polls its socket for the next command after a
    /// response with nothing else in flight, before sleeping in the reactor (0: never). Costs
    /// at most that much CPU per response, and little once an initiator is idle
    /// (`crate::server`'s `BusyPoll`).
    pub busy_poll: std::time::Duration,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            worker_threads: None,
            blocking_threads: None,
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

/// Default `[runtime] busy_poll_us`: about one loopback round trip of an initiator's next
/// command after a response.
pub const DEFAULT_BUSY_POLL: std::time::Duration = std::time::Duration::from_micros(100);

/// Least default `[runtime] blocking_threads` (the total across all runtimes).
pub const DEFAULT_BLOCKING_THREADS: usize = 64;

#[derive(Debug, Clone)]
pub struct Portal {
    pub listen: SocketAddr,
    pub tpgt: u16,
}

/// The `[negotiation]` table: what we offer (RFC 7143 §13). Defaults do not throttle.
#[derive(Debug, Clone)]
pub struct Negotiation {
    pub offers: ironlun_iscsi::negotiation::Offers,
    /// CmdSN window granted to each session (MaxCmdSN − ExpCmdSN + 1).
    pub cmd_window: u32,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub alias: Option<String>,
    pub luns: Vec<Lun>,
    /// Who may log in (and see the target in SendTargets).
    pub acl: ironlun_iscsi::acl::Acl,
    /// Which LUNs each initiator sees.
    pub masking: ironlun_iscsi::acl::LunMasking,
    /// Live sessions this target admits.
    pub max_sessions: usize,
    /// CHAP required to log in (`None`: AuthMethod=None).
    pub chap: Option<ironlun_iscsi::chap::ChapConfig>,
    /// Which sessions may reset the whole target (`allow_target_reset`).
    pub allow_target_reset: TargetResetPolicy,
}

/// `allow_target_reset` of a `[[target]]`: which sessions may send the task management
/// functions TARGET WARM RESET and TARGET COLD RESET (RFC 7143 §11.5.1), which act on every
/// LU and, for a cold reset, every session of the target, whoever else uses it. A refused
/// request is answered "Function authorization failed" (response 6, RFC 7143 §11.6.1) and
/// changes nothing. The other functions (ABORT TASK … LOGICAL UNIT RESET) are not affected.
/// Decided once per session, when it logs in (`crate::target::Nexus::may_reset_target`); a
/// reload changes it for later logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetResetPolicy {
    /// `"chap"` (default): only sessions that authenticated with CHAP at login; on a target
    /// without `chap`, nobody.
    #[default]
    Chap,
    /// `"all"`: every session of the target (a lab, a conformance run).
    All,
    /// `"none"`: nobody.
    None,
}

impl TargetResetPolicy {
    /// The key's values, as written in the config.
    pub const VALUES: &'static str = "\"chap\", \"all\" or \"none\"";

    fn parse(s: &str) -> Option<Self> {
        match s {
            "chap" => Some(Self::Chap),
            "all" => Some(Self::All),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// Whether a session that did (`chap`) or did not authenticate with CHAP may reset the
    /// target.
    pub fn allows(self, chap: bool) -> bool {
        match self {
            Self::Chap => chap,
            Self::All => true,
            Self::None => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackstoreKind {
    Ram,
    File {
        path: PathBuf,
    },
    /// A file driven through io_uring; falls back to `File` when the kernel refuses io_uring.
    Uring {
        path: PathBuf,
        direct: bool,
        ring_depth: u32,
    },
    /// A VHD image (fixed, dynamic or differencing); its virtual size is the LUN's capacity.
    /// A missing file is created as a dynamic VHD of the configured `size`.
    Vhd {
        path: PathBuf,
    },
    /// A block device (absolute path, never joined to the data directory), opened exclusively;
    /// its size is the LUN's capacity.
    Block {
        path: PathBuf,
    },
    /// A Ceph RBD image (`pool/image`) through librbd, as Ceph client `client.<client>` of the
    /// cluster `ceph_conf` describes (librados' default search when `None`). `size` creates a
    /// missing image; an existing image's size is the LUN's capacity.
    Rbd {
        pool: String,
        image: String,
        ceph_conf: Option<PathBuf>,
        client: String,
    },
}

#[derive(Debug, Clone)]
pub struct Lun {
    pub id: u64,
    pub backstore: BackstoreKind,
    /// Size in bytes; `None` for a file: use the existing file's size.
    pub size: Option<u64>,
    pub block_size: u32,
    pub serial: String,
    pub naa: [u8; 16],
    pub read_only: bool,
    pub thin: bool,
    pub write_cache: bool,
    /// Logical blocks per physical block, as a power of two (READ CAPACITY (16) LOGICAL
    /// BLOCKS PER PHYSICAL BLOCK EXPONENT, SBC-3 §5.16.2); from `physical_block_size`, default 0.
    pub physical_block_exponent: u8,
    /// `sanitize_rate`: bytes per second a SANITIZE may write or deallocate (unpaced if
    /// absent).
    pub sanitize_rate: Option<u64>,
    /// `offline`: the LU starts offline (NOT READY, 04h/12h); `ironlun ctl lun offline|online`
    /// sets and clears it.
    pub offline: bool,
    /// `persist_reservations`: `"aptpl"` (default) keeps the PR state across a restart only
    /// while APTPL is set (SPC-4 §5.13.5.1); `"always"` keeps it whatever APTPL says.
    pub persist_reservations: ironlun_scsi::pr::PrPersistence,
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text
            .get(..offset)
            .map_or(0, |s| s.matches('\n').count())
            + 1
    }
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.to_string(),
            line: Some(self.line_of(span.start)),
            key: key.into(),
            message: msg.into(),
        })
    }
}

impl Config {
    /// The embedded default: one portal on 127.0.0.1:3260, target `iqn.2026-11.io.ironlun:lab`,
    /// LUN 0 a 1 GiB sparse file `lun0.img` under `data_dir`, 512-byte blocks.
    pub fn embedded_default(data_dir: PathBuf) -> Config {
        let name = DEFAULT_TARGET.to_string();
        let lun = Lun {
            id: 0,
            backstore: BackstoreKind::File {
                path: data_dir.join("lun0.img"),
            },
            size: Some(1 << 30),
            block_size: 512,
            serial: derive_serial(&name, 0),
            naa: derive_naa(&name, 0),
            read_only: false,
            thin: true,
            write_cache: true,
            physical_block_exponent: 0,
            sanitize_rate: None,
            offline: false,
            persist_reservations: Default::default(),
        };
        Config {
            portals: vec![Portal {
                listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
                tpgt: 1,
            }],
            negotiation: Negotiation {
                offers: Default::default(),
                cmd_window: 128,
            },
            data_dir,
            targets: vec![Target {
                name,
                alias: Some("ironlun lab".into()),
                luns: vec![lun],
                acl: Default::default(),
                masking: Default::default(),
                max_sessions: ironlun_iscsi::acl::DEFAULT_MAX_SESSIONS_PER_TARGET,
                chap: None,
                allow_target_reset: TargetResetPolicy::default(),
            }],
            runtime: Runtime::default(),
            limits: Limits::default(),
            timeouts: Default::default(),
            discovery_chap: None,
            admin: Admin::default(),
            port_groups: Vec::new(),
            cluster: None,
        }
    }

    /// Read and validate a config file. Relative `data_dir` and LUN paths resolve against
    /// `data_dir_override`, else the file's `data_dir`, else the file's directory.
    pub fn load(path: &Path, data_dir_override: Option<&Path>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            key: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(
            &path.display().to_string(),
            &text,
            path.parent(),
            data_dir_override,
        )
    }

    /// Parse config text; `file` names it in errors.
    pub fn parse(
        file: &str,
        text: &str,
        base: Option<&Path>,
        data_dir_override: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let cx = Ctx { file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| cx.line_of(s.start));
            let msg = e.message().to_string();
            // serde names the offending key in the message ("unknown field `x`"), or in the path.
            let key = msg
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| "-".to_string());
            ConfigError {
                file: file.to_string(),
                line,
                key,
                message: msg,
            }
        })?;

        let base = base
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let data_dir = match (data_dir_override, &raw.data_dir) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(d)) => base.join(d.get_ref()),
            (None, None) => base.clone(),
        };

        let mut portals = Vec::new();
        for (i, p) in raw.portal.iter().enumerate() {
            let listen: SocketAddr = match p.listen.get_ref().parse() {
                Ok(a) => a,
                Err(_) => match format!("{}:{}", p.listen.get_ref(), DEFAULT_PORT).parse() {
                    Ok(a) => a,
                    Err(_) => {
                        return cx.err(
                            p.listen.span(),
                            format!("portal[{i}].listen"),
                            "expected IP:PORT, e.g. 127.0.0.1:3260",
                        )
                    }
                },
            };
            let tpgt = match &p.tpgt {
                Some(t) if *t.get_ref() == 0 => {
                    return cx.err(t.span(), format!("portal[{i}].tpgt"), "must be 1..=65535")
                }
                Some(t) => *t.get_ref(),
                None => 1,
            };
            portals.push(Portal { listen, tpgt });
        }
        if portals.is_empty() {
            portals.push(Portal {
                listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
                tpgt: 1,
            });
        }

        let negotiation = parse_negotiation(&cx, raw.negotiation.unwrap_or_default())?;
        let mut runtime = Runtime::default();
        if let Some(r) = &raw.runtime {
            if let Some(w) = &r.worker_threads {
                if !(1..=256).contains(w.get_ref()) {
                    return cx.err(w.span(), "runtime.worker_threads", "must be 1..=256");
                }
                runtime.worker_threads = Some(*w.get_ref());
            }
            if let Some(b) = &r.blocking_threads {
                if !(1..=1024).contains(b.get_ref()) {
                    return cx.err(b.span(), "runtime.blocking_threads", "must be 1..=1024");
                }
                runtime.blocking_threads = Some(*b.get_ref());
            }
            if let Some(b) = &r.busy_poll_us {
                if *b.get_ref() > 1000 {
                    return cx.err(b.span(), "runtime.busy_poll_us", "must be 0..=1000");
                }
                runtime.busy_poll = std::time::Duration::from_micros(*b.get_ref());
            }
        }

        let timeouts = parse_timeouts(&cx, raw.timeouts.unwrap_or_default())?;

        let mut targets = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (ti, t) in raw.target.iter().enumerate() {
            let name = t.name.get_ref().clone();
            if let Err(m) = validate_iscsi_name(&name) {
                return cx.err(t.name.span(), format!("target[{ti}].name"), m);
            }
            if !names.insert(name.to_ascii_lowercase()) {
                return cx.err(
                    t.name.span(),
                    format!("target[{ti}].name"),
                    "duplicate target name",
                );
            }
            let mut luns: Vec<Lun> = Vec::new();
            for (li, l) in t.lun.iter().enumerate() {
                let key = |k: &str| format!("target[{ti}].lun[{li}].{k}");
                let id = *l.id.get_ref();
                if id >= 16384 {
                    return cx.err(
                        l.id.span(),
                        key("id"),
                        "LUN must be < 16384 (flat addressing, SAM-5 §4.7)",
                    );
                }
                if luns.iter().any(|o| o.id == id) {
                    return cx.err(l.id.span(), key("id"), format!("duplicate LUN {id}"));
                }
                // Cluster mode: every gateway reads and writes the same medium, with no page
                // cache of one gateway between it and the others (issue 18).
                if raw.cluster.is_some() {
                    let shared = match l.backstore.get_ref().as_str() {
                        "block" | "rbd" => true,
                        "uring" => l.direct.as_ref().is_some_and(|d| *d.get_ref()),
                        _ => false,
                    };
                    if !shared {
                        return cx.err(
                            l.backstore.span(),
                            key("backstore"),
                            "in cluster mode a LUN's medium is shared by every gateway without a page cache between them: backstore = \"uring\" with direct = true, \"block\" or \"rbd\"",
                        );
                    }
                }
                let block_size = match &l.block_size {
                    Some(b) if *b.get_ref() == 512 || *b.get_ref() == 4096 => *b.get_ref(),
                    Some(b) => return cx.err(b.span(), key("block_size"), "must be 512 or 4096"),
                    None => 512,
                };
                let size = match &l.size {
                    Some(s) => match parse_size(s.get_ref()) {
                        Ok(0) => return cx.err(s.span(), key("size"), "must be > 0"),
                        Ok(v) if v % u64::from(block_size) != 0 => {
                            return cx.err(
                                s.span(),
                                key("size"),
                                format!("{v} is not a multiple of block_size {block_size}"),
                            )
                        }
                        Ok(v) => Some(v),
                        Err(m) => return cx.err(s.span(), key("size"), m),
                    },
                    None => None,
                };
                let backstore = match l.backstore.get_ref().as_str() {
                    "ram" => {
                        if size.is_none() {
                            return cx.err(
                                l.backstore.span(),
                                key("size"),
                                "a ram backstore needs a size",
                            );
                        }
                        BackstoreKind::Ram
                    }
                    "file" | "uring" => {
                        let Some(p) = &l.path else {
                            return cx.err(
                                l.backstore.span(),
                                key("path"),
                                "a file or uring backstore needs a path",
                            );
                        };
                        let path = data_dir.join(p.get_ref());
                        if l.backstore.get_ref() == "file" {
                            BackstoreKind::File { path }
                        } else {
                            let ring_depth = match &l.ring_depth {
                                Some(d) if !(1..=4096).contains(d.get_ref()) => {
                                    return cx.err(d.span(), key("ring_depth"), "must be 1..=4096")
                                }
                                Some(d) => *d.get_ref(),
                                None => 128,
                            };
                            BackstoreKind::Uring {
                                path,
                                direct: l.direct.as_ref().is_some_and(|d| *d.get_ref()),
                                ring_depth,
                            }
                        }
                    }
                    "vhd" => {
                        let Some(p) = &l.path else {
                            return cx.err(
                                l.backstore.span(),
                                key("path"),
                                "a vhd backstore needs a path",
                            );
                        };
                        BackstoreKind::Vhd {
                            path: data_dir.join(p.get_ref()),
                        }
                    }
                    "block" => {
                        let Some(p) = &l.path else {
                            return cx.err(
                                l.backstore.span(),
                                key("path"),
                                "a block backstore needs the path of a block device (e.g. /dev/sdb)",
                            );
                        };
                        let path = PathBuf::from(p.get_ref());
                        if !path.is_absolute() {
                            return cx.err(
                                p.span(),
                                key("path"),
                                "a block device path must be absolute (e.g. /dev/sdb)",
                            );
                        }
                        if let Some(s) = &l.size {
                            return cx.err(
                                s.span(),
                                key("size"),
                                "not allowed for a block backstore: the device decides the size",
                            );
                        }
                        BackstoreKind::Block { path }
                    }
                    "rbd" => {
                        if let Some(p) = &l.path {
                            return cx.err(
                                p.span(),
                                key("path"),
                                "not used by an rbd backstore: it names its image with pool and image",
                            );
                        }
                        let name = |v: &Option<Spanned<String>>, k: &str, default: Option<&str>| {
                            match v {
                                Some(v) if rbd_name_ok(v.get_ref()) => Ok(v.get_ref().clone()),
                                Some(v) => cx.err(
                                    v.span(),
                                    key(k),
                                    "must be 1 to 255 characters, none of them '/', '@', whitespace or control characters",
                                ),
                                None => match default {
                                    Some(d) => Ok(d.to_owned()),
                                    None => cx.err(
                                        l.backstore.span(),
                                        key(k),
                                        "an rbd backstore needs the RBD image's name (image = \"lun0\")",
                                    ),
                                },
                            }
                        };
                        let image = name(&l.image, "image", None)?;
                        let pool = name(&l.pool, "pool", Some("rbd"))?;
                        let client = name(&l.client, "client", Some("admin"))?;
                        let ceph_conf = match &l.ceph_conf {
                            Some(c) if c.get_ref().is_empty() => {
                                return cx.err(c.span(), key("ceph_conf"), "must be a path to a ceph.conf")
                            }
                            Some(c) => Some(data_dir.join(c.get_ref())),
                            None => None,
                        };
                        BackstoreKind::Rbd {
                            pool,
                            image,
                            ceph_conf,
                            client,
                        }
                    }
                    other => {
                        return cx.err(
                            l.backstore.span(),
                            key("backstore"),
                            format!(
                            "unknown backstore {other:?}; expected \"file\", \"uring\", \"vhd\", \"block\", \"rbd\" or \"ram\""
                        ),
                        )
                    }
                };
                if !matches!(backstore, BackstoreKind::Uring { .. }) {
                    for (name, span) in [
                        ("direct", l.direct.as_ref().map(Spanned::span)),
                        ("ring_depth", l.ring_depth.as_ref().map(Spanned::span)),
                    ] {
                        if let Some(span) = span {
                            return cx.err(
                                span,
                                key(name),
                                "applies only to backstore = \"uring\"",
                            );
                        }
                    }
                }
                if !matches!(backstore, BackstoreKind::Rbd { .. }) {
                    for (name, span) in [
                        ("pool", l.pool.as_ref().map(Spanned::span)),
                        ("image", l.image.as_ref().map(Spanned::span)),
                        ("ceph_conf", l.ceph_conf.as_ref().map(Spanned::span)),
                        ("client", l.client.as_ref().map(Spanned::span)),
                    ] {
                        if let Some(span) = span {
                            return cx.err(span, key(name), "applies only to backstore = \"rbd\"");
                        }
                    }
                }
                let serial = match &l.serial {
                    Some(s)
                        if s.get_ref().is_empty()
                            || s.get_ref().len() > 32
                            || !s.get_ref().is_ascii() =>
                    {
                        return cx.err(s.span(), key("serial"), "must be 1 to 32 ASCII characters")
                    }
                    Some(s) => s.get_ref().clone(),
                    None => derive_serial(&name, id),
                };
                // A power-of-two multiple of the logical block size, at most 2^15 blocks.
                let physical_block_exponent = match &l.physical_block_size {
                    None => 0,
                    Some(p) => match (0..16u8)
                        .find(|e| block_size.checked_shl(u32::from(*e)) == Some(*p.get_ref()))
                    {
                        Some(e) => e,
                        None => {
                            return cx.err(
                                p.span(),
                                key("physical_block_size"),
                                "must be block_size times a power of two (at most 2^15)",
                            )
                        }
                    },
                };
                let naa = match &l.naa {
                    Some(s) => match parse_naa(s.get_ref()) {
                        Ok(n) => n,
                        Err(m) => return cx.err(s.span(), key("naa"), m),
                    },
                    None => derive_naa(&name, id),
                };
                let sanitize_rate = match &l.sanitize_rate {
                    Some(s) => match parse_size(s.get_ref()) {
                        Ok(0) => return cx.err(s.span(), key("sanitize_rate"), "must be > 0"),
                        Ok(n) => Some(n),
                        Err(m) => return cx.err(s.span(), key("sanitize_rate"), m),
                    },
                    None => None,
                };
                let persist_reservations = match &l.persist_reservations {
                    None => ironlun_scsi::pr::PrPersistence::default(),
                    Some(v) => match ironlun_scsi::pr::PrPersistence::from_name(v.get_ref()) {
                        Some(p) => p,
                        None => {
                            return cx.err(
                                v.span(),
                                key("persist_reservations"),
                                format!("{:?}: expected \"aptpl\" or \"always\"", v.get_ref()),
                            )
                        }
                    },
                };
                luns.push(Lun {
                    id,
                    backstore,
                    size,
                    block_size,
                    serial,
                    naa,
                    read_only: l.read_only,
                    thin: l.thin.unwrap_or(true),
                    write_cache: l.write_cache.unwrap_or(true),
                    physical_block_exponent,
                    sanitize_rate,
                    offline: l.offline,
                    persist_reservations,
                });
            }
            let (acl, masking, max_sessions) = parse_access(&cx, ti, t, &luns)?;
            let chap = match &t.chap {
                Some(c) => Some(parse_chap(&cx, &format!("target[{ti}].chap"), c)?),
                None => None,
            };
            let allow_target_reset = match &t.allow_target_reset {
                None => TargetResetPolicy::default(),
                Some(v) => match TargetResetPolicy::parse(v.get_ref()) {
                    Some(p) => p,
                    None => {
                        return cx.err(
                            v.span(),
                            format!("target[{ti}].allow_target_reset"),
                            format!("must be {}", TargetResetPolicy::VALUES),
                        )
                    }
                },
            };
            targets.push(Target {
                name,
                alias: t.alias.clone(),
                luns,
                acl,
                masking,
                max_sessions,
                chap,
                allow_target_reset,
            });
        }
        if targets.is_empty() {
            return Err(ConfigError {
                file: file.to_string(),
                line: None,
                key: "target".into(),
                message: "at least one [[target]] is required".into(),
            });
        }
        let mut limits = Limits::default();
        if let Some(m) = raw.limits.as_ref().and_then(|l| l.max_sessions.as_ref()) {
            if !(1..=MAX_SESSIONS_BOUND).contains(m.get_ref()) {
                return cx.err(
                    m.span(),
                    "limits.max_sessions",
                    format!("must be 1..={MAX_SESSIONS_BOUND}"),
                );
            }
            limits.max_sessions = *m.get_ref();
        }
        if let Some(m) = raw.limits.as_ref().and_then(|l| l.max_buffered.as_ref()) {
            let range = MAX_BUFFERED_MIN..=MAX_BUFFERED_MAX;
            match parse_size(m.get_ref()) {
                Ok(v) if range.contains(&v) => limits.max_buffered = v,
                Ok(_) => return cx.err(m.span(), "limits.max_buffered", "must be 1MiB..=1TiB"),
                Err(e) => return cx.err(m.span(), "limits.max_buffered", e),
            }
        }
        let discovery_chap = match raw.discovery.as_ref().and_then(|d| d.chap.as_ref()) {
            Some(c) => Some(parse_chap(&cx, "discovery.chap", c)?),
            None => None,
        };
        let admin = parse_admin(&cx, raw.admin.as_ref(), &base)?;
        let port_groups = parse_port_groups(&cx, &raw.port_group, &portals)?;
        let cluster = match &raw.cluster {
            Some(c) => {
                let tpgts: Vec<u16> = portals.iter().map(|p| p.tpgt).collect();
                Some(cluster::parse(&cx, c, &tpgts)?)
            }
            None => None,
        };
        // Cluster mode: one target port group per gateway, its states kept in etcd
        // (`target::cluster::alua`).
        let port_groups = match &cluster {
            Some(c) => {
                if let Some(g) = raw.port_group.first() {
                    return cx.err(
                        g.id.span(),
                        "port_group[0]",
                        "in cluster mode each gateway is one target port group (id = its position in cluster.gateways); remove [[port_group]]",
                    );
                }
                c.port_groups()
            }
            None => port_groups,
        };
        Ok(Config {
            portals,
            negotiation,
            data_dir,
            targets,
            runtime,
            limits,
            timeouts,
            discovery_chap,
            admin,
            port_groups,
            cluster,
        })
    }
}

/// `[[port_group]]` entries: `id` 1..=65535 and distinct, `state` one of
/// [`ironlun_scsi::alua::AccessState::name`] (default active_optimized), `tpgts` the portal
/// group tags of configured portals, each in at most one group.
fn parse_port_groups(
    cx: &Ctx<'_>,
    raw: &[RawPortGroup],
    portals: &[Portal],
) -> Result<Vec<ironlun_scsi::alua::PortGroup>, ConfigError> {
    use ironlun_scsi::alua::{AccessState, PortGroup, ALL_STATES};
    let mut groups: Vec<PortGroup> = Vec::new();
    for (i, g) in raw.iter().enumerate() {
        let key = |k: &str| format!("port_group[{i}].{k}");
        let id = match u16::try_from(*g.id.get_ref()) {
            Ok(id) if id != 0 => id,
            _ => return cx.err(g.id.span(), key("id"), "must be 1..=65535"),
        };
        if groups.iter().any(|o| o.id == id) {
            return cx.err(
                g.id.span(),
                key("id"),
                format!("duplicate port group id {id}"),
            );
        }
        let state = match &g.state {
            None => AccessState::ActiveOptimized,
            Some(s) => match AccessState::from_name(s.get_ref()) {
                Some(st) => st,
                None => {
                    let names: Vec<&str> = ALL_STATES.iter().map(|s| s.name()).collect();
                    return cx.err(
                        s.span(),
                        key("state"),
                        format!("expected one of {}", names.join(", ")),
                    );
                }
            },
        };
        let mut ports = Vec::new();
        if let Some(t) = &g.tpgts {
            for tpgt in t.get_ref() {
                if !portals.iter().any(|p| p.tpgt == *tpgt) {
                    return cx.err(
                        t.span(),
                        key("tpgts"),
                        format!("no [[portal]] has tpgt {tpgt}"),
                    );
                }
                if let Some(o) = groups.iter().find(|o| o.ports.contains(tpgt)) {
                    return cx.err(
                        t.span(),
                        key("tpgts"),
                        format!("tpgt {tpgt} is already in port group {}", o.id),
                    );
                }
                if !ports.contains(tpgt) {
                    ports.push(*tpgt);
                }
            }
        }
        groups.push(PortGroup {
            id,
            state,
            ports,
            changed: false,
        });
    }
    Ok(groups)
}

/// The `[admin]` table. `token_file` and a relative `unix:` path resolve against the config
/// file's directory (not `data_dir`); the token is read when the daemon starts. A TCP `listen`
/// without a token is refused, loopback included: the API moves disk ownership and attaches
/// files (issue 15). `allowed_paths` entries must be absolute.
fn parse_admin(cx: &Ctx<'_>, raw: Option<&RawAdmin>, base: &Path) -> Result<Admin, ConfigError> {
    let mut admin = Admin::default();
    let Some(raw) = raw else {
        return Ok(admin);
    };
    admin.enabled = raw.enabled.unwrap_or(true);
    if let Some(t) = &raw.token_file {
        if t.get_ref().trim().is_empty() {
            return cx.err(t.span(), "admin.token_file", "must be a file path");
        }
        admin.token_file = Some(base.join(t.get_ref()));
        admin.token_origin = format!(
            "{}:{}: admin.token_file",
            cx.file,
            cx.line_of(t.span().start)
        );
    }
    if let Some(l) = &raw.listen {
        let listen = match parse_admin_listen(l.get_ref(), base) {
            Ok(x) => x,
            Err(e) => return cx.err(l.span(), "admin.listen", e),
        };
        if let AdminListen::Tcp(addr) = listen {
            if admin.token_file.is_none() {
                return cx.err(l.span(), "admin.listen", tcp_needs_token(addr));
            }
        }
        admin.listen = listen;
    }
    for p in raw.allowed_paths.iter().flatten() {
        let path = PathBuf::from(p.get_ref());
        if !path.is_absolute() {
            return cx.err(
                p.span(),
                "admin.allowed_paths",
                format!(
                    "{:?} is not an absolute path (e.g. \"/srv/luns\" or \"/dev/disk/by-id\")",
                    p.get_ref()
                ),
            );
        }
        if path.parent().is_none() {
            return cx.err(
                p.span(),
                "admin.allowed_paths",
                "\"/\" would allow every file: list the directories LUNs may live in",
            );
        }
        admin.allowed_paths.push(path);
    }
    Ok(admin)
}

/// Longest CHAP name or secret accepted (RFC 7143 §6.1 bounds text values at 255 bytes).
const MAX_CHAP_TEXT: usize = 255;

/// A `chap` table: names non-empty, secrets at least 12 bytes (RFC 7143 §12.1.3: 96 bits),
/// mutual name and secret together, the mutual secret different from the initiator's.
fn parse_chap(
    cx: &Ctx<'_>,
    prefix: &str,
    c: &RawChap,
) -> Result<ironlun_iscsi::chap::ChapConfig, ConfigError> {
    use ironlun_iscsi::chap::{ChapConfig, Credentials, Secret, MIN_SECRET_LEN};
    let name = |v: &Spanned<String>, key: &str| -> Result<String, ConfigError> {
        let n = v.get_ref();
        if n.is_empty() || n.len() > MAX_CHAP_TEXT || n.contains('\0') {
            return cx.err(
                v.span(),
                format!("{prefix}.{key}"),
                format!("must be 1 to {MAX_CHAP_TEXT} bytes without NUL"),
            );
        }
        Ok(n.clone())
    };
    let secret = |v: &Spanned<String>, key: &str| -> Result<Secret, ConfigError> {
        let len = v.get_ref().len();
        if len < MIN_SECRET_LEN {
            return cx.err(
                v.span(),
                format!("{prefix}.{key}"),
                format!(
                    "too short: at least {MIN_SECRET_LEN} bytes (RFC 7143 §12.1.3 wants 96 bits)"
                ),
            );
        }
        if len > MAX_CHAP_TEXT {
            return cx.err(
                v.span(),
                format!("{prefix}.{key}"),
                format!("at most {MAX_CHAP_TEXT} bytes"),
            );
        }
        Ok(Secret::new(v.get_ref().as_bytes()))
    };
    let initiator = Credentials {
        user: name(&c.user, "user")?,
        secret: secret(&c.secret, "secret")?,
    };
    let target = match (&c.mutual_user, &c.mutual_secret) {
        (None, None) => None,
        (Some(u), Some(s)) => {
            if s.get_ref() == c.secret.get_ref() {
                return cx.err(
                    s.span(),
                    format!("{prefix}.mutual_secret"),
                    "must differ from secret (RFC 7143 §12.1.3)",
                );
            }
            Some(Credentials {
                user: name(u, "mutual_user")?,
                secret: secret(s, "mutual_secret")?,
            })
        }
        (Some(u), None) => {
            return cx.err(
                u.span(),
                format!("{prefix}.mutual_secret"),
                "mutual_user needs mutual_secret",
            )
        }
        (None, Some(s)) => {
            return cx.err(
                s.span(),
                format!("{prefix}.mutual_user"),
                "mutual_secret needs mutual_user",
            )
        }
    };
    Ok(ChapConfig { initiator, target })
}

/// A target's `allowed_initiators`, `[[target.initiator]]` LUN masking and `max_sessions`.
fn parse_access(
    cx: &Ctx<'_>,
    ti: usize,
    t: &RawTarget,
    luns: &[Lun],
) -> Result<
    (
        ironlun_iscsi::acl::Acl,
        ironlun_iscsi::acl::LunMasking,
        usize,
    ),
    ConfigError,
> {
    use ironlun_iscsi::acl::{Acl, LunMasking, NamePattern};
    let acl = match &t.allowed_initiators {
        None => Acl::allow_all(),
        Some(list) => {
            let mut patterns = Vec::new();
            for (i, p) in list.iter().enumerate() {
                match NamePattern::parse(p.get_ref()) {
                    Ok(pat) => patterns.push(pat),
                    Err(e) => {
                        return cx.err(
                            p.span(),
                            format!("target[{ti}].allowed_initiators[{i}]"),
                            e.to_string(),
                        )
                    }
                }
            }
            Acl::allow_only(patterns)
        }
    };
    let mut rules: Vec<(NamePattern, Vec<u64>)> = Vec::new();
    for (ii, ini) in t.initiator.iter().enumerate() {
        let key = |k: &str| format!("target[{ti}].initiator[{ii}].{k}");
        let pattern = match NamePattern::parse(ini.name.get_ref()) {
            Ok(p) => p,
            Err(e) => return cx.err(ini.name.span(), key("name"), e.to_string()),
        };
        if rules
            .iter()
            .any(|(p, _)| p.as_str().eq_ignore_ascii_case(pattern.as_str()))
        {
            return cx.err(
                ini.name.span(),
                key("name"),
                "duplicate initiator name or pattern in this target",
            );
        }
        let mut visible = Vec::new();
        for l in ini.luns.get_ref() {
            let id = *l.get_ref();
            if !luns.iter().any(|x| x.id == id) {
                return cx.err(
                    l.span(),
                    key("luns"),
                    format!("LUN {id} is not defined in this target"),
                );
            }
            if visible.contains(&id) {
                return cx.err(l.span(), key("luns"), format!("LUN {id} listed twice"));
            }
            visible.push(id);
        }
        rules.push((pattern, visible));
    }
    let max_sessions = match &t.max_sessions {
        Some(m) if !(1..=MAX_SESSIONS_BOUND).contains(m.get_ref()) => {
            return cx.err(
                m.span(),
                format!("target[{ti}].max_sessions"),
                format!("must be 1..={MAX_SESSIONS_BOUND}"),
            )
        }
        Some(m) => *m.get_ref(),
        None => ironlun_iscsi::acl::DEFAULT_MAX_SESSIONS_PER_TARGET,
    };
    Ok((acl, LunMasking::new(rules), max_sessions))
}

/// `[timeouts]`: each 0..=3600 s, 0 disables that timer; pings need a non-zero `nop_timeout`.
fn parse_timeouts(
    cx: &Ctx<'_>,
    t: RawTimeouts,
) -> Result<ironlun_iscsi::connection::Timeouts, ConfigError> {
    use std::time::Duration;
    let mut out = ironlun_iscsi::connection::Timeouts::default();
    let secs =
        |v: &Option<Spanned<u64>>, key: &str, default: Duration| -> Result<Duration, ConfigError> {
            match v {
                Some(s) if *s.get_ref() > 3600 => {
                    cx.err(s.span(), key, "must be 0..=3600 seconds (0 disables)")
                }
                Some(s) => Ok(Duration::from_secs(*s.get_ref())),
                None => Ok(default),
            }
        };
    out.nop_interval = secs(&t.nop_interval, "timeouts.nop_interval", out.nop_interval)?;
    out.nop_timeout = secs(&t.nop_timeout, "timeouts.nop_timeout", out.nop_timeout)?;
    out.login = secs(&t.login_timeout, "timeouts.login_timeout", out.login)?;
    out.discovery_idle = secs(
        &t.discovery_idle,
        "timeouts.discovery_idle",
        out.discovery_idle,
    )?;
    if !out.nop_interval.is_zero() && out.nop_timeout.is_zero() {
        if let Some(s) = &t.nop_timeout {
            return cx.err(
                s.span(),
                "timeouts.nop_timeout",
                "must be > 0 while nop_interval is > 0 (set nop_interval = 0 to disable pings)",
            );
        }
    }
    Ok(out)
}

fn parse_negotiation(cx: &Ctx<'_>, n: RawNegotiation) -> Result<Negotiation, ConfigError> {
    use ironlun_iscsi::negotiation::{DigestKind, Offers};
    let mut o = Offers::default();
    let digests = |v: &Spanned<Vec<String>>, key: &str| -> Result<Vec<DigestKind>, ConfigError> {
        let mut out = Vec::new();
        for d in v.get_ref() {
            match d.to_ascii_lowercase().as_str() {
                "none" => out.push(DigestKind::None),
                "crc32c" => out.push(DigestKind::Crc32c),
                _ => {
                    return cx.err(
                        v.span(),
                        key,
                        format!("unknown digest {d:?}; expected \"None\" or \"CRC32C\""),
                    )
                }
            }
        }
        if out.is_empty() {
            return cx.err(v.span(), key, "must list at least one digest");
        }
        Ok(out)
    };
    if let Some(v) = &n.header_digest {
        o.header_digest = digests(v, "negotiation.header_digest")?;
    }
    if let Some(v) = &n.data_digest {
        o.data_digest = digests(v, "negotiation.data_digest")?;
    }
    if let Some(v) = n.initial_r2t {
        o.initial_r2t = v;
    }
    if let Some(v) = n.immediate_data {
        o.immediate_data = v;
    }
    // Ranges per RFC 7143 §13.12-§13.14: 512 to 2^24-1.
    let range = |v: &Spanned<u32>, key: &str| -> Result<u32, ConfigError> {
        let x = *v.get_ref();
        if (512..=16_777_215).contains(&x) {
            Ok(x)
        } else {
            cx.err(v.span(), key, "must be 512..=16777215 (RFC 7143 §13)")
        }
    };
    if let Some(v) = &n.max_recv_data_segment_length {
        o.max_recv_data_segment_length = range(v, "negotiation.max_recv_data_segment_length")?;
    }
    if let Some(v) = &n.max_burst_length {
        o.max_burst_length = range(v, "negotiation.max_burst_length")?;
    }
    if let Some(v) = &n.first_burst_length {
        o.first_burst_length = range(v, "negotiation.first_burst_length")?;
        if o.first_burst_length > o.max_burst_length {
            return cx.err(
                v.span(),
                "negotiation.first_burst_length",
                "must not exceed max_burst_length (RFC 7143 §13.14)",
            );
        }
    }
    if let Some(v) = &n.default_time2wait {
        if *v.get_ref() > 3600 {
            return cx.err(
                v.span(),
                "negotiation.default_time2wait",
                "must be 0..=3600",
            );
        }
        o.default_time2wait = *v.get_ref();
    }
    if let Some(v) = &n.default_time2retain {
        if *v.get_ref() > 3600 {
            return cx.err(
                v.span(),
                "negotiation.default_time2retain",
                "must be 0..=3600",
            );
        }
        o.default_time2retain = *v.get_ref();
    }
    if let Some(v) = &n.max_outstanding_r2t {
        if *v.get_ref() == 0 {
            return cx.err(
                v.span(),
                "negotiation.max_outstanding_r2t",
                "must be 1..=65535",
            );
        }
        o.max_outstanding_r2t = *v.get_ref();
    }
    let mut cmd_window = 128;
    if let Some(v) = &n.cmd_window {
        if !(1..=4096).contains(v.get_ref()) {
            return cx.err(v.span(), "negotiation.cmd_window", "must be 1..=4096");
        }
        cmd_window = *v.get_ref();
    }
    Ok(Negotiation {
        offers: o,
        cmd_window,
    })
}

/// iqn./eui./naa. names (RFC 7143 §4.2.7, RFC 3722 stringprep is approximated by lowercase ASCII).
pub fn validate_iscsi_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 223 {
        return Err("an iSCSI name is 1 to 223 bytes (RFC 7143 §4.2.7.1)".into());
    }
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | ':'));
    if !ok_chars {
        return Err("use lowercase letters, digits, '.', '-' and ':' only (RFC 3722)".into());
    }
    if name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa.") {
        Ok(())
    } else {
        Err("must start with iqn., eui. or naa. (RFC 7143 §4.2.7.2)".into())
    }
}

/// A size as the config writes it: bytes, or a number with `K`/`KiB` … `T`/`TiB`
/// ([`ironlun_api::parse_size_text`], shared with the admin API and `ironlun ctl`).
fn parse_size(v: &SizeValue) -> Result<u64, String> {
    match v {
        SizeValue::Bytes(b) => Ok(*b),
        SizeValue::Text(t) => ironlun_api::parse_size_text(t),
    }
}

fn parse_naa(s: &str) -> Result<[u8; 16], String> {
    let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
    if hex.len() != 32 || !hex.starts_with('6') {
        return Err("expected 32 hex digits of an NAA type 6 identifier (starts with 6)".into());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        let pair = hex.get(i * 2..i * 2 + 2).ok_or("bad hex")?;
        *b = u8::from_str_radix(pair, 16).map_err(|_| format!("bad hex digits {pair:?}"))?;
    }
    Ok(out)
}

/// FNV-1a, used only to derive stable identifiers from names (not for security).
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Stable serial from target name and LUN: survives restarts with the same config.
pub fn derive_serial(target: &str, lun: u64) -> String {
    format!("{:016x}", fnv1a(format!("{target}/{lun}").as_bytes()))
}

/// Stable NAA IEEE Registered Extended identifier (SPC-4 §7.8.6.6.5): NAA 6, a fixed company
/// id, and 96 bits derived from the target name and LUN.
pub fn derive_naa(target: &str, lun: u64) -> [u8; 16] {
    let a = fnv1a(format!("{target}/{lun}/a").as_bytes()).to_be_bytes();
    let b = fnv1a(format!("{target}/{lun}/b").as_bytes()).to_be_bytes();
    let mut out = [0u8; 16];
    // NAA 6, IEEE company id 00-00-00 (ironlun has no registered OUI; configure `naa` to use
    // your own), then vendor-specific and extension bits from the hashes.
    out[0] = 0x60;
    out[1] = 0x00;
    out[2] = 0x00;
    out[3] = 0x0f & a[0];
    out[4..8].copy_from_slice(&a[1..5]);
    out[8..16].copy_from_slice(&b);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("t.toml", text, Some(Path::new("/tmp")), None)
    }

    #[test]
    fn accepts_minimal_file_lun() {
        let c = parse(
            r#"
[[target]]
name = "iqn.2026-11.io.ironlun:a"
[[target.lun]]
id = 0
backstore = "file"
path = "a.img"
size = "64MiB"
"#,
        )
        .unwrap();
        assert_eq!(c.targets[0].luns[0].size, Some(64 << 20));
        assert_eq!(
            c.targets[0].luns[0].backstore,
            BackstoreKind::File {
                path: PathBuf::from("/tmp/a.img")
            }
        );
        assert_eq!(c.portals[0].listen.port(), 3260);
    }

    #[test]
    fn rejects_bad_block_size_with_line_and_key() {
        let e = parse(
            "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\nblock_size = 1000\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(7));
        assert_eq!(e.key, "target[0].lun[0].block_size");
        assert!(
            e.to_string()
                .starts_with("t.toml:7: target[0].lun[0].block_size: "),
            "{e}"
        );
    }

    #[test]
    fn persist_reservations_values_and_errors() {
        use ironlun_scsi::pr::PrPersistence;
        let lun = |v: &str| {
            format!("[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\n{v}")
        };
        let mode = |v: &str| parse(&lun(v)).unwrap().targets[0].luns[0].persist_reservations;
        assert_eq!(mode(""), PrPersistence::Aptpl);
        assert_eq!(
            mode("persist_reservations = \"aptpl\"\n"),
            PrPersistence::Aptpl
        );
        assert_eq!(
            mode("persist_reservations = \"always\"\n"),
            PrPersistence::Always
        );
        let e = parse(&lun("persist_reservations = \"never\"\n")).unwrap_err();
        assert_eq!(e.line, Some(7));
        assert_eq!(e.key, "target[0].lun[0].persist_reservations");
        assert!(e.message.contains("\"aptpl\" or \"always\""), "{e}");
        assert!(parse(&lun("persist_reservations = true\n")).is_err());
    }

    #[test]
    fn port_groups_parse_and_validate() {
        use ironlun_scsi::alua::AccessState;
        const TARGET: &str = "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n";
        let portals = "[[portal]]\nlisten = \"127.0.0.1:3260\"\ntpgt = 1\n[[portal]]\nlisten = \"127.0.0.1:3261\"\ntpgt = 2\n";
        let c = parse(&format!(
            "{portals}[[port_group]]\nid = 2\nstate = \"standby\"\ntpgts = [2]\n{TARGET}"
        ))
        .unwrap();
        assert_eq!(c.port_groups.len(), 1);
        assert_eq!(c.port_groups[0].id, 2);
        assert_eq!(c.port_groups[0].state, AccessState::Standby);
        assert_eq!(c.port_groups[0].ports, vec![2]);
        assert!(parse(&format!("{portals}{TARGET}"))
            .unwrap()
            .port_groups
            .is_empty());
        let cases = [
            ("[[port_group]]\nid = 0\n", 8, "port_group[0].id"),
            ("[[port_group]]\nid = 70000\n", 8, "port_group[0].id"),
            (
                "[[port_group]]\nid = 2\nstate = \"offline\"\n",
                9,
                "port_group[0].state",
            ),
            (
                "[[port_group]]\nid = 2\ntpgts = [3]\n",
                9,
                "port_group[0].tpgts",
            ),
            (
                "[[port_group]]\nid = 2\ntpgts = [2]\n[[port_group]]\nid = 3\ntpgts = [1, 2]\n",
                12,
                "port_group[1].tpgts",
            ),
            (
                "[[port_group]]\nid = 2\n[[port_group]]\nid = 2\n",
                10,
                "port_group[1].id",
            ),
        ];
        for (text, line, key) in cases {
            let e = parse(&format!("{portals}{text}{TARGET}")).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{e}");
        }
    }

    #[test]
    fn rejects_unknown_key_naming_it() {
        let e = parse("[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\nbogus = 1\n").unwrap_err();
        assert_eq!(e.key, "bogus");
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn rejects_bad_target_name() {
        let e = parse("[[target]]\nname = \"Lab\"\n").unwrap_err();
        assert_eq!(e.key, "target[0].name");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn rejects_size_not_multiple_of_block() {
        let e = parse("[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 1\nbackstore = \"ram\"\nsize = 1000\n").unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].size");
    }

    #[test]
    fn vhd_backstore_needs_a_path() {
        let base =
            "[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\nbackstore = \"vhd\"\n";
        let c = parse(&format!("{base}path = \"vm.vhd\"\n")).unwrap();
        assert_eq!(
            c.targets[0].luns[0].backstore,
            BackstoreKind::Vhd {
                path: PathBuf::from("/tmp/vm.vhd")
            }
        );
        let e = parse(base).unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].path");
        assert_eq!(e.line, Some(5));
        let e = parse(&format!("{base}path = \"vm.vhd\"\nring_depth = 8\n")).unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].ring_depth");
    }

    #[test]
    fn block_backstore_takes_an_absolute_device_path_and_no_size() {
        let base =
            "[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\nbackstore = \"block\"\n";
        let c = parse(&format!("{base}path = \"/dev/loop0\"\nread_only = true\n")).unwrap();
        let lun = &c.targets[0].luns[0];
        assert_eq!(
            lun.backstore,
            BackstoreKind::Block {
                path: PathBuf::from("/dev/loop0")
            }
        );
        assert_eq!(lun.size, None);
        assert!(lun.read_only);
        let e = parse(base).unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("target[0].lun[0].path", Some(5)));
        // Relative paths are not joined to the data directory.
        let e = parse(&format!("{base}path = \"loop0\"\n")).unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("target[0].lun[0].path", Some(6)));
        assert!(e.message.contains("absolute"), "{e}");
        let e = parse(&format!("{base}path = \"/dev/loop0\"\nsize = \"1GiB\"\n")).unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("target[0].lun[0].size", Some(7)));
        assert!(e.message.contains("the device decides"), "{e}");
        let e = parse(&format!("{base}path = \"/dev/loop0\"\ndirect = true\n")).unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].direct");
        let e = parse(&base.replace("\"block\"", "\"blk\"")).unwrap_err();
        assert!(e.message.contains("\"block\""), "{e}");
    }

    #[test]
    fn rbd_backstore_keys_are_validated() {
        let base =
            "[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\nbackstore = \"rbd\"\n";
        let c = parse(&format!("{base}image = \"lun0\"\n")).unwrap();
        assert_eq!(
            c.targets[0].luns[0].backstore,
            BackstoreKind::Rbd {
                pool: "rbd".into(),
                image: "lun0".into(),
                ceph_conf: None,
                client: "admin".into(),
            }
        );
        let c = parse(&format!(
            "{base}pool = \"p1\"\nimage = \"vm-1\"\nceph_conf = \"/etc/ceph/lab.conf\"\nclient = \"gw\"\nsize = \"1GiB\"\n"
        ))
        .unwrap();
        let lun = &c.targets[0].luns[0];
        assert_eq!(
            lun.backstore,
            BackstoreKind::Rbd {
                pool: "p1".into(),
                image: "vm-1".into(),
                ceph_conf: Some(PathBuf::from("/etc/ceph/lab.conf")),
                client: "gw".into(),
            }
        );
        assert_eq!(lun.size, Some(1 << 30));
        // Each bad key is named with its line.
        let cases: [(&str, usize, &str, &str); 8] = [
            ("", 5, "image", "image = "),
            ("image = \"a/b\"\n", 6, "image", "'/'"),
            ("image = \"\"\n", 6, "image", "1 to 255"),
            ("image = \"x\"\npool = \"a b\"\n", 7, "pool", "whitespace"),
            ("image = \"x\"\nclient = \"a@b\"\n", 7, "client", "'@'"),
            (
                "image = \"x\"\nceph_conf = \"\"\n",
                7,
                "ceph_conf",
                "ceph.conf",
            ),
            (
                "image = \"x\"\npath = \"x.img\"\n",
                7,
                "path",
                "pool and image",
            ),
            ("image = \"x\"\ndirect = true\n", 7, "direct", "uring"),
        ];
        for (extra, line, k, msg) in cases {
            let e = parse(&format!("{base}{extra}")).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (Some(line), format!("target[0].lun[0].{k}").as_str()),
                "{extra:?}: {e}"
            );
            assert!(e.message.contains(msg), "{extra:?}: {e}");
        }
        // The rbd keys belong to rbd alone.
        for k in ["pool", "image", "ceph_conf", "client"] {
            let e = parse(&format!(
                "[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\n{k} = \"x\"\n"
            ))
            .unwrap_err();
            assert_eq!(
                (e.line, e.key.clone()),
                (Some(7), format!("target[0].lun[0].{k}"))
            );
            assert!(e.message.contains("rbd"), "{e}");
        }
        // An RBD image is shared storage: admitted in cluster mode.
        let c = parse(&format!(
            "{base}image = \"x\"\n[cluster]\nname = \"a\"\nendpoints = [\"127.0.0.1:2379\"]\ngateways = [{{ name = \"a\", tpgts = [1] }}]\n"
        ))
        .unwrap();
        assert!(c.cluster.is_some());
        let e = parse(&base.replace("\"rbd\"", "\"ceph\"")).unwrap_err();
        assert!(e.message.contains("\"rbd\""), "{e}");
    }

    #[test]
    fn uring_keys_are_validated() {
        let lun = |extra: &str| {
            format!("[[target]]\nname = \"iqn.2026-11.x:a\"\n[[target.lun]]\nid = 0\nbackstore = \"uring\"\npath = \"a.img\"\n{extra}")
        };
        let c = parse(&lun("direct = true\nring_depth = 64\n")).unwrap();
        assert_eq!(
            c.targets[0].luns[0].backstore,
            BackstoreKind::Uring {
                path: PathBuf::from("/tmp/a.img"),
                direct: true,
                ring_depth: 64
            }
        );
        let e = parse(&lun("ring_depth = 0\n")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(7), "target[0].lun[0].ring_depth")
        );
        let e = parse(
            &lun("")
                .replace("uring", "file")
                .replace("a.img\"\n", "a.img\"\ndirect = true\n"),
        )
        .unwrap_err();
        assert_eq!(e.key, "target[0].lun[0].direct");
    }

    #[test]
    fn max_buffered_is_a_validated_size() {
        let base = "[[target]]\nname = \"iqn.2026-11.x:a\"\n";
        let c = parse(base).unwrap();
        assert_eq!(c.limits.max_buffered, 256 << 20);
        let c = parse(&format!("[limits]\nmax_buffered = \"64MiB\"\n{base}")).unwrap();
        assert_eq!(c.limits.max_buffered, 64 << 20);
        let c = parse(&format!("[limits]\nmax_buffered = 2097152\n{base}")).unwrap();
        assert_eq!(c.limits.max_buffered, 2 << 20);
        for bad in ["\"512KiB\"", "0", "\"2TiB\"", "\"64 parsecs\""] {
            let e = parse(&format!("[limits]\n\nmax_buffered = {bad}\n{base}")).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (Some(3), "limits.max_buffered"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn runtime_table_is_validated() {
        let base = "[[target]]\nname = \"iqn.2026-11.x:a\"\n";
        let c = parse(&format!(
            "[runtime]\nworker_threads = 2\nblocking_threads = 8\nbusy_poll_us = 0\n{base}"
        ))
        .unwrap();
        assert_eq!(
            c.runtime,
            Runtime {
                worker_threads: Some(2),
                blocking_threads: Some(8),
                busy_poll: std::time::Duration::ZERO,
            }
        );
        assert_eq!(parse(base).unwrap().runtime.busy_poll, DEFAULT_BUSY_POLL);
        let e = parse(&format!("[runtime]\nworker_threads = 0\n{base}")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(2), "runtime.worker_threads")
        );
        let e = parse(&format!("[runtime]\nbusy_poll_us = 5000\n{base}")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(2), "runtime.busy_poll_us"));
    }

    #[test]
    fn timeouts_table_is_validated() {
        use std::time::Duration;
        let base = "[[target]]\nname = \"iqn.2026-11.x:a\"\n";
        let c = parse(base).unwrap();
        assert_eq!(c.timeouts, ironlun_iscsi::connection::Timeouts::default());
        let c = parse(&format!("[timeouts]\nnop_interval = 1\nnop_timeout = 2\nlogin_timeout = 3\ndiscovery_idle = 0\n{base}")).unwrap();
        assert_eq!(
            c.timeouts,
            ironlun_iscsi::connection::Timeouts {
                nop_interval: Duration::from_secs(1),
                nop_timeout: Duration::from_secs(2),
                login: Duration::from_secs(3),
                discovery_idle: Duration::ZERO,
            }
        );
        let c = parse(&format!(
            "[timeouts]\nnop_interval = 0\nnop_timeout = 0\n{base}"
        ))
        .unwrap();
        assert!(c.timeouts.nop_interval.is_zero());
        let e = parse(&format!("[timeouts]\nlogin_timeout = 3601\n{base}")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(2), "timeouts.login_timeout")
        );
        let e = parse(&format!(
            "[timeouts]\nnop_interval = 5\nnop_timeout = 0\n{base}"
        ))
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(3), "timeouts.nop_timeout"));
        let e = parse(&format!("[timeouts]\nnop_intervall = 5\n{base}")).unwrap_err();
        assert_eq!(e.key, "nop_intervall");
        let e = parse(&format!("[timeouts]\ndiscovery_idle = -1\n{base}")).unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    const ACL_BASE: &str = "[[target]]\nname = \"iqn.2026-11.x:a\"\n";
    const ACL_LUNS: &str = "[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\n[[target.lun]]\nid = 2\nbackstore = \"ram\"\nsize = 4096\n";

    #[test]
    fn access_defaults_allow_everyone_everything() {
        let c = parse(ACL_BASE).unwrap();
        let t = &c.targets[0];
        assert!(t.acl.allows("iqn.any:one"));
        assert_eq!(t.masking.visible("iqn.any:one"), None);
        assert_eq!(
            t.max_sessions,
            ironlun_iscsi::acl::DEFAULT_MAX_SESSIONS_PER_TARGET
        );
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn accepts_acl_masking_and_session_limits() {
        let text = format!(
            "[limits]\nmax_sessions = 10\n{ACL_BASE}allowed_initiators = [\"iqn.1994-05.com.redhat:*\", \"iqn.2026-11.io.example:host1\"]\nmax_sessions = 3\n{ACL_LUNS}[[target.initiator]]\nname = \"iqn.2026-11.io.example:host1\"\nluns = [0, 2]\n[[target.initiator]]\nname = \"iqn.1994-05.com.redhat:*\"\nluns = [2]\n"
        );
        let c = parse(&text).unwrap();
        let t = &c.targets[0];
        assert_eq!((c.limits.max_sessions, t.max_sessions), (10, 3));
        assert!(t.acl.allows("IQN.1994-05.com.redhat:abc"));
        assert!(t.acl.allows("iqn.2026-11.io.example:host1"));
        assert!(!t.acl.allows("iqn.2026-11.io.example:host2"));
        assert_eq!(
            t.masking.visible("iqn.2026-11.io.example:host1"),
            Some(&[0, 2][..])
        );
        assert_eq!(
            t.masking.visible("iqn.1994-05.com.redhat:abc"),
            Some(&[2][..])
        );
        let c = parse(&format!("{ACL_BASE}allowed_initiators = []\n")).unwrap();
        assert!(!c.targets[0].acl.allows("iqn.any:one"));
    }

    #[test]
    fn rejects_bad_access_settings_with_line_and_key() {
        let cases: &[(&str, usize, &str)] = &[
            ("allowed_initiators = [\"iqn.x:a\",\n  \"\"]\n", 4, "target[0].allowed_initiators[1]"),
            ("allowed_initiators = [\"iqn.x: a\"]\n", 3, "target[0].allowed_initiators[0]"),
            ("max_sessions = 0\n", 3, "target[0].max_sessions"),
            ("max_sessions = 65536\n", 3, "target[0].max_sessions"),
            (
                "[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\n[[target.initiator]]\nname = \"iqn.x:h\"\nluns = [0, 1]\n",
                9,
                "target[0].initiator[0].luns",
            ),
            (
                "[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\n[[target.initiator]]\nname = \"iqn.x:h\"\nluns = [0, 0]\n",
                9,
                "target[0].initiator[0].luns",
            ),
            ("[[target.initiator]]\nname = \"\"\nluns = []\n", 4, "target[0].initiator[0].name"),
            (
                "[[target.initiator]]\nname = \"iqn.x:h\"\nluns = []\n[[target.initiator]]\nname = \"IQN.X:H\"\nluns = []\n",
                7,
                "target[0].initiator[1].name",
            ),
        ];
        for (extra, line, key) in cases {
            let e = parse(&format!("{ACL_BASE}{extra}")).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (Some(*line), *key),
                "{extra}: {e}"
            );
        }
        let e = parse(&format!("[limits]\nmax_sessions = 0\n{ACL_BASE}")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(2), "limits.max_sessions"));
        let e = parse(&format!("[limits]\nmax_session = 3\n{ACL_BASE}")).unwrap_err();
        assert_eq!(e.key, "max_session");
        let e = parse(&format!(
            "{ACL_BASE}[[target.initiator]]\nname = \"iqn.x:h\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "luns");
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derive_naa("iqn.x:a", 0), derive_naa("iqn.x:a", 0));
        assert_ne!(derive_naa("iqn.x:a", 0), derive_naa("iqn.x:a", 1));
        assert_eq!(derive_naa("iqn.x:a", 0)[0] >> 4, 6);
        assert_eq!(derive_serial("iqn.x:a", 3), derive_serial("iqn.x:a", 3));
    }

    #[test]
    fn every_conf_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().and_then(|s| s.to_str()) == Some("toml") {
                Config::load(&p, Some(Path::new("/tmp"))).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1, "no example configs in conf/");
    }

    const ADMIN_BASE: &str = "[[target]]\nname = \"iqn.2026-11.x:a\"\n";

    #[test]
    fn admin_defaults_to_the_unix_socket() {
        let c = parse(ADMIN_BASE).unwrap();
        assert_eq!(c.admin, Admin::default());
        assert!(c.admin.enabled);
        assert_eq!(c.admin.listen, AdminListen::Unix(None));
        assert!(c.admin.allowed_paths.is_empty());
        assert_eq!(
            Config::embedded_default(PathBuf::from("/tmp")).admin,
            Admin::default()
        );
    }

    #[test]
    fn accepts_admin_table() {
        let c = parse(&format!(
            "[admin]\nlisten = \"0.0.0.0:9000\"\ntoken_file = \"admin.token\"\n{ADMIN_BASE}"
        ))
        .unwrap();
        assert_eq!(
            c.admin.listen,
            AdminListen::Tcp("0.0.0.0:9000".parse().unwrap())
        );
        assert_eq!(
            c.admin.token_file.as_deref(),
            Some(Path::new("/tmp/admin.token"))
        );
        assert_eq!(c.admin.token_origin, "t.toml:3: admin.token_file");
        let c = parse(&format!("[admin]\nenabled = false\n{ADMIN_BASE}")).unwrap();
        assert!(!c.admin.enabled);
        let c = parse(&format!(
            "[admin]\nlisten = \"unix:run/a.sock\"\nallowed_paths = [\"/srv/luns\", \"/dev/disk\"]\n{ADMIN_BASE}"
        ))
        .unwrap();
        assert_eq!(
            c.admin.listen,
            AdminListen::Unix(Some(PathBuf::from("/tmp/run/a.sock")))
        );
        assert_eq!(
            c.admin.allowed_paths,
            vec![PathBuf::from("/srv/luns"), PathBuf::from("/dev/disk")]
        );
    }

    #[test]
    fn rejects_bad_admin_table_with_line_and_key() {
        let cases: &[(&str, usize, &str)] = &[
            ("listen = \"localhost\"\n", 2, "admin.listen"),
            ("listen = \"127.0.0.1\"\n", 2, "admin.listen"),
            ("listen = \"unix:\"\n", 2, "admin.listen"),
            (
                "enabled = true\nlisten = \"0.0.0.0:3262\"\n",
                3,
                "admin.listen",
            ),
            ("listen = \"[::]:3262\"\n", 2, "admin.listen"),
            // TCP needs a token on loopback too.
            ("listen = \"127.0.0.1:3262\"\n", 2, "admin.listen"),
            ("token_file = \"\"\n", 2, "admin.token_file"),
            ("tokenfile = \"x\"\n", 2, "tokenfile"),
            ("enabled = \"yes\"\n", 2, "-"),
            (
                "allowed_paths = [\"/srv\", \"luns\"]\n",
                2,
                "admin.allowed_paths",
            ),
            ("\nallowed_paths = [\"/\"]\n", 3, "admin.allowed_paths"),
        ];
        for (extra, line, key) in cases {
            let e = parse(&format!("[admin]\n{extra}{ADMIN_BASE}")).unwrap_err();
            assert_eq!(
                (e.line, e.key.as_str()),
                (Some(*line), *key),
                "{extra}: {e}"
            );
        }
        let e = parse(&format!(
            "[admin]\nlisten = \"127.0.0.1:3262\"\n{ADMIN_BASE}"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("admin.token_file"), "{e}");
    }

    #[test]
    fn admin_cli_override() {
        let mut a = Admin::default();
        a.override_listen("unix:/tmp/x.sock").unwrap();
        assert_eq!(
            (a.listen.clone(), a.enabled),
            (AdminListen::Unix(Some(PathBuf::from("/tmp/x.sock"))), true)
        );
        a.override_listen("off").unwrap();
        assert!(!a.enabled);
        for tcp in ["127.0.0.1:0", "0.0.0.0:3262"] {
            assert!(a.override_listen(tcp).unwrap_err().contains("token_file"));
        }
        assert!(a.override_listen("nonsense").is_err());
        a.token_file = Some(PathBuf::from("/tmp/t"));
        a.override_listen("0.0.0.0:3262").unwrap();
        assert!(a.enabled);
        assert_eq!(a.listen, AdminListen::Tcp("0.0.0.0:3262".parse().unwrap()));
    }

    #[test]
    fn default_socket_is_in_the_data_dir_or_runtime_dir() {
        // RUNTIME_DIRECTORY is unset in tests (systemd sets it); the data directory then.
        if std::env::var_os("RUNTIME_DIRECTORY").is_none() {
            assert_eq!(
                default_admin_socket(Path::new("/var/lib/ironlun")),
                PathBuf::from("/var/lib/ironlun/admin.sock")
            );
        }
    }

    const CHAP_BASE: &str = "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n";

    #[test]
    fn accepts_target_and_discovery_chap() {
        let c = parse(&format!(
            "[discovery]\nchap = {{ user = \"d\", secret = \"discovery-secret\" }}\n{CHAP_BASE}\
             chap = {{ user = \"u\", secret = \"0123456789ab\", mutual_user = \"t\", mutual_secret = \"target-secret-1\" }}\n"
        ))
        .unwrap();
        let chap = c.targets[0].chap.as_ref().unwrap();
        assert_eq!(chap.initiator.user, "u");
        assert_eq!(chap.initiator.secret.expose(), b"0123456789ab");
        assert_eq!(chap.target.as_ref().unwrap().user, "t");
        assert_eq!(c.discovery_chap.as_ref().unwrap().initiator.user, "d");
        assert!(
            !format!("{c:?}").contains("0123456789ab"),
            "secrets never print"
        );
        // The [target.chap] table form too.
        let c = parse(&format!(
            "{CHAP_BASE}[target.chap]\nuser = \"u\"\nsecret = \"0123456789ab\"\n"
        ))
        .unwrap();
        assert!(c.targets[0].chap.as_ref().unwrap().target.is_none());
        assert!(c.discovery_chap.is_none());
    }

    #[test]
    fn rejects_bad_chap_with_line_and_key() {
        let cases = [
            ("chap = { user = \"u\", secret = \"short\" }", "target[0].chap.secret"),
            ("chap = { user = \"\", secret = \"0123456789ab\" }", "target[0].chap.user"),
            ("chap = { user = \"u\", secret = \"0123456789ab\", mutual_user = \"t\" }", "target[0].chap.mutual_secret"),
            ("chap = { user = \"u\", secret = \"0123456789ab\", mutual_secret = \"0123456789abc\" }", "target[0].chap.mutual_user"),
            ("chap = { user = \"u\", secret = \"0123456789ab\", mutual_user = \"t\", mutual_secret = \"0123456789ab\" }", "target[0].chap.mutual_secret"),
            ("chap = { user = \"u\", secret = \"0123456789ab\", mutual_user = \"t\", mutual_secret = \"tiny\" }", "target[0].chap.mutual_secret"),
        ];
        for (line, key) in cases {
            let e = parse(&format!("{CHAP_BASE}{line}\n")).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(3), key), "{line}: {e}");
            assert!(!e.to_string().contains("0123456789ab"), "{e}");
        }
        let e = parse(&format!(
            "[discovery]\nchap = {{ user = \"d\", secret = \"x\" }}\n{CHAP_BASE}"
        ))
        .unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (Some(2), "discovery.chap.secret"));
        let e = parse(&format!(
            "{CHAP_BASE}chap = {{ user = \"u\", secret = \"0123456789ab\", pass = 1 }}\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "pass");
    }

    #[test]
    fn physical_block_size_is_a_power_of_two_multiple_of_the_block_size() {
        let lun = |extra: &str| {
            format!(
                "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\n\
                 backstore = \"ram\"\nsize = \"1MiB\"\n{extra}\n"
            )
        };
        let c = parse(&lun("")).unwrap();
        assert_eq!(c.targets[0].luns[0].physical_block_exponent, 0);
        let c = parse(&lun("physical_block_size = 4096")).unwrap();
        assert_eq!(c.targets[0].luns[0].physical_block_exponent, 3);
        let c = parse(&lun("block_size = 4096\nphysical_block_size = 4096")).unwrap();
        assert_eq!(c.targets[0].luns[0].physical_block_exponent, 0);
        for bad in [1000u32, 256, 3072, 512 << 16] {
            let e = parse(&lun(&format!("physical_block_size = {bad}"))).unwrap_err();
            assert!(e.key.ends_with("physical_block_size"), "{bad}: {e}");
            assert_eq!(e.line, Some(7), "{bad}: {e}");
        }
    }

    #[test]
    fn allow_target_reset_defaults_to_chap_and_names_a_bad_value() {
        let c = parse(CHAP_BASE).unwrap();
        assert_eq!(c.targets[0].allow_target_reset, TargetResetPolicy::Chap);
        for (v, want) in [
            ("chap", TargetResetPolicy::Chap),
            ("all", TargetResetPolicy::All),
            ("none", TargetResetPolicy::None),
        ] {
            let c = parse(&format!("{CHAP_BASE}allow_target_reset = \"{v}\"\n")).unwrap();
            assert_eq!(c.targets[0].allow_target_reset, want);
        }
        let e = parse(&format!("{CHAP_BASE}allow_target_reset = \"yes\"\n")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(3), "target[0].allow_target_reset")
        );
        assert!(e.message.contains("\"chap\", \"all\" or \"none\""), "{e}");
        assert!(TargetResetPolicy::Chap.allows(true) && !TargetResetPolicy::Chap.allows(false));
        assert!(TargetResetPolicy::All.allows(false) && !TargetResetPolicy::None.allows(true));
    }
}
