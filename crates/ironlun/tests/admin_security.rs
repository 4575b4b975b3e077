//! Issue 15 (findings 5 and 6) against the real daemon: LUN paths added through the admin API
//! are confined to the data directory and `[admin] allowed_paths` (403 otherwise), the
//! default admin socket is owner-only, and slow clients holding many connections do not keep
//! `ironlun ctl` or a health check from an answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_cli::ctl::{Client, Reply};
use ironlun_testkit::{admin_connect, AdminStream, Binary, Daemon, TARGET};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TOKEN: &str = "s3cret-token-0123456789abcdef";

/// `ironlun ctl --admin ADMIN ARGS`, whatever the exit status.
fn ctl(admin: &str, args: &[&str]) -> Output {
    Binary::new(IRONLUN).ctl_at(admin, args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `POST /v1/targets/TARGET/luns` adding a 1 MiB file LUN `id` at `path`.
fn add_file_lun(admin: &str, id: u64, path: &str) -> Reply {
    let body = serde_json::json!({"id": id, "backstore": "file", "path": path, "size": "1MiB"});
    Client::new(admin, None)
        .unwrap()
        .request(
            "POST",
            &format!("/v1/targets/{TARGET}/luns"),
            Some(body.to_string().as_bytes()),
            Duration::from_secs(30),
        )
        .unwrap()
}

fn error_of(r: &Reply) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], "forbidden", "{v}");
    v["error"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lun_paths_from_the_api_stay_in_data_dir_or_allowed_paths() {
    let outside = tempfile::tempdir().unwrap();
    let allowed = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.img"), vec![0u8; 1 << 20]).unwrap();
    let config = format!(
        "[admin]\nallowed_paths = [{:?}]\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n",
        allowed.path()
    );
    let d = Daemon::builder(IRONLUN).config(&config).start();
    let data = d.admin_socket().parent().unwrap().to_path_buf();
    std::os::unix::fs::symlink(outside.path().join("secret.img"), data.join("link.img")).unwrap();
    let admin = d.admin_url().to_owned();
    let (outside_p, allowed_p) = (outside.path().to_owned(), allowed.path().to_owned());
    let replies = tokio::task::spawn_blocking(move || {
        let abs = outside_p.join("secret.img").display().to_string();
        [
            (abs.clone(), add_file_lun(&admin, 1, &abs)),
            (
                "../escape.img".into(),
                add_file_lun(&admin, 2, "../escape.img"),
            ),
            ("link.img".into(), add_file_lun(&admin, 3, "link.img")),
            ("/etc/passwd".into(), add_file_lun(&admin, 4, "/etc/passwd")),
        ]
        .into_iter()
        .chain([(
            "allowed".into(),
            add_file_lun(&admin, 5, &allowed_p.join("ok.img").display().to_string()),
        )])
        .chain([("inside".into(), add_file_lun(&admin, 6, "sub-ok.img"))])
        .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (path, r) in &replies[..4] {
        assert_eq!(r.status, 403, "{path}: {}", text(&r.body));
        let e = error_of(r);
        assert!(e.contains(path.trim_start_matches("../")), "{e}");
        assert!(e.contains("allowed_paths"), "{e}");
        assert!(
            e.contains(&allowed.path().canonicalize().unwrap().display().to_string()),
            "names the allowed roots: {e}"
        );
    }
    for (what, r) in &replies[4..] {
        assert_eq!(r.status, 200, "{what}: {}", text(&r.body));
    }
    assert!(allowed.path().join("ok.img").exists());
    assert!(!outside.path().join("escape.img").exists());
    // The refused LUNs are not in the running config or the file.
    let saved = std::fs::read_to_string(data.join("ironlun.toml")).unwrap();
    assert!(
        !saved.contains("secret.img") && !saved.contains("escape"),
        "{saved}"
    );
    // `ctl lun add` gets the same answer, as an error naming the path.
    let admin = d.admin_url().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        ctl(
            &admin,
            &[
                "lun",
                "add",
                &format!("{TARGET}/7"),
                "--backstore",
                "file",
                "--size",
                "1MiB",
                "--path",
                "/etc/hostname",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("403") && err.contains("/etc/hostname"),
        "{err}"
    );
}

#[test]
fn the_default_socket_is_owner_only() {
    let d = Daemon::builder(IRONLUN).start();
    let sock = d.admin_socket();
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o600, "{sock:?}");
    assert_eq!(m.uid(), own_uid(), "owned by the daemon's user");
    // Open the directory to everyone so that only the socket's own mode decides.
    let dir = sock.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Another user: `ironlun ctl` run as nobody gets EACCES from connect(2).
    let admin = d.admin_url().to_owned();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_ironlun"))
        .args(["ctl", "--admin", &admin, "reservations"])
        .env_remove("IRONLUN_ADMIN")
        .output()
        .expect("setpriv (util-linux) is needed");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach the ironlun admin API")
            && err.contains(&format!("os error {}", eacces())),
        "{err}"
    );
    // The daemon's own user gets in.
    let out = ctl(&admin, &["reservations"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The uid of this test process (the daemon runs as the same user).
fn own_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// EACCES on Linux.
fn eacces() -> i32 {
    13
}

/// Open `n` admin connections that each send half a request head and then hold it.
fn slow_clients(admin: &str, n: usize) -> Vec<AdminStream> {
    (0..n)
        .map(|_| {
            let mut s = admin_connect(admin);
            s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect()
}

/// 500 slow clients, then `ctl lun list` and `/v1/health` answer within 1 s each; `token`
/// is sent by ctl when given.
fn answers_under_slowloris(d: &Daemon, token: Option<&Path>) {
    let baseline = d.open_fds();
    let held = slow_clients(&d.admin, 500);
    let mut args = vec![];
    let tok;
    if let Some(t) = token {
        tok = t.display().to_string();
        args.extend(["--token-file", tok.as_str()]);
    }
    args.extend(["lun", "list"]);
    // New clients are served while every slow one is still held (none of them is closed by
    // the client side): the slow ones cannot lock the API out.
    let out = ctl(&d.admin, &args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(TARGET), "{}", text(&out.stdout));
    let c = Client::new(&d.admin, token).unwrap();
    let r = c.get("/v1/health").unwrap();
    assert_eq!(r.status, 200, "{}", text(&r.body));
    // The daemon keeps a bounded number of them: the oldest idle ones were closed.
    let fds = d.open_fds();
    assert!(
        fds <= baseline + ironlun::admin::MAX_CONNECTIONS + 16,
        "{fds} fds (baseline {baseline})"
    );
    drop(held);
}

#[test]
fn slow_clients_on_the_socket_do_not_starve_ctl() {
    let d = Daemon::builder(IRONLUN).start();
    answers_under_slowloris(&d, None);
}

#[test]
fn slow_clients_on_tcp_do_not_starve_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, TOKEN).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n",
        token
    );
    let d = Daemon::builder(IRONLUN)
        .config(&config)
        .start_in(dir.path());
    assert!(d.admin.starts_with("http://127.0.0.1:"), "{}", d.admin);
    // Without the token: 401.
    let r = Client::new(&d.admin, None)
        .unwrap()
        .get("/v1/health")
        .unwrap();
    assert_eq!(r.status, 401);
    answers_under_slowloris(&d, Some(&token));
}
