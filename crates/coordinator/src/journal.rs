//! The coordinator's write-ahead journal (semantics.md §3.2 guarantee 6, §3.3 step 3).
//!
//! Append-only, one record per line, each line self-checking:
//!
//! ```text
//! v1 <epoch> <step> <phase> <time µs> <crc32c of everything before the last space, 8 hex>\n
//! ```
//!
//! The driver appends every [`crate::handover::Action::WriteJournal`] record durably (write,
//! fsync) before it executes the next action, so a `started` record always precedes the effect
//! it announces. [`parse`] reads a journal back: a bad *last* line is a torn append and is
//! ignored (the driver truncates the file to [`Parsed::valid_len`] before appending again); a bad
//! line before it is corruption and an error. [`replay`] turns the records into the [`Recovery`]
//! a restarted coordinator starts from ([`crate::handover::Handover::recover`]).

use crate::{Phase, Step, Time};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The record format version written by this crate.
pub const VERSION: &str = "v1";
/// Longest journal accepted by [`parse`]; a handover writes a few dozen lines.
pub const MAX_JOURNAL_BYTES: usize = 1 << 20;
/// Longest line accepted (the longest valid v1 line is 74 bytes plus the newline).
pub const MAX_LINE: usize = 128;

/// One journal record: `step` reached `phase` at `time`, for the ownership epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The handover's epoch (the hand-back's records carry epoch + 1).
    pub epoch: u64,
    pub step: Step,
    pub phase: Phase,
    pub time: Time,
}

impl Record {
    /// The record as one journal line, newline included.
    pub fn encode(&self) -> String {
        let mut line = format!(
            "{VERSION} {} {} {} {}",
            self.epoch,
            self.step.name(),
            self.phase.name(),
            self.time.as_micros()
        );
        let crc = crc32c::crc32c(line.as_bytes());
        // Writing to a String cannot fail.
        let _ = writeln!(line, " {crc:08x}");
        line
    }

    /// Decodes one line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Record, LineError> {
        if line.len() > MAX_LINE {
            return Err(LineError::TooLong);
        }
        let line = std::str::from_utf8(line).map_err(|_| LineError::NotText)?;
        let (body, crc) = line.rsplit_once(' ').ok_or(LineError::Fields)?;
        let crc = parse_hex32(crc).ok_or(LineError::Checksum)?;
        if crc32c::crc32c(body.as_bytes()) != crc {
            return Err(LineError::Checksum);
        }
        let mut fields = body.split(' ');
        let version = fields.next().ok_or(LineError::Fields)?;
        if version != VERSION {
            return Err(LineError::Version);
        }
        let epoch = fields.next().and_then(parse_dec).ok_or(LineError::Fields)?;
        let step = fields
            .next()
            .and_then(Step::from_name)
            .ok_or(LineError::Fields)?;
        let phase = fields
            .next()
            .and_then(Phase::from_name)
            .ok_or(LineError::Fields)?;
        let time = fields.next().and_then(parse_dec).ok_or(LineError::Fields)?;
        if fields.next().is_some() {
            return Err(LineError::Fields);
        }
        Ok(Record {
            epoch,
            step,
            phase,
            time: Time::from_micros(time),
        })
    }
}

