//! The admin API and `ironlun ctl` against the real daemon: health, the reservation view after
//! PERSISTENT RESERVE OUT commands, the ctl binary's JSON and table, bearer-token enforcement,
//! malformed HTTP, and `[admin]` configuration errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_api::{Health, LuReservations, ReservationsList};
use ironlun_cli::ctl::{Client, Reply};
use ironlun_testkit::{admin_connect, opts, parse_http_response, session, Binary, Daemon, TARGET};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TOKEN: &str = "s3cret-token-0123456789abcdef";

/// `GET path` through the library client (on the blocking pool).
async fn get(base: &str, path: &str, token_file: Option<PathBuf>) -> Reply {
    let (base, path) = (base.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        Client::new(&base, token_file.as_deref())
            .unwrap()
            .get(&path)
            .unwrap()
    })
    .await
    .unwrap()
}

async fn get_json<T: serde::de::DeserializeOwned + Send + 'static>(base: &str, path: &str) -> T {
    let r = get(base, path, None).await;
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).unwrap()
}

/// Send raw bytes to the admin API, read the first response.
fn raw(base: &str, bytes: &[u8]) -> Reply {
    let mut s = admin_connect(base);
    s.set_read_timeout(Some(Duration::from_secs(15)));
    // The server may answer (and stop reading) before everything is written.
    let _ = s.write_all(bytes);
    // End of request: an incomplete head is answered at once instead of after the deadline.
    s.shutdown_write();
    read_reply(&mut s)
}

