//! Keep sessions of several initiators logged in to one target (`scripts/bench/cluster.sh`:
//! the hosts of the handover benchmark must be logged in). Logs in one session per name,
//! clears each new nexus's unit attentions, prints `ready` on stdout, then stays logged in
//! until it is killed.
//!
//! Usage: `hold_sessions HOST:PORT TARGET NAME...`

use ironlun_initiator::{LoginOptions, Session};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, target, names @ ..] = args.as_slice() else {
        return Err("usage: hold_sessions HOST:PORT TARGET NAME...".into());
    };
    if names.is_empty() {
        return Err("usage: hold_sessions HOST:PORT TARGET NAME...".into());
    }
    let mut sessions = Vec::new();
    for name in names {
        let opts = LoginOptions::new(name, Some(target.clone()));
        let s = Session::connect(addr.as_str(), opts).await?;
        for _ in 0..8 {
            if s.test_unit_ready(0).await?.status == 0 {
                break;
            }
        }
        sessions.push(s);
    }
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}
