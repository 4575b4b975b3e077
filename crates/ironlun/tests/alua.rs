//! Daemon test of implicit ALUA (issue 8 acceptance 4): two portals in two target port groups
//! serve the same LU. Switching group 2 to standby through the admin API (and `ironlun ctl
//! port-group`) raises ASYMMETRIC ACCESS STATE CHANGED (2Ah/06h), then fails media commands
//! through portal 2 with NOT READY 04h/0Bh while INQUIRY and REPORT TARGET PORT GROUPS still
//! answer there and show the states, and portal 1 keeps serving I/O; unavailable gives
//! 04h/0Ch; back to active, portal 2 serves I/O again. CDBs are built by hand (SPC-4 §6.27).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_cli::ctl::Client;
use ironlun_initiator::{CommandResult, Session};
use ironlun_testkit::{pattern, Daemon, Login, PROMPT};
use serde_json::{json, Value};
use std::time::Duration;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TARGET: &str = "iqn.2026-11.io.ironlun:alua";
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
/// REPORT TARGET PORT GROUPS, extended header (PARAMETER DATA FORMAT 001b), 4 KiB.
const RTPG: [u8; 12] = [0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];

fn config() -> String {
    format!(
        "[[portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = 1\n\
         [[portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = 2\n\
         [[port_group]]\nid = 2\nstate = \"active_non_optimized\"\ntpgts = [2]\n\
         [[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"16MiB\"\n"
    )
}

async fn call(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (base, method, path) = (base.to_owned(), method.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        let c = Client::new(&base, None).unwrap();
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let r = c
            .request(&method, &path, bytes.as_deref(), Duration::from_secs(30))
            .unwrap();
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    })
    .await
    .unwrap()
}