/// A decimal `u64`: digits only, no sign, no leading zero (except `0`).
fn parse_dec(s: &str) -> Option<u64> {
    let canonical = !s.is_empty()
        && s.len() <= 20
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// Exactly eight lower-case hex digits.
fn parse_hex32(s: &str) -> Option<u32> {
    let canonical = s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if canonical {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

/// Why one line does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("line is not UTF-8")]
    NotText,
    #[error("checksum mismatch")]
    Checksum,
    #[error("unsupported record version")]
    Version,
    #[error("malformed fields")]
    Fields,
}

/// Why a journal cannot be used. A journal in error needs an operator: the coordinator must not
/// guess the LU's state from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("journal is {len} bytes, more than {MAX_JOURNAL_BYTES}")]
    TooLarge { len: usize },
    /// A line other than the last one does not decode (`line` counts from 1).
    #[error("journal line {line}: {error}")]
    Corrupt { line: usize, error: LineError },
    /// The records decode but cannot come from one handover.
    #[error("journal record {record}: {why}")]
    Inconsistent { record: usize, why: &'static str },
}

/// A parsed journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub records: Vec<Record>,
    /// Length of the intact prefix; the driver truncates the file to it before appending.
    pub valid_len: usize,
    /// Whether a torn last line was dropped.
    pub torn: bool,
}

/// Reads a journal. The last line is torn when it lacks its newline or does not decode; it is
/// dropped. Any other line that does not decode is [`JournalError::Corrupt`].
pub fn parse(bytes: &[u8]) -> Result<Parsed, JournalError> {
    if bytes.len() > MAX_JOURNAL_BYTES {
        return Err(JournalError::TooLarge { len: bytes.len() });
    }
    let mut records = Vec::new();
    let mut valid_len = 0usize;
    let mut rest = bytes;
    let mut line_no = 0usize;
    while !rest.is_empty() {
        line_no = line_no.saturating_add(1);
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            // No newline: the append was cut short.
            return Ok(Parsed {
                records,
                valid_len,
                torn: true,
            });
        };
        let (line, tail) = rest.split_at(nl);
        let tail = tail.get(1..).unwrap_or_default();
        match Record::decode(line) {
            Ok(r) => {
                records.push(r);
                valid_len = valid_len.saturating_add(nl).saturating_add(1);
            }
            Err(_) if tail.is_empty() => {
                return Ok(Parsed {
                    records,
                    valid_len,
                    torn: true,
                })
            }
            Err(error) => {
                return Err(JournalError::Corrupt {
                    line: line_no,
                    error,
                })
            }
        }
        rest = tail;
    }
    Ok(Parsed {
        records,
        valid_len,
        torn: false,
    })
}

/// Where a restarted coordinator continues (semantics.md §3.4), decided by [`replay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeAt {
    /// Nothing was journaled: start the handover from the beginning.
    Fresh,
    /// Killed before the commit was begun: S still owns L. Abort on the target, then run the
    /// rollback hook (the source may be paused).
    AbortThenRollback,
    /// Killed with a commit begun but not known to be done: query the target and decide
    /// (never retry blindly, §3.4 row 2).
    QueryCommit,
    /// The commit is done: (re)run the resume hook on the destination.
    Resume,
    /// The destination runs the guest: run the announce hook.
    Announce,
    /// A hand-back was begun but not known to be done: query the target and decide.
    QueryHandBack,
    /// S owns L again (the abort or the hand-back is done): (re)run the rollback hook.
    Rollback,
    /// The journal is closed: nothing to do. `migrated` tells which way it ended.
    Finished { migrated: bool },
}

/// What [`replay`] learned from a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// The handover's epoch; `None` for an empty journal.
    pub epoch: Option<u64>,
    pub resume_at: ResumeAt,
    /// Whether the pause hook was ever begun (the source may be paused).
    pub pause_started: bool,
    /// Whether a commit was ever begun (only an abort confirmed by the target, or a hand-back,
    /// makes the source the owner again).
    pub commit_started: bool,
    /// Whether a hand-back was ever begun.
    pub handback_started: bool,
    /// Whether an abort was ever begun (then no commit of the epoch may be sent again).
    pub abort_started: bool,
}

