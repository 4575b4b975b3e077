//! Logging in with `ironlun_initiator` the way the tests do: a normal session to a target,
//! then TEST UNIT READY until GOOD (the first command of a new nexus reports the power-on
//! unit attention).

use crate::{PROMPT, TARGET};
use bytes::Bytes;
use ironlun_initiator::{ChapCredentials, CommandResult, LoginOptions, Session};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::ToSocketAddrs;

/// Login options for a normal session to [`TARGET`] as `initiator`.
pub fn opts(initiator: &str) -> LoginOptions {
    LoginOptions::new(initiator, Some(TARGET.to_owned()))
}

/// `Login::new(initiator).connect(addr)`: a session to [`TARGET`], unit attention cleared.
pub async fn session(addr: SocketAddr, initiator: &str) -> Session {
    Login::new(initiator).connect(addr).await
}

/// One login: the options the tests vary (target, ISID, CHAP, digests, timeout) and how the
/// new nexus is made ready (TEST UNIT READY on which LUN, at most how many times).
#[derive(Clone, Debug)]
pub struct Login {
    opts: LoginOptions,
    ready_luns: Vec<u64>,
    ready_tries: u32,
}

impl Login {
    /// To [`TARGET`] as `initiator`, with the initiator library's defaults; ready once
    /// TEST UNIT READY on LUN 0 is GOOD within 3 tries.
    pub fn new(initiator: &str) -> Login {
        Login::with_options(opts(initiator))
    }

    /// Log in with `opts` as they are.
    pub fn with_options(opts: LoginOptions) -> Login {
        Login {
            opts,
            ready_luns: vec![0],
            ready_tries: 3,
        }
    }

    /// To `target` instead of [`TARGET`].
    pub fn target(mut self, target: &str) -> Login {
        self.opts.target_name = Some(target.to_owned());
        self
    }

    /// The whole ISID (with the initiator name it names the session).
    pub fn isid(mut self, isid: [u8; 6]) -> Login {
        self.opts.isid = isid;
        self
    }

    /// The ISID's last byte (its qualifier), the rest left at the default.
    pub fn isid_qualifier(mut self, q: u8) -> Login {
        self.opts.isid[5] = q;
        self
    }

    /// Authenticate with CHAP.
    pub fn chap(mut self, chap: ChapCredentials) -> Login {
        self.opts.chap = Some(chap);
        self
    }

    /// Ask for CRC32C header and data digests.
    pub fn digests(mut self, on: bool) -> Login {
        self.opts.header_digest = on;
        self.opts.data_digest = on;
        self
    }

    /// Upper bound on each login round trip and on the TCP connect.
    pub fn timeout(mut self, t: Duration) -> Login {
        self.opts.timeout = t;
        self
    }

    /// Make the nexus ready with TEST UNIT READY on each of `luns` in turn, each GOOD within
    /// `tries`.
    pub fn ready(mut self, luns: &[u64], tries: u32) -> Login {
        self.ready_luns = luns.to_vec();
        self.ready_tries = tries;
        self
    }

    /// The login options as they stand.
    pub fn options(&self) -> &LoginOptions {
        &self.opts
    }

    /// The login alone through `addr` (no TEST UNIT READY): its result.
    pub async fn try_connect(self, addr: impl ToSocketAddrs) -> ironlun_initiator::Result<Session> {
        Session::connect(addr, self.opts).await
    }

    /// Log in through `addr`, then TEST UNIT READY until GOOD. Panics if the login fails or
    /// TEST UNIT READY is not GOOD within the tries.
    pub async fn connect(self, addr: impl ToSocketAddrs) -> Session {
        let s = Session::connect(addr, self.opts).await.expect("login");
        for lun in self.ready_luns {
            clear_ua(&s, lun, self.ready_tries).await;
        }
        s
    }
}

/// TEST UNIT READY on `lun` (the 8-byte LUN field as the initiator library takes it) until
/// GOOD, at most `tries` times: past the unit attentions queued for the nexus (power-on, a
/// reset). Panics if it is never GOOD.
pub async fn clear_ua(s: &Session, lun: u64, tries: u32) {
    for _ in 0..tries {
        if s.test_unit_ready(lun).await.expect("TUR").status == 0 {
            return;
        }
    }
    panic!("LUN {lun:#x}: TEST UNIT READY never GOOD");
}

/// The (ASC, ASCQ) of `r` if it is a unit attention: CHECK CONDITION, sense key 6 (SAM-5 §5.14).
pub fn unit_attention(r: &CommandResult) -> Option<(u8, u8)> {
    let k = r.sense_key()?;
    (r.status == 0x02 && k.key == 0x06).then_some((k.asc, k.ascq))
}

/// `cdb` on `lun`, sent again while it returns a unit attention (those queued by other
/// nexuses' PR, ownership or reset events; a test checks them where they matter). Returns the
/// final result and the (ASC, ASCQ) of every unit attention passed. Panics on a transport
/// error, a hang (hang guard [`PROMPT`]) or more than 8 unit attentions in a row.
pub async fn past_ua(
    s: &Session,
    lun: u64,
    cdb: &[u8],
    data: Bytes,
    expected_in: u32,
) -> (CommandResult, Vec<(u8, u8)>) {
    let mut uas = Vec::new();
    for _ in 0..8 {
        let r = tokio::time::timeout(PROMPT, s.command(lun, cdb, data.clone(), expected_in))
            .await
            .expect("command hung")
            .expect("command");
        match unit_attention(&r) {
            Some(ua) => uas.push(ua),
            None => return (r, uas),
        }
    }
    panic!("unit attentions never end: {uas:?}");
}
