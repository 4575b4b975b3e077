//! The stored form of the values of scale-out.md §2.1, as bytes for etcd: the LU's
//! [`Record`] and the `applied`/`drained` acknowledgements.
//!
//! A record is UTF-8 text, readable with `etcdctl get`:
//!
//! ```text
//! ironlun-cluster-record 1
//! id <gateway> <seq>
//! op prout <rtpi> <ISID, 12 hex> <service action> <scope> <type> <parameter list, hex> <initiator name>
//! op gone <gateway>                      (instead of the prout line)
//! op owner <step> <epoch> <host> [<to>]   (an ownership step: set, clear, prepare, fence,
//!                                          commit, abort, unfence; all but set, clear and
//!                                          fence name both hosts)
//! handover idle | handover prepared|fenced <epoch> <from> <to>
//! aborted - | aborted <epoch>,<epoch>,…    (aborted handover epochs, refused for good)
//! <the state in the APTPL file format of ironlun_scsi::pr::persist, with its own CRC32C>
//! ```
//!
//! The state part names the LU's serial, so a record copied to another LU's key is refused.
//! Decoding is strict and bounded: whatever is in the store, a gateway allocates at most
//! [`MAX_RECORD`] bytes for it and accepts only what [`encode_record`] writes. A state
//! decodes to its renumbered form (`PrState::renumber`), which is how [`Op::apply`] leaves it.

use crate::op::{Op, OpId, Record};
use crate::{GatewayId, Revision};
use ironlun_scsi::pr::ownership::{self, Handover, OwnershipOp};
use ironlun_scsi::pr::persist::{self, hex, unhex};
use ironlun_scsi::pr::{InitiatorPort, ItNexus, MAX_NAME_LEN};
use std::collections::BTreeSet;
use std::fmt;

/// First line of a record.
pub const MAGIC: &str = "ironlun-cluster-record 2";

/// Largest record accepted: etcd's own request limit (1.5 MiB) rounded up.
pub const MAX_RECORD: usize = 2 << 20;

/// Largest PERSISTENT RESERVE OUT parameter list carried in an op (SPEC_I_PT lists; the CDB's
/// PARAMETER LIST LENGTH is 32 bits, the daemon bounds what it receives far below this).
pub const MAX_PARAM: usize = 256 << 10;

/// Why stored bytes are not a record or an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

fn bad<T>(what: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(what.into()))
}

/// The record as stored at `P/lu/<naa>/pr` for the LU whose unit serial number is `serial`.
pub fn encode_record(rec: &Record, serial: &str) -> Vec<u8> {
    let mut s = format!("{MAGIC}\nid {} {}\n", rec.id.gateway.0, rec.id.seq);
    match &rec.op {
        Op::Prout {
            it,
            service_action,
            scope,
            ty,
            param,
        } => s.push_str(&format!(
            "op prout {} {} {service_action} {scope} {ty} {} {}\n",
            it.rtpi,
            hex(&it.initiator.isid()),
            if param.is_empty() {
                "-".to_string()
            } else {
                hex(param)
            },
            it.initiator.name()
        )),
        Op::GatewayGone { gateway } => s.push_str(&format!("op gone {}\n", gateway.0)),
        Op::Ownership(op) => s.push_str(&owner_line(op)),
    }
    s.push_str(&match rec.state.handover() {
        Handover::Idle => "handover idle\n".to_string(),
        Handover::Prepared { from, to, epoch } => {
            format!("handover prepared {epoch} {from} {to}\n")
        }
        Handover::Fenced { from, to, epoch } => format!("handover fenced {epoch} {from} {to}\n"),
    });
    let aborted = rec.state.aborted_epochs();
    if aborted.is_empty() {
        s.push_str("aborted -\n");
    } else {
        let list: Vec<String> = aborted.iter().map(u64::to_string).collect();
        s.push_str(&format!("aborted {}\n", list.join(",")));
    }
    let mut out = s.into_bytes();
    out.extend_from_slice(&persist::encode(&rec.state, serial));
    out
}