async fn set_state(base: &str, id: u16, state: &str) -> Value {
    let (s, v) = call(
        base,
        "PUT",
        &format!("/v1/port-groups/{id}"),
        Some(json!({ "state": state })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v
}

async fn run(s: &Session, cdb: &[u8], data: Bytes, alloc: u32) -> CommandResult {
    tokio::time::timeout(PROMPT, s.command(0, cdb, data, alloc))
        .await
        .expect("command hung")
        .expect("command")
}

fn sense(r: &CommandResult) -> Option<(u8, u8, u8)> {
    r.sense_key().map(|k| (k.key, k.asc, k.ascq))
}

fn read10(lba: u32) -> [u8; 10] {
    let l = lba.to_be_bytes();
    [0x28, 0, l[0], l[1], l[2], l[3], 0, 0, 1, 0]
}

fn write10(lba: u32) -> [u8; 10] {
    let mut c = read10(lba);
    c[0] = 0x2A;
    c
}

/// Write a block through `s` and read it back.
async fn io_works(s: &Session, lba: u32, seed: u64) {
    let data = pattern(seed, 512);
    let w = run(s, &write10(lba), data.clone(), 0).await;
    assert_eq!((w.status, sense(&w)), (GOOD, None), "WRITE(10)");
    let r = run(s, &read10(lba), Bytes::new(), 512).await;
    assert_eq!((r.status, sense(&r)), (GOOD, None), "READ(10)");
    assert_eq!(r.data, data);
}

/// (group id, state code, tpgts) of each RTPG descriptor, after checking the header.
fn parse_rtpg(d: &[u8]) -> Vec<(u16, u8, Vec<u16>)> {
    assert!(d.len() >= 8);
    assert_eq!(
        u32::from_be_bytes(d[..4].try_into().unwrap()) as usize + 4,
        d.len()
    );
    assert_eq!(d[4] & 0x70, 0x10, "extended format");
    let mut out = Vec::new();
    let mut at = 8;
    while at < d.len() {
        let n = usize::from(d[at + 7]);
        let ports = (0..n)
            .map(|i| u16::from_be_bytes([d[at + 8 + 4 * i + 2], d[at + 8 + 4 * i + 3]]))
            .collect();
        out.push((
            u16::from_be_bytes([d[at + 2], d[at + 3]]),
            d[at] & 0x0F,
            ports,
        ));
        at += 8 + 4 * n;
    }
    out
}

async fn rtpg(s: &Session) -> Vec<(u16, u8, Vec<u16>)> {
    let r = run(s, &RTPG, Bytes::new(), 4096).await;
    assert_eq!((r.status, sense(&r)), (GOOD, None), "RTPG");
    parse_rtpg(&r.data)
}

/// The target port group designator (VPD 83h type 5) seen through `s`.
async fn vpd_group(s: &Session) -> u16 {
    let r = s.inquiry_vpd(0, 0x83, 1024).await.expect("VPD 83h");
    assert_eq!(r.status, GOOD);
    let d = &r.data;
    let mut at = 4;
    while at + 4 <= d.len() {
        if d[at + 1] & 0x3F == 0x15 {
            return u16::from_be_bytes([d[at + 6], d[at + 7]]);
        }
        at += 4 + usize::from(d[at + 3]);
    }
    panic!("no target port group designator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_and_unavailable_group_while_other_serves() {
    let d = Daemon::builder(IRONLUN).config(&config()).portals().start();
    assert_eq!(d.addrs.len(), 2, "{:?}", d.addrs);
    let base = d.admin_url().to_owned();
    let p1 = Login::new("iqn.2026-11.io.ironlun:host-a")
        .target(TARGET)
        .ready(&[0], 4)
        .connect(d.addrs[0])
        .await;
    let p2 = Login::new("iqn.2026-11.io.ironlun:host-a")
        .target(TARGET)
        .ready(&[0], 4)
        .connect(d.addrs[1])
        .await;

    // Both ports serve I/O; TPGS = implicit; VPD 83h names each port's group.
    let inq = p2.inquiry(0, 96).await.unwrap();
    assert_eq!(inq.data[5] & 0x30, 0x10, "TPGS");
    io_works(&p1, 10, 1).await;
    io_works(&p2, 11, 2).await;
    assert_eq!(vpd_group(&p1).await, 1);
    assert_eq!(vpd_group(&p2).await, 2);
    let groups = vec![(1, 0x0, vec![1]), (2, 0x1, vec![2])];
    assert_eq!(rtpg(&p2).await, groups);
    let (s, v) = call(&base, "GET", "/v1/port-groups", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["groups"][1]["state"], "active_non_optimized");

    // Group 2 → standby through `ironlun ctl port-group`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ironlun"))
        .args(["ctl", "--admin", &base, "port-group", "2", "standby"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(2).eq(["2", "standby"])),
        "{text}"
    );
    for p in [&p1, &p2] {
        let r = run(p, &read10(0), Bytes::new(), 512).await;
        assert_eq!(
            (r.status, sense(&r)),
            (CHECK_CONDITION, Some((0x06, 0x2A, 0x06))),
            "ASYMMETRIC ACCESS STATE CHANGED first"
        );
    }
    let cases: [(&[u8], Bytes, u32); 3] = [
        (&read10(0), Bytes::new(), 512),
        (&write10(0), Bytes::from(vec![0u8; 512]), 0),
        (&[0u8; 6], Bytes::new(), 0),
    ];
    for (cdb, data, alloc) in cases {
        let r = run(&p2, cdb, data, alloc).await;
        assert_eq!(
            (r.status, sense(&r)),
            (CHECK_CONDITION, Some((0x02, 0x04, 0x0B))),
            "standby: {cdb:02x?}"
        );
    }
    assert_eq!(p2.inquiry(0, 96).await.unwrap().status, GOOD);
    assert_eq!(rtpg(&p2).await, vec![(1, 0x0, vec![1]), (2, 0x2, vec![2])]);
    io_works(&p1, 12, 3).await;

    // Unavailable: even MODE SENSE fails; RTPG answers.
    set_state(&base, 2, "unavailable").await;
    let r = run(&p2, &[0x1A, 0, 0x3F, 0, 255, 0], Bytes::new(), 255).await;
    assert_eq!(sense(&r), Some((0x06, 0x2A, 0x06)));
    let r = run(&p2, &[0x1A, 0, 0x3F, 0, 255, 0], Bytes::new(), 255).await;
    assert_eq!(sense(&r), Some((0x02, 0x04, 0x0C)), "unavailable");
    // RTPG reports a pending unit attention like any command but INQUIRY / REPORT LUNS /
    // REQUEST SENSE.
    let r = run(&p1, &RTPG, Bytes::new(), 4096).await;
    assert_eq!(sense(&r), Some((0x06, 0x2A, 0x06)));
    assert_eq!(rtpg(&p1).await[1].1, 0x3);
    io_works(&p1, 13, 4).await;

    // Bad requests.
    let (s, v) = call(
        &base,
        "PUT",
        "/v1/port-groups/7",
        Some(json!({"state": "standby"})),
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = call(
        &base,
        "PUT",
        "/v1/port-groups/2",
        Some(json!({"state": "offline"})),
    )
    .await;
    assert_eq!((s, v["code"].as_str()), (400, Some("bad_state")), "{v}");

    // Back to active/optimized: portal 2 serves I/O again.
    let v = set_state(&base, 2, "active_optimized").await;
    assert_eq!(v["state"], "active_optimized");
    assert_eq!(v["tpgts"], json!([2]));
    let r = run(&p2, &read10(0), Bytes::new(), 512).await;
    assert_eq!(sense(&r), Some((0x06, 0x2A, 0x06)));
    io_works(&p2, 14, 5).await;
    assert_eq!(rtpg(&p2).await, vec![(1, 0x0, vec![1]), (2, 0x0, vec![2])]);
}
