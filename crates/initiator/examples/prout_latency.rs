//! PERSISTENT RESERVE OUT latency through one target (`scripts/bench/cluster.sh`): log in as
//! one initiator, register a key, then change it N times (REGISTER with the old key as the
//! reservation key and a new service action key: each one a state change), timing each
//! command. Prints `count p50_us p90_us p99_us max_us` on one line.
//!
//! Usage: `prout_latency HOST:PORT TARGET N`

use bytes::Bytes;
use ironlun_initiator::pr::{out_cdb, OutAction, OutParams};
use ironlun_initiator::{LoginOptions, Session};
use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, target, n] = args.as_slice() else {
        return Err("usage: prout_latency HOST:PORT TARGET N".into());
    };
    let n: u64 = n.parse()?;
    let opts = LoginOptions::new("iqn.2026-11.io.ironlun:prout-bench", Some(target.clone()));
    let s = Session::connect(addr.as_str(), opts).await?;
    // Past the unit attentions of a new nexus.
    for _ in 0..8 {
        if s.test_unit_ready(0).await?.status == 0 {
            break;
        }
    }
    let mut key = 0u64;
    let mut lat = Vec::new();
    for i in 0..=n {
        let next = 0x1000 + i;
        let p = OutParams::keys(key, next).encode();
        let cdb = out_cdb(OutAction::Register, 0, 24);
        let t = Instant::now();
        let r = s.command(0, &cdb, Bytes::from(p), 0).await?;
        let us = t.elapsed().as_micros();
        if r.status != 0 {
            return Err(format!("PR OUT {i}: status {:#x} {:?}", r.status, r.sense_key()).into());
        }
        if i > 0 {
            lat.push(us);
        }
        key = next;
    }
    // Leave no registration behind.
    let p = OutParams::keys(key, 0).encode();
    let _ = s
        .command(0, &out_cdb(OutAction::Register, 0, 24), Bytes::from(p), 0)
        .await?;
    lat.sort_unstable();
    // Nearest rank: the value at index ⌈q·len⌉ − 1 (q in percent).
    let at = |pct: usize| {
        let i = (lat.len() * pct).div_ceil(100).saturating_sub(1);
        lat.get(i).copied().unwrap_or(0)
    };
    println!(
        "{} {} {} {} {}",
        lat.len(),
        at(50),
        at(90),
        at(99),
        lat.last().copied().unwrap_or(0)
    );
    Ok(())
}