/// Parse what [`encode_record`] wrote for the LU with unit serial `serial`.
pub fn decode_record(bytes: &[u8], serial: &str) -> Result<Record, CodecError> {
    if bytes.len() > MAX_RECORD {
        return bad(format!(
            "record of {} bytes, over {MAX_RECORD}",
            bytes.len()
        ));
    }
    let mut lines = bytes.splitn(6, |&b| b == b'\n');
    let mut line = |what: &str| -> Result<&str, CodecError> {
        lines
            .next()
            .and_then(|l| std::str::from_utf8(l).ok())
            .ok_or_else(|| CodecError(format!("record: no {what} line")))
    };
    if line("first")? != MAGIC {
        return bad("not an ironlun cluster record (or another version)");
    }
    let id = line("id")?;
    let id = match id
        .strip_prefix("id ")
        .map(|r| r.split(' ').collect::<Vec<_>>())
        .as_deref()
    {
        Some([g, seq]) => OpId {
            gateway: GatewayId(g.parse().or_else(|_| bad(format!("id: gateway {g:?}")))?),
            seq: seq.parse().or_else(|_| bad(format!("id: seq {seq:?}")))?,
        },
        _ => return bad(format!("id line {id:?}")),
    };
    let op_line = line("op")?;
    let op = decode_op(op_line)?;
    let handover = decode_handover(line("handover")?)?;
    let aborted = decode_aborted(line("aborted")?)?;
    let rest = lines.next().unwrap_or_default();
    let mut state = persist::decode(rest, serial).or_else(|e| bad(format!("state: {e}")))?;
    state.set_handover(handover, aborted);
    Ok(Record { state, op, id })
}

fn owner_line(op: &OwnershipOp) -> String {
    match op {
        OwnershipOp::SetOwner { host, epoch } => format!("op owner set {epoch} {host}\n"),
        OwnershipOp::ClearOwner { host, epoch } => format!("op owner clear {epoch} {host}\n"),
        OwnershipOp::Prepare { from, to, epoch } => {
            format!("op owner prepare {epoch} {from} {to}\n")
        }
        OwnershipOp::Fence { from, epoch } => format!("op owner fence {epoch} {from}\n"),
        OwnershipOp::Commit { from, to, epoch } => {
            format!("op owner commit {epoch} {from} {to}\n")
        }
        OwnershipOp::Switch { from, to, epoch } => {
            format!("op owner switch {epoch} {from} {to}\n")
        }
        OwnershipOp::Abort { from, to, epoch } => format!("op owner abort {epoch} {from} {to}\n"),
        OwnershipOp::Unfence { from, to, epoch } => {
            format!("op owner unfence {epoch} {from} {to}\n")
        }
        OwnershipOp::Failover { from, to, epoch } => {
            format!("op owner failover {epoch} {from} {to}\n")
        }
    }
}

/// A host name as [`ownership::host_name`] leaves it (already lower-cased).
fn host(v: &str) -> Result<String, CodecError> {
    match ownership::host_name(v) {
        Ok(h) if h == v => Ok(h),
        _ => bad(format!("host name {:?}", v.get(..80).unwrap_or(v))),
    }
}

fn epoch(v: &str) -> Result<u64, CodecError> {
    v.parse().or_else(|_| bad(format!("epoch {v:?}")))
}

fn decode_handover(line: &str) -> Result<Handover, CodecError> {
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["handover", "idle"] => Ok(Handover::Idle),
        ["handover", "prepared", e, from, to] => Ok(Handover::Prepared {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        }),
        ["handover", "fenced", e, from, to] => Ok(Handover::Fenced {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        }),
        _ => bad(format!(
            "handover line {:?}",
            line.get(..80).unwrap_or(line)
        )),
    }
}

fn decode_aborted(line: &str) -> Result<BTreeSet<u64>, CodecError> {
    match line.strip_prefix("aborted ") {
        Some("-") => Ok(BTreeSet::new()),
        Some(list) => {
            // Counted before parsing: a hostile record allocates nothing in proportion.
            if list.split(',').nth(ownership::MAX_ABORTED).is_some() {
                return bad("aborted: too many epochs");
            }
            list.split(',').map(epoch).collect()
        }
        None => bad(format!("aborted line {:?}", line.get(..80).unwrap_or(line))),
    }
}

fn decode_owner(fields: &[&str]) -> Result<Op, CodecError> {
    let op = match fields {
        ["set", e, h] => OwnershipOp::SetOwner {
            host: host(h)?,
            epoch: epoch(e)?,
        },
        ["clear", e, h] => OwnershipOp::ClearOwner {
            host: host(h)?,
            epoch: epoch(e)?,
        },
        ["prepare", e, from, to] => OwnershipOp::Prepare {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        },
        ["fence", e, from] => OwnershipOp::Fence {
            from: host(from)?,
            epoch: epoch(e)?,
        },
        ["commit", e, from, to] => OwnershipOp::Commit {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        },
        ["switch", e, from, to] => OwnershipOp::Switch {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        },
        ["abort", e, from, to] => OwnershipOp::Abort {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        },
        ["unfence", e, from, to] => OwnershipOp::Unfence {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        },
        ["failover", e, from, to] => OwnershipOp::Failover {
            from: host(from)?,
            to: host(to)?,
            epoch: epoch(e)?,
        },
        _ => return bad("op owner: unknown step or fields"),
    };
    Ok(Op::Ownership(op))
}