/// Read until one whole response has arrived; status 0 when the server closes without one.
fn read_reply(s: &mut impl Read) -> Reply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((status, body)) = parse_http_response(&buf) {
            return Reply { status, body };
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) if buf.is_empty() => {
                return Reply {
                    status: 0,
                    body: Vec::new(),
                }
            }
            Ok(0) | Err(_) => panic!("no whole response: {:?}", String::from_utf8_lossy(&buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn error_of(r: &Reply) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["error"].as_str().unwrap().to_owned()
}

/// PERSISTENT RESERVE OUT (SPC-4 §6.16): CDB 5Fh with the service action in byte 1, scope 0
/// and type in byte 2, the parameter list length in bytes 5-8; the 24-byte basic parameter
/// list: reservation key, service action reservation key, flags in byte 20 (APTPL bit 0).
async fn prout(s: &ironlun_initiator::Session, sa: u8, ty: u8, key: u64, sa_key: u64) -> u8 {
    let cdb = [0x5f, sa, ty & 0x0f, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let r = s.command(0, &cdb, Bytes::from(p), 0).await.expect("PR OUT");
    assert_eq!(r.response, 0);
    r.status
}

fn ctl(args: &[&str]) -> Output {
    Binary::new(IRONLUN).ctl(args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_empty_reservations() {
    let d = Daemon::builder(IRONLUN).start();
    let h: Health = get_json(d.admin_url(), "/v1/health").await;
    assert_eq!(h.status, "ok");
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    let all: ReservationsList = get_json(d.admin_url(), "/v1/reservations").await;
    assert_eq!(all.luns.len(), 1);
    let lu = &all.luns[0];
    assert_eq!((lu.target.as_str(), lu.lun), (TARGET, 0));
    assert_eq!((lu.generation, lu.aptpl), (0, false));
    assert!(lu.reservation.is_none() && lu.registrations.is_empty() && lu.spc2_holder.is_none());
    let one: LuReservations =
        get_json(d.admin_url(), &format!("/v1/reservations/{TARGET}/0")).await;
    assert_eq!(&one, lu);
    // Target names compare case-insensitively; the answer carries the configured spelling.
    let upper: LuReservations = get_json(
        d.admin_url(),
        &format!("/v1/reservations/{}/0", TARGET.to_uppercase()),
    )
    .await;
    assert_eq!(upper.target, TARGET);
    for path in [
        format!("/v1/reservations/{TARGET}/7"),
        "/v1/reservations/iqn.2026-11.io.ironlun:nope/0".to_owned(),
    ] {
        let r = get(d.admin_url(), &path, None).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(!error_of(&r).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_after_register_and_reserve() {
    let d = Daemon::builder(IRONLUN).start();
    let name_a = "iqn.2026-11.io.ironlun:admin-a";
    let name_b = "iqn.2026-11.io.ironlun:admin-b";
    let a = session(d.addr, name_a).await;
    let mut ob = opts(name_b);
    ob.isid = [0x80, 0x12, 0x34, 0x56, 0x00, 0x02];
    let b = ironlun_initiator::Session::connect(d.addr, ob)
        .await
        .expect("login b");
    let _ = b.test_unit_ready(0).await; // the power-on unit attention
    assert_eq!(prout(&a, 0x00, 0, 0, 0xaaaa).await, 0, "REGISTER a");
    assert_eq!(prout(&b, 0x00, 0, 0, 0xbbbb).await, 0, "REGISTER b");
    assert_eq!(prout(&a, 0x01, 5, 0xaaaa, 0).await, 0, "RESERVE a type 5");

    let port_a = format!("{name_a},i,0x80494c4e0001");
    let port_b = format!("{name_b},i,0x801234560002");
    let lu: LuReservations = get_json(d.admin_url(), &format!("/v1/reservations/{TARGET}/0")).await;
    assert_eq!(lu.generation, 2, "two registrations: {lu:?}");
    assert!(!lu.aptpl);
    let r = lu.reservation.as_ref().expect("reservation");
    assert_eq!(
        (r.type_code, r.type_name.as_str(), r.scope.as_str()),
        (5, "Write Exclusive, Registrants Only", "LU_SCOPE")
    );
    assert_eq!(r.key, "0x000000000000aaaa");
    assert_eq!(r.holder.as_deref(), Some(port_a.as_str()));
    let mut regs = lu.registrations.clone();
    regs.sort_by(|x, y| x.initiator_port.cmp(&y.initiator_port));
    assert_eq!(regs.len(), 2, "{regs:?}");
    assert_eq!(regs[0].initiator_port, port_a);
    assert_eq!(regs[0].key, "0x000000000000aaaa");
    assert_eq!(regs[0].target_port, format!("{TARGET},t,0x0001"));
    assert_eq!(regs[0].rtpi, Some(1));
    assert!(regs[0].holder);
    assert_eq!(regs[1].initiator_port, port_b);
    assert_eq!(regs[1].key, "0x000000000000bbbb");
    assert!(!regs[1].holder);

    // The same LU in the list of all.
    let all: ReservationsList = get_json(d.admin_url(), "/v1/reservations").await;
    assert_eq!(all.luns, vec![lu.clone()]);

    // `ironlun ctl reservations --json`: the API's JSON.
    let url = d.admin_url().to_owned();
    let (json_all, json_one, table, table_one) = tokio::task::spawn_blocking(move || {
        (
            ctl(&["--admin", &url, "reservations", "--json"]),
            ctl(&[
                "--admin",
                &url,
                "reservations",
                &format!("{TARGET}/0"),
                "--json",
            ]),
            ctl(&["--admin", &url, "reservations"]),
            ctl(&["--admin", &url, "reservations", &format!("{TARGET}/0")]),
        )
    })
    .await
    .unwrap();
    for o in [&json_all, &json_one, &table, &table_one] {
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    let parsed: ReservationsList = serde_json::from_slice(&json_all.stdout).unwrap();
    assert_eq!(parsed.luns, vec![lu.clone()]);
    let parsed: LuReservations = serde_json::from_slice(&json_one.stdout).unwrap();
    assert_eq!(parsed, lu);

    // The human table.
    let t = text(&table.stdout);
    assert_eq!(t, text(&table_one.stdout));
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0],
        format!("{TARGET} LUN 0  generation 2  APTPL off"),
        "{t}"
    );
    assert_eq!(
        lines[1],
        format!("  reservation: Write Exclusive, Registrants Only (type 5), holder {port_a}, key 0x000000000000aaaa"),
        "{t}"
    );
    assert!(lines[2].starts_with("  INITIATOR PORT"), "{t}");
    for col in ["KEY", "TARGET PORT", "HOLDER"] {
        assert!(lines[2].contains(col), "{t}");
    }
    let row_a = lines[3..]
        .iter()
        .find(|l| l.contains(&port_a))
        .expect("row a");
    let cells: Vec<&str> = row_a.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            port_a.as_str(),
            "0x000000000000aaaa",
            &format!("{TARGET},t,0x0001"),
            "yes"
        ]
    );
    let row_b = lines[3..]
        .iter()
        .find(|l| l.contains(&port_b))
        .expect("row b");
    assert!(row_b.ends_with(" no"), "{t}");

    // RELEASE: no reservation; the table says so.
    assert_eq!(prout(&a, 0x02, 5, 0xaaaa, 0).await, 0, "RELEASE");
    let lu: LuReservations = get_json(d.admin_url(), &format!("/v1/reservations/{TARGET}/0")).await;
    assert!(lu.reservation.is_none());
    assert!(lu.registrations.iter().all(|g| !g.holder));
    let url = d.admin_url().to_owned();
    let out = tokio::task::spawn_blocking(move || ctl(&["--admin", &url, "reservations"]))
        .await
        .unwrap();
    assert!(
        text(&out.stdout).contains("\n  no reservation\n"),
        "{}",
        text(&out.stdout)
    );
    a.logout().await.unwrap();
    b.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_errors_and_exit_codes() {
    let d = Daemon::builder(IRONLUN).start();
    let url = d.admin_url().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        let not_found = ctl(&["--admin", &url, "reservations", &format!("{TARGET}/9")]);
        let no_target = ctl(&["--admin", &url, "reservations", "iqn.2026-11.x:none/0"]);
        let usage = ctl(&["--admin", &url, "reservations", "no-lun-here"]);
        let usage2 = ctl(&["reservations", "--bogus"]);
        // A port nothing listens on (the daemon's iSCSI port is taken by iSCSI, not HTTP: use a
        // freshly closed one).
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let down = ctl(&[
            "--admin",
            &format!("http://127.0.0.1:{port}"),
            "reservations",
        ]);
        let env = Command::new(env!("CARGO_BIN_EXE_ironlun"))
            .args(["ctl", "reservations", "--json"])
            .env("IRONLUN_ADMIN", &url)
            .output()
            .unwrap();
        let bad_url = ctl(&["--admin", "https://127.0.0.1:1", "reservations"]);
        // No daemon on the socket: the same "cannot reach" message, naming the socket.
        let no_socket = ctl(&["--admin", "unix:/nonexistent/admin.sock", "reservations"]);
        assert_eq!(no_socket.status.code(), Some(1));
        assert!(
            text(&no_socket.stderr)
                .contains("cannot reach the ironlun admin API at unix:/nonexistent/admin.sock"),
            "{}",
            text(&no_socket.stderr)
        );
        (not_found, no_target, usage, usage2, down, env, bad_url)
    })
    .await
    .unwrap();
    let (not_found, no_target, usage, usage2, down, env, bad_url) = out;
    assert_eq!(not_found.status.code(), Some(1));
    assert!(
        text(&not_found.stderr).contains("no LUN 9") && text(&not_found.stderr).contains("404"),
        "{}",
        text(&not_found.stderr)
    );
    assert!(not_found.stdout.is_empty());
    assert_eq!(no_target.status.code(), Some(1));
    assert!(text(&no_target.stderr).contains("no target"));
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage.stderr));
    assert!(text(&usage.stderr).contains("TARGET/LUN"));
    assert_eq!(usage2.status.code(), Some(2));
    assert_eq!(down.status.code(), Some(1));
    assert!(
        text(&down.stderr).contains("cannot reach the ironlun admin API"),
        "{}",
        text(&down.stderr)
    );
    assert!(env.status.success(), "{}", text(&env.stderr));
    let _: ReservationsList = serde_json::from_slice(&env.stdout).unwrap();
    assert_eq!(bad_url.status.code(), Some(1));
    assert!(
        text(&bad_url.stderr).contains("unix:PATH or http://"),
        "{}",
        text(&bad_url.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_enforced() {
    let config = format!(
        "[admin]\ntoken_file = \"admin.token\"\n[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    );
    let d = Daemon::builder(IRONLUN)
        .config(&config)
        .file("admin.token", &format!("{TOKEN}\n"))
        .start();
    let base = d.admin_url().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, TOKEN).unwrap();
    std::fs::write(&bad, "not-the-token-0123456789").unwrap();
    for path in ["/v1/health", "/v1/reservations"] {
        let r = get(&base, path, None).await;
        assert_eq!(r.status, 401, "{path} without a token");
        assert!(error_of(&r).contains("token"));
        let r = get(&base, path, Some(bad.clone())).await;
        assert_eq!(r.status, 401, "{path} with a wrong token");
        let r = get(&base, path, Some(good.clone())).await;
        assert_eq!(r.status, 200, "{path} with the token");
    }
    // Other schemes and the token without a scheme are refused too.
    let addr = base.clone();
    let replies = tokio::task::spawn_blocking(move || {
        [
            format!("Basic {TOKEN}"),
            TOKEN.to_string(),
            format!("Bearer {TOKEN}x"),
        ]
        .map(|auth| {
            raw(
                &addr,
                format!("GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n")
                    .as_bytes(),
            )
        })
    })
    .await
    .unwrap();
    for r in replies {
        assert_eq!(r.status, 401);
    }
    // The ctl binary: without the token it fails with a hint, with it it works.
    let (g, b2) = (good.clone(), base.clone());
    let (without, with) = tokio::task::spawn_blocking(move || {
        (
            ctl(&["--admin", &b2, "reservations"]),
            ctl(&[
                "--admin",
                &b2,
                "--token-file",
                g.to_str().unwrap(),
                "reservations",
                "--json",
            ]),
        )
    })
    .await
    .unwrap();
    assert_eq!(without.status.code(), Some(1));
    assert!(
        text(&without.stderr).contains("401") && text(&without.stderr).contains("--token-file"),
        "{}",
        text(&without.stderr)
    );
    assert!(with.status.success(), "{}", text(&with.stderr));
    let l: ReservationsList = serde_json::from_slice(&with.stdout).unwrap();
    assert_eq!(l.luns.len(), 1);
    // The token never reaches the log.
    assert!(!d.stderr().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_4xx_and_the_daemon_keeps_serving() {
    let mut d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let b = base.clone();
    let replies = tokio::task::spawn_blocking(move || {
        let mut oversized = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        oversized.resize(20 * 1024, b'a');
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
                400,
            ),
            (b"hello\r\n\r\n".to_vec(), 400),
            (oversized, 431),
            (b"BREW /v1/health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 405),
            (
                b"POST /v1/reservations HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
                    .to_vec(),
                405,
            ),
            (b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 404),
            (b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 404),
            (b"GET /v1/health HTTP/1.1\r\n\r\n".to_vec(), 400),
            (b"GET /v1/health HTTP/3.0\r\nHost: x\r\n\r\n".to_vec(), 400),
            // A chunked body is read like any other, within the same bound.
            (
                b"POST /v1/reservations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                    .to_vec(),
                405,
            ),
            (
                b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n".to_vec(),
                413,
            ),
            // Half a head, then EOF: closed without an answer (0: no response).
            (b"GET /v1/health HTTP/1.1\r\nHost: x\r\n".to_vec(), 0),
        ];
        cases
            .into_iter()
            .map(|(req, want)| {
                (
                    String::from_utf8_lossy(&req[..req.len().min(60)]).into_owned(),
                    raw(&b, &req),
                    want,
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (req, reply, want) in replies {
        assert_eq!(reply.status, want, "{req:?}: {}", text(&reply.body));
        // What reaches the handlers answers with the API's JSON error; hyper answers what it
        // cannot parse with the bare status.
        if !reply.body.is_empty() {
            assert!(!error_of(&reply).is_empty(), "{req:?}");
        }
    }
    // An idle connection does not block others; a closed-without-request one is harmless.
    let idle = admin_connect(&base);
    drop(admin_connect(&base));
    let h: Health = get_json(&base, "/v1/health").await;
    assert_eq!(h.status, "ok");
    drop(idle);
    d.assert_healthy();
}

/// Run `ironlun serve` with `config` in a temp dir; it must exit on its own.
fn serve_fails(config: &str, extra: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    match Daemon::builder(IRONLUN)
        .config(config)
        .args(extra)
        .spawn_in(dir.path())
    {
        Err(refused) => (refused.status.code(), refused.stderr),
        Ok(_) => panic!("the daemon started"),
    }
}

#[test]
fn admin_config_errors_name_line_and_key() {
    let lun = format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    );
    let (code, err) = serve_fails(&format!("[admin]\nlisten = \"0.0.0.0:0\"\n{lun}"), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ironlun.toml:2: admin.listen: "), "{err}");
    assert!(err.contains("token_file"), "{err}");
    let (code, err) = serve_fails(&format!("[admin]\nlisten = \"nowhere\"\n{lun}"), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ironlun.toml:2: admin.listen: "), "{err}");
    let (code, err) = serve_fails(&format!("[admin]\nport = 1\n{lun}"), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ironlun.toml:2: port: "), "{err}");
    // A missing token file stops the start, naming where it was configured.
    let (code, err) = serve_fails(
        &format!("[admin]\nenabled = true\ntoken_file = \"missing.token\"\n{lun}"),
        &["--admin", "127.0.0.1:0"],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("ironlun.toml:3: admin.token_file: "), "{err}");
    // TCP needs a token on loopback too, in the file and with --admin.
    let (code, err) = serve_fails(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{lun}"), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ironlun.toml:2: admin.listen: "), "{err}");
    assert!(err.contains("admin.token_file"), "{err}");
    let (code, err) = serve_fails(&lun, &["--admin", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("needs a bearer token") && err.contains("token_file"),
        "{err}"
    );
    let (code, err) = serve_fails(
        &format!("[admin]\nenabled = true\ntoken_file = \"missing.token\"\n{lun}"),
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("ironlun.toml:3: admin.token_file: "), "{err}");
    assert!(err.contains("missing.token"), "{err}");
    // --admin: non-loopback needs a token; nonsense is a usage error.
    let (code, err) = serve_fails(&lun, &["--admin", "0.0.0.0:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("token_file"), "{err}");
    let (code, err) = serve_fails(&lun, &["--admin", "somewhere"]);
    assert_eq!(code, Some(2), "{err}");
    // A configured address that is taken stops the start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let tok = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tok.path(), TOKEN).unwrap();
    let (code, err) = serve_fails(
        &format!("[admin]\ntoken_file = {:?}\n{lun}", tok.path()),
        &["--admin", &format!("127.0.0.1:{port}")],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("admin API: bind"), "{err}");
}

/// Run `ironlun serve` with `args` until it has printed its `url` line, then SIGTERM it;
/// (stdout, stderr, exit code).
fn serve_briefly(args: &[&str], env: &[(&str, &str)]) -> (String, String, Option<i32>) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ironlun"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut stdout = String::new();
    while !stdout.contains("\nurl ") {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        stdout.push_str(&line);
    }
    let ok = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    stdout.push_str(&rest);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let code = child.wait().unwrap().code();
    (stdout, stderr, code)
}

#[test]
fn admin_off_and_a_socket_held_by_a_live_daemon() {
    // --admin off: no admin line, no admin listener.
    let (out, err, code) = serve_briefly(&["--admin", "off"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("listening 127.0.0.1:"), "{out}");
    assert!(out.contains("\nurl iscsi://"), "{out}");
    assert!(!out.contains("admin "), "{out}");
    // Without arguments: the socket in the data directory.
    let (out, err, code) = serve_briefly(&[], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("\nadmin unix:/") && out.contains("/admin.sock"),
        "{out}"
    );
    // A second daemon on the same socket refuses to start (and leaves the first one's
    // socket alone); once the first is killed, its stale socket is replaced.
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
    );
    let first = Daemon::builder(IRONLUN)
        .config(&config)
        .start_in(dir.path());
    let Err(refused) = Daemon::builder(IRONLUN)
        .config(&config)
        .spawn_in(dir.path())
    else {
        panic!("a second daemon started on a live admin socket");
    };
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("admin.sock") && refused.stderr.contains("another process"),
        "{}",
        refused.stderr
    );
    assert!(first.admin_socket().exists());
    first.kill9();
    assert!(
        dir.path().join("admin.sock").exists(),
        "stale socket expected"
    );
    let again = Daemon::builder(IRONLUN)
        .config(&config)
        .start_in(dir.path());
    let r = raw(&again.admin, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200);
    // A clean exit removes the socket.
    drop(again);
    assert!(!dir.path().join("admin.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_a_request_sent_byte_by_byte() {
    let d = Daemon::builder(IRONLUN).start();
    let base = d.admin_url().to_owned();
    let reply = tokio::task::spawn_blocking(move || {
        let mut s = admin_connect(&base);
        s.set_read_timeout(Some(Duration::from_secs(15)));
        for b in b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n" {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        read_reply(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    let h: Health = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(h.status, "ok");
}