/// Decides how a coordinator killed after the last of `records` resumes.
///
/// Checks that the records come from one handover: one epoch (epoch + 1 for the hand-back), every
/// `done`/`failed` after a `started` of its step, nothing after the closing `handover` record.
pub fn replay(records: &[Record]) -> Result<Recovery, JournalError> {
    let Some(first) = records.first() else {
        return Ok(Recovery {
            epoch: None,
            resume_at: ResumeAt::Fresh,
            pause_started: false,
            commit_started: false,
            handback_started: false,
            abort_started: false,
        });
    };
    let epoch = first.epoch;
    let mut last: BTreeMap<Step, Phase> = BTreeMap::new();
    let mut closed: Option<bool> = None;
    for (i, r) in records.iter().enumerate() {
        let record = i.saturating_add(1);
        let inconsistent = |why| JournalError::Inconsistent { record, why };
        if closed.is_some() {
            return Err(inconsistent("record after the closing record"));
        }
        let expected = if r.step == Step::HandBack {
            epoch.checked_add(1)
        } else {
            Some(epoch)
        };
        if Some(r.epoch) != expected {
            return Err(inconsistent("epoch differs from the first record"));
        }
        if r.phase != Phase::Started && !last.contains_key(&r.step) && r.step != Step::Handover {
            return Err(inconsistent("step finished before it started"));
        }
        if r.step == Step::Handover {
            match r.phase {
                Phase::Started => return Err(inconsistent("handover record must close")),
                Phase::Done => closed = Some(true),
                Phase::Failed => closed = Some(false),
            }
        }
        last.insert(r.step, r.phase);
    }
    let phase = |s: Step| last.get(&s).copied();
    let started = |s: Step| last.contains_key(&s);
    let done = |s: Step| phase(s) == Some(Phase::Done);
    let resume_at = if let Some(migrated) = closed {
        ResumeAt::Finished { migrated }
    } else if started(Step::HandBack) {
        match (done(Step::HandBack), done(Step::Rollback)) {
            (false, _) => ResumeAt::QueryHandBack,
            (true, false) => ResumeAt::Rollback,
            (true, true) => ResumeAt::Finished { migrated: false },
        }
    } else if done(Step::Commit) {
        // A failed resume is retried: the hook is idempotent and a destination that is really
        // gone fails it again, which leads to the hand-back.
        match (done(Step::Resume), phase(Step::Announce)) {
            (false, _) => ResumeAt::Resume,
            (true, Some(Phase::Done | Phase::Failed)) => ResumeAt::Finished { migrated: true },
            (true, _) => ResumeAt::Announce,
        }
    } else if started(Step::Commit) {
        // Only a confirmed abort settles an unfinished commit (the target refuses to commit an
        // aborted epoch, so a confirmed abort rules out a late commit).
        match (done(Step::Abort), done(Step::Rollback)) {
            (false, _) => ResumeAt::QueryCommit,
            (true, false) => ResumeAt::Rollback,
            (true, true) => ResumeAt::Finished { migrated: false },
        }
    } else {
        match (done(Step::Abort), done(Step::Rollback)) {
            (_, true) => ResumeAt::Finished { migrated: false },
            (true, false) => ResumeAt::Rollback,
            (false, false) => ResumeAt::AbortThenRollback,
        }
    };
    Ok(Recovery {
        epoch: Some(epoch),
        resume_at,
        pause_started: started(Step::Pause),
        commit_started: started(Step::Commit),
        handback_started: started(Step::HandBack),
        abort_started: started(Step::Abort),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn rec(epoch: u64, step: Step, phase: Phase, t: u64) -> Record {
        Record {
            epoch,
            step,
            phase,
            time: Time::from_micros(t),
        }
    }

    fn journal(rs: &[Record]) -> Vec<u8> {
        rs.iter()
            .map(Record::encode)
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn accepts_v1_line() {
        let line = b"v1 7 commit started 1234";
        let crc = crc32c::crc32c(line);
        let full = format!("v1 7 commit started 1234 {crc:08x}");
        assert_eq!(
            Record::decode(full.as_bytes()),
            Ok(rec(7, Step::Commit, Phase::Started, 1234))
        );
        assert_eq!(
            rec(7, Step::Commit, Phase::Started, 1234).encode(),
            format!("{full}\n")
        );
    }

    #[test]
    fn encode_decode_round_trip_every_step_and_phase() {
        for s in Step::ALL {
            for p in [Phase::Started, Phase::Done, Phase::Failed] {
                let r = rec(u64::MAX, s, p, u64::MAX);
                let line = r.encode();
                assert!(line.len() <= MAX_LINE);
                assert_eq!(Record::decode(line.trim_end().as_bytes()), Ok(r));
            }
        }
    }

    fn with_crc(body: &str) -> Vec<u8> {
        format!("{body} {:08x}", crc32c::crc32c(body.as_bytes())).into_bytes()
    }

    #[test]
    fn rejects_bad_lines() {
        let table: &[(&[u8], LineError)] = &[
            (b"", LineError::Fields),
            (b"v1 7 commit started 1234 00000000", LineError::Checksum),
            (b"v1 7 commit started 1234 ABCDEF01", LineError::Checksum),
            (b"\xff\xfe", LineError::NotText),
            (&[b'a'; MAX_LINE + 1], LineError::TooLong),
        ];
        for (line, err) in table {
            assert_eq!(Record::decode(line), Err(*err), "{line:?}");
        }
        let checked: &[(&str, LineError)] = &[
            ("v2 7 commit started 1234", LineError::Version),
            ("v1 7 commit started", LineError::Fields),
            ("v1 7 commit started 12 3", LineError::Fields),
            ("v1 +7 commit started 1234", LineError::Fields),
            ("v1 07 commit started 1234", LineError::Fields),
            ("v1 7 Commit started 1234", LineError::Fields),
            ("v1 7 commit begun 1234", LineError::Fields),
            (
                "v1 18446744073709551616 commit started 1",
                LineError::Fields,
            ),
            ("v1  7 commit started 1234", LineError::Fields),
        ];
        for (body, err) in checked {
            assert_eq!(Record::decode(&with_crc(body)), Err(*err), "{body}");
        }
    }

    #[test]
    fn torn_last_line_is_ignored() {
        let rs = [
            rec(3, Step::Prepare, Phase::Started, 1),
            rec(3, Step::Prepare, Phase::Done, 2),
        ];
        let full = journal(&rs);
        let first_len = rs[0].encode().len();
        for cut in 0..=full.len() {
            let p = parse(&full[..cut]).unwrap();
            let whole = if cut >= full.len() {
                2
            } else if cut >= first_len {
                1
            } else {
                0
            };
            assert_eq!(p.records, rs[..whole].to_vec(), "cut {cut}");
            assert_eq!(p.torn, cut != full.len() && cut != first_len && cut != 0);
            assert_eq!(p.valid_len, [0, first_len, full.len()][whole]);
        }
        // A garbage last line with its newline (zeros after a crash) is torn too.
        let mut garbage = full.clone();
        garbage.extend_from_slice(b"\0\0\0\n");
        let p = parse(&garbage).unwrap();
        assert_eq!(
            (p.records.len(), p.torn, p.valid_len),
            (2, true, full.len())
        );
    }

    #[test]
    fn rejects_corrupt_middle_line() {
        let rs = [
            rec(3, Step::Prepare, Phase::Started, 1),
            rec(3, Step::Prepare, Phase::Done, 2),
            rec(3, Step::PreCopy, Phase::Started, 3),
        ];
        let mut bytes = journal(&rs);
        let at = rs[0].encode().len() + 3;
        bytes[at] ^= 0x01;
        assert!(matches!(
            parse(&bytes),
            Err(JournalError::Corrupt { line: 2, .. })
        ));
    }

    #[test]
    fn rejects_oversized_journal() {
        let bytes = vec![b'\n'; MAX_JOURNAL_BYTES + 1];
        assert_eq!(
            parse(&bytes),
            Err(JournalError::TooLarge {
                len: MAX_JOURNAL_BYTES + 1
            })
        );
    }

    #[test]
    fn rejects_inconsistent_records() {
        let table: &[(&[Record], usize)] = &[
            (
                &[
                    rec(3, Step::Prepare, Phase::Started, 1),
                    rec(4, Step::Prepare, Phase::Done, 2),
                ],
                2,
            ),
            (&[rec(3, Step::Commit, Phase::Done, 1)], 1),
            (&[rec(3, Step::Handover, Phase::Started, 1)], 1),
            (
                &[
                    rec(3, Step::Prepare, Phase::Started, 1),
                    rec(3, Step::HandBack, Phase::Started, 2),
                ],
                2,
            ),
            (
                &[
                    rec(3, Step::Prepare, Phase::Started, 1),
                    rec(3, Step::Handover, Phase::Failed, 2),
                    rec(3, Step::Rollback, Phase::Started, 3),
                ],
                3,
            ),
        ];
        for (rs, at) in table {
            assert!(
                matches!(replay(rs), Err(JournalError::Inconsistent { record, .. }) if record == *at),
                "{rs:?}"
            );
        }
    }

    /// The decision table of `replay`, one row per kill point class (semantics.md §3.4).
    #[test]
    fn replay_decisions() {
        use Phase::*;
        use Step::*;
        let e = 5;
        let table: &[(&[(Step, Phase)], ResumeAt)] = &[
            (&[], ResumeAt::Fresh),
            (&[(Prepare, Started)], ResumeAt::AbortThenRollback),
            (
                &[(Prepare, Started), (Prepare, Done), (PreCopy, Started)],
                ResumeAt::AbortThenRollback,
            ),
            (
                &[(Pause, Started), (Pause, Done)],
                ResumeAt::AbortThenRollback,
            ),
            (
                &[
                    (Pause, Started),
                    (Pause, Failed),
                    (Abort, Started),
                    (Abort, Done),
                ],
                ResumeAt::Rollback,
            ),
            (
                &[
                    (Pause, Started),
                    (Abort, Started),
                    (Abort, Failed),
                    (Rollback, Started),
                ],
                ResumeAt::AbortThenRollback,
            ),
            (
                &[
                    (Abort, Started),
                    (Abort, Done),
                    (Rollback, Started),
                    (Rollback, Done),
                ],
                ResumeAt::Finished { migrated: false },
            ),
            (&[(Commit, Started)], ResumeAt::QueryCommit),
            (
                &[(Commit, Started), (Commit, Failed)],
                ResumeAt::QueryCommit,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Failed),
                    (Query, Started),
                    (Query, Done),
                ],
                ResumeAt::QueryCommit,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Failed),
                    (Abort, Started),
                    (Abort, Failed),
                ],
                ResumeAt::QueryCommit,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Failed),
                    (Abort, Started),
                    (Abort, Done),
                ],
                ResumeAt::Rollback,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Failed),
                    (Abort, Started),
                    (Abort, Failed),
                    (Commit, Done),
                ],
                ResumeAt::Resume,
            ),
            (&[(Commit, Started), (Commit, Done)], ResumeAt::Resume),
            (
                &[(Commit, Started), (Commit, Done), (Resume, Started)],
                ResumeAt::Resume,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (Resume, Started),
                    (Resume, Failed),
                ],
                ResumeAt::Resume,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (Resume, Started),
                    (Resume, Done),
                ],
                ResumeAt::Announce,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (Resume, Started),
                    (Resume, Done),
                    (Announce, Started),
                ],
                ResumeAt::Announce,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (Resume, Started),
                    (Resume, Done),
                    (Announce, Started),
                    (Announce, Failed),
                ],
                ResumeAt::Finished { migrated: true },
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (Resume, Started),
                    (Resume, Failed),
                    (HandBack, Started),
                ],
                ResumeAt::QueryHandBack,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (HandBack, Started),
                    (HandBack, Failed),
                ],
                ResumeAt::QueryHandBack,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (HandBack, Started),
                    (HandBack, Done),
                ],
                ResumeAt::Rollback,
            ),
            (
                &[
                    (Commit, Started),
                    (Commit, Done),
                    (HandBack, Started),
                    (HandBack, Done),
                    (Rollback, Started),
                    (Rollback, Done),
                ],
                ResumeAt::Finished { migrated: false },
            ),
            (
                &[(Prepare, Started), (Handover, Done)],
                ResumeAt::Finished { migrated: true },
            ),
            (
                &[(Prepare, Started), (Handover, Failed)],
                ResumeAt::Finished { migrated: false },
            ),
        ];
        for (steps, want) in table {
            let rs: Vec<Record> = steps
                .iter()
                .enumerate()
                .map(|(i, &(s, p))| {
                    let ep = if s == HandBack { e + 1 } else { e };
                    rec(ep, s, p, i as u64)
                })
                .collect();
            let got = replay(&rs).unwrap();
            assert_eq!(got.resume_at, *want, "{steps:?}");
            assert_eq!(got.epoch, if rs.is_empty() { None } else { Some(e) });
            assert_eq!(got.commit_started, steps.iter().any(|&(s, _)| s == Commit));
            assert_eq!(got.pause_started, steps.iter().any(|&(s, _)| s == Pause));
        }
    }
}