fn decode_op(line: &str) -> Result<Op, CodecError> {
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["op", "owner", rest @ ..] => decode_owner(rest),
        ["op", "gone", g] => Ok(Op::GatewayGone {
            gateway: GatewayId(
                g.parse()
                    .or_else(|_| bad(format!("op gone: gateway {g:?}")))?,
            ),
        }),
        ["op", "prout", rtpi, isid, sa, scope, ty, param, name] => {
            let num = |what: &str, v: &str| -> Result<u8, CodecError> {
                v.parse()
                    .or_else(|_| bad(format!("op prout: {what} {v:?}")))
            };
            let rtpi: u16 = rtpi
                .parse()
                .ok()
                .filter(|&r| r != 0)
                .map_or_else(|| bad(format!("op prout: rtpi {rtpi:?}")), Ok)?;
            let isid: [u8; 6] = unhex(isid)
                .and_then(|v| v.try_into().ok())
                .map_or_else(|| bad(format!("op prout: ISID {isid:?}")), Ok)?;
            if param.len() > 2 * MAX_PARAM {
                return bad("op prout: parameter list too long");
            }
            let param = match *param {
                "-" => Vec::new(),
                p => unhex(p).map_or_else(|| bad("op prout: parameter list is not hex"), Ok)?,
            };
            let valid = !name.is_empty()
                && name.len() <= MAX_NAME_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase());
            if !valid {
                return bad(format!("op prout: initiator name {name:?}"));
            }
            let (service_action, scope, ty) =
                (num("SA", sa)?, num("scope", scope)?, num("type", ty)?);
            if service_action > 0x1f || scope > 0x0f || ty > 0x0f {
                return bad("op prout: CDB field out of range");
            }
            Ok(Op::Prout {
                it: ItNexus {
                    initiator: InitiatorPort::new(name, isid),
                    rtpi,
                },
                service_action,
                scope,
                ty,
                param,
            })
        }
        _ => bad(format!("op line {:?}", line.get(..80).unwrap_or(line))),
    }
}

/// An `applied/<gw>` or `drained/<gw>` value: the revision in decimal.
pub fn encode_revision(r: Revision) -> Vec<u8> {
    r.to_string().into_bytes()
}

/// Parse [`encode_revision`]'s form.
pub fn decode_revision(bytes: &[u8]) -> Result<Revision, CodecError> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|s| (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .map_or_else(|| bad("acknowledgement is not a decimal revision"), Ok)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::op::param_list;
    use ironlun_scsi::pr::{sa, PrContext, PrState};

    fn nexus(name: &str, isid_low: u8, rtpi: u16) -> ItNexus {
        ItNexus {
            initiator: InitiatorPort::new(name, [0x40, 0, 1, 0, 0, isid_low]),
            rtpi,
        }
    }

    const CTX: PrContext<'static> = PrContext {
        relative_ports: &[1, 2, 3],
        ptpl_capable: true,
    };

    /// A record after REGISTER ×2 and RESERVE, committed by gateway 2.
    fn sample() -> Record {
        let mut state = PrState::default();
        let mut last = None;
        for (it, sa, ty, rk, sark) in [
            (nexus("iqn.test:h1", 1, 1), sa::REGISTER, 0, 0, 0x11),
            (nexus("iqn.test:h2", 2, 3), sa::REGISTER, 0, 0, 0x22),
            (nexus("iqn.test:h1", 1, 1), sa::RESERVE, 5, 0x11, 0),
        ] {
            let op = Op::Prout {
                it,
                service_action: sa,
                scope: 0,
                ty,
                param: param_list(rk, sark, 0),
            };
            op.apply(&mut state, CTX).unwrap();
            last = Some(op);
        }
        Record {
            state,
            op: last.unwrap(),
            id: OpId {
                gateway: GatewayId(2),
                seq: 7,
            },
        }
    }

    #[test]
    fn records_round_trip_exactly() {
        let rec = sample();
        let bytes = encode_record(&rec, "serial-1");
        assert_eq!(decode_record(&bytes, "serial-1").unwrap(), rec);
        let gone = Record {
            op: Op::GatewayGone {
                gateway: GatewayId(3),
            },
            ..sample()
        };
        assert_eq!(
            decode_record(&encode_record(&gone, "s"), "s").unwrap(),
            gone
        );
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("ironlun-cluster-record 2\nid 2 7\nop prout 1 400001000001 1 0 5 "),
            "{text}"
        );
    }

    #[test]
    fn ownership_steps_and_handover_state_round_trip() {
        let own = |h: &str| ironlun_scsi::pr::ownership::host_name(h).unwrap();
        let (s, d) = (own("iqn.test:src"), own("iqn.test:dst"));
        let mut state = PrState::default();
        let steps = [
            OwnershipOp::SetOwner {
                host: s.clone(),
                epoch: 1,
            },
            OwnershipOp::Prepare {
                from: s.clone(),
                to: d.clone(),
                epoch: 2,
            },
            OwnershipOp::Abort {
                from: s.clone(),
                to: d.clone(),
                epoch: 2,
            },
            OwnershipOp::Prepare {
                from: s.clone(),
                to: d.clone(),
                epoch: 3,
            },
            OwnershipOp::Fence {
                from: s.clone(),
                epoch: 3,
            },
            OwnershipOp::Commit {
                from: s.clone(),
                to: d.clone(),
                epoch: 3,
            },
            OwnershipOp::Prepare {
                from: d.clone(),
                to: s.clone(),
                epoch: 4,
            },
            OwnershipOp::Switch {
                from: d.clone(),
                to: s.clone(),
                epoch: 4,
            },
            OwnershipOp::Failover {
                from: s.clone(),
                to: d.clone(),
                epoch: 5,
            },
            OwnershipOp::ClearOwner {
                host: d.clone(),
                epoch: 6,
            },
        ];
        for (i, step) in steps.into_iter().enumerate() {
            let op = Op::Ownership(step);
            op.apply(&mut state, CTX).unwrap();
            let rec = Record {
                state: state.clone(),
                op,
                id: OpId {
                    gateway: GatewayId(1),
                    seq: i as u64,
                },
            };
            let text = encode_record(&rec, "s");
            assert_eq!(decode_record(&text, "s").unwrap(), rec, "step {i}");
            if i == 4 {
                let t = String::from_utf8(text).unwrap();
                assert!(
                    t.contains("op owner fence 3 iqn.test:src\nhandover fenced 3 iqn.test:src iqn.test:dst\naborted 2\n"),
                    "{t}"
                );
                for (from, to) in [
                    ("fence 3 iqn", "fence x iqn"),
                    ("fenced 3 iqn.test:src", "fenced 3 IQN.test:src"),
                    ("aborted 2", "aborted 2,,"),
                ] {
                    let bent = t.replacen(from, to, 1);
                    assert!(
                        decode_record(bent.as_bytes(), "s").is_err(),
                        "{from} -> {to}"
                    );
                }
            }
        }
        assert_eq!(state.owner(), None);
        assert_eq!(state.epoch(), 6);
        assert!(
            state.aborted_epochs().is_empty(),
            "epoch 4 made epoch 2 stale"
        );
    }

    #[test]
    fn replayed_and_decoded_states_are_equal() {
        // A replica that replays the op from the previous state holds what a joiner decodes.
        let rec = sample();
        let decoded = decode_record(&encode_record(&rec, "s"), "s").unwrap();
        let mut before = PrState::default();
        for (it, sa, sark) in [
            (nexus("iqn.test:h1", 1, 1), sa::REGISTER, 0x11),
            (nexus("iqn.test:h2", 2, 3), sa::REGISTER, 0x22),
        ] {
            let op = Op::Prout {
                it,
                service_action: sa,
                scope: 0,
                ty: 0,
                param: param_list(0, sark, 0),
            };
            op.apply(&mut before, CTX).unwrap();
        }
        decoded.op.apply(&mut before, CTX).unwrap();
        assert_eq!(before, decoded.state);
    }

    #[test]
    fn refuses_what_it_did_not_write() {
        let good = encode_record(&sample(), "s");
        assert!(
            decode_record(&good, "other").is_err(),
            "another LU's record"
        );
        let text = String::from_utf8(good.clone()).unwrap();
        for (from, to) in [
            ("ironlun-cluster-record 2", "ironlun-cluster-record 1"),
            ("handover idle", "handover busy"),
            ("aborted -", "aborted x"),
            ("id 2 7", "id x 7"),
            ("op prout 1 ", "op prout 0 "),
            ("op prout 1 400001000001", "op prout 1 4000"),
            ("iqn.test:h1", "IQN.test:h1"),
            ("op prout 1 400001000001", "op prout 1 +00001000001"),
            ("op prout", "op unknown"),
        ] {
            assert!(text.contains(from), "{from}");
            let bent = text.replacen(from, to, 1);
            assert!(
                decode_record(bent.as_bytes(), "s").is_err(),
                "{from} -> {to}"
            );
        }
        let mut flipped = good.clone();
        let at = flipped.len() - 20;
        flipped[at] ^= 1;
        assert!(decode_record(&flipped, "s").is_err(), "state checksum");
        for cut in [0, 10, 30, good.len() - 1] {
            assert!(decode_record(&good[..cut], "s").is_err(), "cut at {cut}");
        }
        assert!(decode_record(&vec![b'a'; MAX_RECORD + 1], "s").is_err());
    }

    #[test]
    fn acknowledgements_are_decimal_revisions() {
        assert_eq!(decode_revision(&encode_revision(1234)).unwrap(), 1234);
        for bad in [&b""[..], b"-1", b"12a", b"999999999999999999999", b" 1"] {
            assert!(decode_revision(bad).is_err(), "{bad:?}");
        }
    }
}
