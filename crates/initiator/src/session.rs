//! A logged-in session in full feature phase (RFC 7143 §3.2–§3.5): several tasks in flight,
//! a background reader dispatching target PDUs by Initiator Task Tag.
//!
//! Sequence numbers (§4.2.2): non-immediate commands take the next CmdSN and wait while it is
//! beyond the MaxCmdSN the target granted; immediate PDUs (NOP, TMF, Logout) carry the current
//! CmdSN without taking it. ExpStatSN follows every StatSN the target reports.

use crate::error::{Error, Result};
use crate::login;
use crate::options::{LoginOptions, Negotiated};
use crate::scsi::{self, Capacity, CommandResult, Residual};
use crate::seq::{sn_lte, sn_max};
use crate::transport::{write_pieces, PduReader};
use bytes::{Bytes, BytesMut};
use ironlun_iscsi::framer::{encode_pdu, Digests};
use ironlun_iscsi::limits::Limits;
use ironlun_iscsi::pdu::{
    Ahs, DataOut, Header, LogoutReason, LogoutRequest, NopOut, ScsiCommand, TaskAttr,
    TaskMgmtRequest, TextRequest, TmfFunction, TmfResponse, RESERVED_TAG,
};
use ironlun_iscsi::{text, Pdu};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// Largest CDB we send: 16 header bytes plus an extended-CDB AHS (§11.2.2.3).
const MAX_CDB: usize = 260;
/// Bound on a Text answer across continuations.
const MAX_TEXT_ANSWER: usize = 1024 * 1024;

/// Framer limits for what the target may send us: our declared MRDSL, never below the login
/// default (login answers may use up to 8192 bytes).
pub(crate) fn receive_limits(opts: &LoginOptions) -> Limits {
    Limits {
        max_data_segment: opts.max_recv_data_segment_length.max(login::DEFAULT_MRDSL),
        ..Limits::default()
    }
}

/// Open a TCP connection to `addr` within `opts.timeout`.
pub(crate) async fn tcp_connect(
    addr: impl ToSocketAddrs,
    opts: &LoginOptions,
) -> Result<TcpStream> {
    let stream = tokio::time::timeout(opts.timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout)??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One task waiting for target PDUs.
struct Task {
    tx: mpsc::UnboundedSender<Pdu>,
    cmd_sn: u32,
}

/// Mutable session state; the lock is never held across `.await`.
struct State {
    next_itt: u32,
    cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    tasks: HashMap<u32, Task>,
    closed: bool,
}

struct Inner {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    state: Mutex<State>,
    /// Woken when MaxCmdSN moves or the connection closes.
    window: Notify,
    negotiated: Negotiated,
    digests: Digests,
    reader_task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut t) = self.reader_task.lock() {
            if let Some(t) = t.take() {
                t.abort();
            }
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another task panicked mid-update; the state is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How a PDU being sent uses CmdSN (§4.2.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnUse {
    /// Non-immediate command: takes the next CmdSN, waits for the window.
    Command,
    /// Immediate: carries the current CmdSN, does not take it.
    Immediate,
    /// Not a command (Data-Out, NOP-Out answering a target ping).
    None,
}

/// A logged-in iSCSI session over one connection. Cheap to clone; all clones share the session.
/// The reader task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("negotiated", &self.inner.negotiated)
            .finish_non_exhaustive()
    }
}

/// Removes a task from the dispatch table when its waiter goes away.
struct TaskGuard {
    inner: Arc<Inner>,
    itt: u32,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.inner.state().tasks.remove(&self.itt);
    }
}

/// A SCSI command sent and not yet answered. Dropping it forgets the task (later PDUs for its
/// ITT are discarded). R2Ts are served only while [`PendingCommand::wait`] runs.
pub struct PendingCommand {
    session: Session,
    guard: TaskGuard,
    rx: mpsc::UnboundedReceiver<Pdu>,
    cmd_sn: u32,
    lun: u64,
    data_out: Bytes,
    expected_in: u32,
}

impl std::fmt::Debug for PendingCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCommand")
            .field("itt", &self.guard.itt)
            .field("cmd_sn", &self.cmd_sn)
            .finish()
    }
}

impl Session {
    /// TCP connect and log in (RFC 7143 §6). Status ≠ 0 is [`Error::LoginFailed`].
    pub async fn connect(addr: impl ToSocketAddrs, opts: LoginOptions) -> Result<Session> {
        let stream = tcp_connect(addr, &opts).await?;
        let (rd, mut wr) = stream.into_split();
        let mut reader = PduReader::new(rd, receive_limits(&opts));
        let negotiated = login::login(&mut reader, &mut wr, &opts).await?;
        Ok(Session::start(reader, wr, negotiated))
    }

    /// Take over a connection that just completed login (the reader keeps any bytes it holds).
    pub(crate) fn start(
        mut reader: PduReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
        negotiated: Negotiated,
    ) -> Session {
        let digests = Digests {
            header: negotiated.header_digest,
            data: negotiated.data_digest,
        };
        reader.framer.digests = digests;
        let state = State {
            next_itt: negotiated.next_itt,
            cmd_sn: negotiated.cmd_sn,
            max_cmd_sn: negotiated.max_cmd_sn,
            exp_stat_sn: negotiated.exp_stat_sn,
            tasks: HashMap::new(),
            closed: false,
        };
        let inner = Arc::new(Inner {
            writer: tokio::sync::Mutex::new(writer),
            state: Mutex::new(state),
            window: Notify::new(),
            negotiated,
            digests,
            reader_task: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let handle = tokio::spawn(reader_loop(reader, weak));
        if let Ok(mut slot) = inner.reader_task.lock() {
            *slot = Some(handle);
        }
        Session { inner }
    }

    /// What login agreed.
    pub fn negotiated(&self) -> &Negotiated {
        &self.inner.negotiated
    }

    /// Whether the connection is known to be gone.
    pub fn is_closed(&self) -> bool {
        self.inner.state().closed
    }

    /// How many commands the target's CmdSN window admits now (RFC 7143 §4.2.2.1):
    /// MaxCmdSN − CmdSN + 1 as of the last PDU received, 0 when closed.
    pub fn window(&self) -> u32 {
        let st = self.inner.state();
        if sn_lte(st.cmd_sn, st.max_cmd_sn) {
            st.max_cmd_sn.wrapping_sub(st.cmd_sn).wrapping_add(1)
        } else {
            0
        }
    }

    /// Register a new task and return its ITT, guard and receiver.
    fn register(&self) -> Result<(TaskGuard, mpsc::UnboundedReceiver<Pdu>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.inner.state();
        if st.closed {
            return Err(Error::Closed);
        }
        let mut itt = st.next_itt;
        while itt == RESERVED_TAG || itt == login::LOGIN_ITT || st.tasks.contains_key(&itt) {
            itt = itt.wrapping_add(1);
        }
        st.next_itt = itt.wrapping_add(1);
        let cmd_sn = st.cmd_sn;
        st.tasks.insert(itt, Task { tx, cmd_sn });
        Ok((
            TaskGuard {
                inner: self.inner.clone(),
                itt,
            },
            rx,
        ))
    }

    /// Send the PDUs `build(cmd_sn, exp_stat_sn)` returns, in order, as one unit. Returns the
    /// CmdSN used. `itt` (if any) records that CmdSN for a later ABORT TASK's RefCmdSN.
    async fn send(
        &self,
        sn: SnUse,
        itt: Option<u32>,
        build: impl FnOnce(u32, u32) -> Vec<Pdu>,
    ) -> Result<u32> {
        loop {
            let notified = self.inner.window.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut writer = self.inner.writer.lock().await;
            let numbers = {
                let mut st = self.inner.state();
                if st.closed {
                    return Err(Error::Closed);
                }
                let cmd_sn = st.cmd_sn;
                if sn == SnUse::Command && !sn_lte(cmd_sn, st.max_cmd_sn) {
                    None
                } else {
                    if sn == SnUse::Command {
                        st.cmd_sn = cmd_sn.wrapping_add(1);
                    }
                    if let Some(task) = itt.and_then(|i| st.tasks.get_mut(&i)) {
                        task.cmd_sn = cmd_sn;
                    }
                    Some((cmd_sn, st.exp_stat_sn))
                }
            };
            let Some((cmd_sn, exp_stat_sn)) = numbers else {
                // Window closed (§4.2.2.1): wait for a MaxCmdSN update, without the writer.
                drop(writer);
                notified.await;
                continue;
            };
            let pdus = build(cmd_sn, exp_stat_sn);
            let mut pieces = Vec::new();
            for pdu in &pdus {
                pieces.extend(encode_pdu(pdu, self.inner.digests));
            }
            if let Err(e) = write_pieces(&mut *writer, &pieces).await {
                self.inner.state().closed = true;
                self.inner.window.notify_waiters();
                return Err(e);
            }
            return Ok(cmd_sn);
        }
    }

    /// Run one SCSI command to completion (see [`Session::start_command`]).
    pub async fn command(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        expected_in: u32,
    ) -> Result<CommandResult> {
        self.start_command(lun, cdb, data_out, expected_in)
            .await?
            .wait()
            .await
    }

    /// Send a SCSI command (§11.3) with immediate and unsolicited data as negotiated
    /// (ImmediateData, InitialR2T, FirstBurstLength, the target's MaxRecvDataSegmentLength), and
    /// return a handle to wait on. Reads (`expected_in` > 0) and writes (`data_out` non-empty)
    /// are exclusive: bidirectional commands are not supported.
    pub async fn start_command(
        &self,
        lun: u64,
        cdb: &[u8],
        data_out: Bytes,
        expected_in: u32,
    ) -> Result<PendingCommand> {
        if cdb.is_empty() || cdb.len() > MAX_CDB {
            return Err(Error::InvalidArgument("CDB length must be 1..=260"));
        }
        if !data_out.is_empty() && expected_in > 0 {
            return Err(Error::InvalidArgument(
                "bidirectional commands are not supported",
            ));
        }
        let out_len = u32::try_from(data_out.len())
            .map_err(|_| Error::InvalidArgument("data_out over 4 GiB"))?;
        let n = &self.inner.negotiated;
        let mrdsl = usize::try_from(n.target_max_recv_data_segment_length).unwrap_or(usize::MAX);
        let first_burst = usize::try_from(n.first_burst_length).unwrap_or(usize::MAX);
        let imm_len = if n.immediate_data {
            data_out.len().min(first_burst).min(mrdsl)
        } else {
            0
        };
        let unsolicited_end = if n.initial_r2t {
            imm_len
        } else {
            data_out.len().min(first_burst)
        };

        let mut cdb16 = [0u8; 16];
        let (head, ext) = cdb.split_at(cdb.len().min(16));
        if let Some(dst) = cdb16.get_mut(..head.len()) {
            dst.copy_from_slice(head);
        }
        let ahs = if ext.is_empty() {
            Vec::new()
        } else {
            vec![Ahs::ExtendedCdb(Bytes::copy_from_slice(ext))]
        };

        let (guard, rx) = self.register()?;
        let itt = guard.itt;
        let data = data_out.clone();
        let cmd_sn = self
            .send(SnUse::Command, Some(itt), move |cmd_sn, exp_stat_sn| {
                let cmd = ScsiCommand {
                    immediate: false,
                    final_: unsolicited_end <= imm_len,
                    read: expected_in > 0,
                    write: out_len > 0,
                    attr: TaskAttr::Simple,
                    lun,
                    itt,
                    expected_data_transfer_length: if out_len > 0 { out_len } else { expected_in },
                    cmd_sn,
                    exp_stat_sn,
                    cdb: cdb16,
                };
                let mut pdus = vec![Pdu {
                    header: Header::ScsiCommand(cmd),
                    ahs,
                    data: data.slice(..imm_len),
                }];
                let ids = DataOutIds {
                    lun,
                    itt,
                    ttt: RESERVED_TAG,
                    exp_stat_sn,
                };
                pdus.extend(data_out_pdus(ids, &data, imm_len..unsolicited_end, mrdsl));
                pdus
            })
            .await?;
        Ok(PendingCommand {
            session: self.clone(),
            guard,
            rx,
            cmd_sn,
            lun,
            data_out,
            expected_in,
        })
    }

    /// TEST UNIT READY (SPC-4 §6.47).
    pub async fn test_unit_ready(&self, lun: u64) -> Result<CommandResult> {
        self.command(lun, &scsi::test_unit_ready_cdb(), Bytes::new(), 0)
            .await
    }

    /// Standard INQUIRY data (SPC-4 §6.6), up to `alloc` bytes.
    pub async fn inquiry(&self, lun: u64, alloc: u16) -> Result<CommandResult> {
        self.command(
            lun,
            &scsi::inquiry_cdb(None, alloc),
            Bytes::new(),
            u32::from(alloc),
        )
        .await
    }

    /// INQUIRY of VPD page `page`.
    pub async fn inquiry_vpd(&self, lun: u64, page: u8, alloc: u16) -> Result<CommandResult> {
        self.command(
            lun,
            &scsi::inquiry_cdb(Some(page), alloc),
            Bytes::new(),
            u32::from(alloc),
        )
        .await
    }

    /// READ CAPACITY (16) (SBC-3 §5.16). A status other than GOOD is [`Error::Status`].
    pub async fn read_capacity16(&self, lun: u64) -> Result<Capacity> {
        let r = self
            .command(lun, &scsi::read_capacity16_cdb(32), Bytes::new(), 32)
            .await?
            .good()?;
        Capacity::parse(&r.data)
            .ok_or_else(|| Error::Protocol("short READ CAPACITY (16) data".to_owned()))
    }

    /// READ (16) of `blocks` blocks of `block_size` bytes at `lba`.
    pub async fn read16(
        &self,
        lun: u64,
        lba: u64,
        blocks: u32,
        block_size: u32,
    ) -> Result<CommandResult> {
        let len = blocks
            .checked_mul(block_size)
            .ok_or(Error::InvalidArgument("read length over 4 GiB"))?;
        self.command(lun, &scsi::read16_cdb(lba, blocks), Bytes::new(), len)
            .await
    }

    /// WRITE (16) of `data` (a whole number of `block_size` blocks) at `lba`, FUA if asked.
    pub async fn write16(
        &self,
        lun: u64,
        lba: u64,
        block_size: u32,
        data: Bytes,
        fua: bool,
    ) -> Result<CommandResult> {
        let bs = usize::try_from(block_size).map_err(|_| Error::InvalidArgument("block size"))?;
        if data.len().checked_rem(bs) != Some(0) {
            return Err(Error::InvalidArgument(
                "data is not a whole number of blocks",
            ));
        }
        let blocks = u32::try_from(data.len() / bs)
            .map_err(|_| Error::InvalidArgument("too many blocks"))?;
        self.command(lun, &scsi::write16_cdb(lba, blocks, fua), data, 0)
            .await
    }

    /// COMPARE AND WRITE (SBC-3 §5.2) at `lba`: if the blocks there equal `verify`, write
    /// `write` (both the same whole number of `block_size` blocks, at most 255). A miscompare
    /// is CHECK CONDITION with sense key MISCOMPARE in the result, not an error.
    pub async fn compare_and_write(
        &self,
        lun: u64,
        lba: u64,
        block_size: u32,
        verify: &[u8],
        write: &[u8],
        fua: bool,
    ) -> Result<CommandResult> {
        let bs = usize::try_from(block_size).map_err(|_| Error::InvalidArgument("block size"))?;
        if verify.len() != write.len() || verify.len().checked_rem(bs) != Some(0) {
            return Err(Error::InvalidArgument(
                "verify and write data must be the same whole number of blocks",
            ));
        }
        let blocks = u8::try_from(verify.len() / bs)
            .map_err(|_| Error::InvalidArgument("more than 255 blocks"))?;
        let mut data = Vec::with_capacity(verify.len().saturating_mul(2));
        data.extend_from_slice(verify);
        data.extend_from_slice(write);
        self.command(
            lun,
            &scsi::compare_and_write_cdb(lba, blocks, fua),
            Bytes::from(data),
            0,
        )
        .await
    }

    /// SYNCHRONIZE CACHE (16) of the whole medium.
    pub async fn synchronize_cache(&self, lun: u64) -> Result<CommandResult> {
        self.command(lun, &scsi::synchronize_cache16_cdb(0, 0), Bytes::new(), 0)
            .await
    }

    /// NOP-Out ping (§11.18) carrying `ping`; returns the NOP-In's data (which should echo it).
    pub async fn nop(&self, ping: Bytes) -> Result<Bytes> {
        if ping.len()
            > usize::try_from(self.inner.negotiated.target_max_recv_data_segment_length)
                .unwrap_or(usize::MAX)
        {
            return Err(Error::InvalidArgument(
                "ping longer than the target's MaxRecvDataSegmentLength",
            ));
        }
        let (guard, mut rx) = self.register()?;
        let itt = guard.itt;
        self.send(SnUse::Immediate, None, move |cmd_sn, exp_stat_sn| {
            let h = NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: RESERVED_TAG,
                cmd_sn,
                exp_stat_sn,
            };
            vec![Pdu {
                header: Header::NopOut(h),
                ahs: Vec::new(),
                data: ping,
            }]
        })
        .await?;
        let pdu = rx.recv().await.ok_or(Error::Closed)?;
        match pdu.header {
            Header::NopIn(_) => Ok(pdu.data),
            other => Err(unexpected(other, &pdu.data)),
        }
    }

    /// Task management request (§11.5), sent immediate. For ABORT TASK, `referenced_itt` names
    /// the task and its CmdSN becomes RefCmdSN (when we still know it).
    pub async fn task_mgmt(
        &self,
        function: TmfFunction,
        lun: u64,
        referenced_itt: u32,
    ) -> Result<TmfResponse> {
        let ref_cmd_sn = self
            .inner
            .state()
            .tasks
            .get(&referenced_itt)
            .map(|t| t.cmd_sn);
        let (guard, mut rx) = self.register()?;
        let itt = guard.itt;
        self.send(SnUse::Immediate, None, move |cmd_sn, exp_stat_sn| {
            let h = TaskMgmtRequest {
                immediate: true,
                function,
                lun,
                itt,
                referenced_task_tag: if function == TmfFunction::AbortTask {
                    referenced_itt
                } else {
                    RESERVED_TAG
                },
                cmd_sn,
                exp_stat_sn,
                ref_cmd_sn: ref_cmd_sn.unwrap_or(cmd_sn),
                exp_data_sn: 0,
            };
            vec![Pdu {
                header: Header::TaskMgmtRequest(h),
                ahs: Vec::new(),
                data: Bytes::new(),
            }]
        })
        .await?;
        let pdu = rx.recv().await.ok_or(Error::Closed)?;
        match pdu.header {
            Header::TaskMgmtResponse(r) => Ok(r.response),
            other => Err(unexpected(other, &pdu.data)),
        }
    }

    /// Text request/response exchange (§11.10–11.11) with continuation: returns all the
    /// target's pairs. Each request PDU takes a CmdSN.
    pub async fn text(&self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>> {
        let (guard, mut rx) = self.register()?;
        let itt = guard.itt;
        let mut payload = Bytes::from(text::encode(pairs));
        let mut ttt = RESERVED_TAG;
        let mut answer = Vec::new();
        loop {
            let data = std::mem::take(&mut payload);
            self.send(SnUse::Command, Some(itt), move |cmd_sn, exp_stat_sn| {
                let h = TextRequest {
                    immediate: false,
                    final_: true,
                    continue_: false,
                    lun: 0,
                    itt,
                    ttt,
                    cmd_sn,
                    exp_stat_sn,
                };
                vec![Pdu {
                    header: Header::TextRequest(h),
                    ahs: Vec::new(),
                    data,
                }]
            })
            .await?;
            let pdu = rx.recv().await.ok_or(Error::Closed)?;
            let Header::TextResponse(r) = pdu.header else {
                return Err(unexpected(pdu.header, &pdu.data));
            };
            if answer.len().saturating_add(pdu.data.len()) > MAX_TEXT_ANSWER {
                return Err(Error::Protocol("text answer too long".to_owned()));
            }
            answer.extend_from_slice(&pdu.data);
            if r.final_ && !r.continue_ {
                return Ok(text::parse(&answer)?);
            }
            ttt = r.ttt;
        }
    }

    /// Logout (§11.14, reason "close the session"), then close our side of the connection.
    pub async fn logout(&self) -> Result<()> {
        let (guard, mut rx) = self.register()?;
        let itt = guard.itt;
        self.send(SnUse::Immediate, None, move |cmd_sn, exp_stat_sn| {
            let h = LogoutRequest {
                immediate: true,
                reason: LogoutReason::CloseSession,
                itt,
                cid: 0,
                cmd_sn,
                exp_stat_sn,
            };
            vec![Pdu {
                header: Header::LogoutRequest(h),
                ahs: Vec::new(),
                data: Bytes::new(),
            }]
        })
        .await?;
        let pdu = rx.recv().await.ok_or(Error::Closed)?;
        let Header::LogoutResponse(r) = pdu.header else {
            return Err(unexpected(pdu.header, &pdu.data));
        };
        self.inner.state().closed = true;
        self.inner.window.notify_waiters();
        let _ = self.inner.writer.lock().await.shutdown().await;
        if r.response != 0 {
            return Err(Error::LogoutFailed(r.response));
        }
        Ok(())
    }
}

/// Map a PDU that a waiter did not expect to an error (Reject gets its own).
fn unexpected(header: Header, _data: &Bytes) -> Error {
    match header {
        Header::Reject(r) => Error::Rejected(r.reason),
        other => Error::Protocol(format!("unexpected {other:?}")),
    }
}

/// Identity fields every Data-Out of one sequence shares (§11.7).
#[derive(Debug, Clone, Copy)]
struct DataOutIds {
    lun: u64,
    itt: u32,
    ttt: u32,
    exp_stat_sn: u32,
}

/// Data-Out PDUs carrying `data[range]` in segments of at most `mrdsl`, DataSN from 0, F on
/// the last one (§11.7). Empty when the range is empty; the caller keeps it inside `data`.
fn data_out_pdus(
    ids: DataOutIds,
    data: &Bytes,
    range: std::ops::Range<usize>,
    mrdsl: usize,
) -> Vec<Pdu> {
    let mut pdus = Vec::new();
    let end = range.end.min(data.len());
    let mut off = range.start;
    let mut data_sn = 0u32;
    let step = mrdsl.max(1);
    while off < end {
        let seg_end = off.saturating_add(step).min(end);
        let h = DataOut {
            final_: seg_end == end,
            lun: ids.lun,
            itt: ids.itt,
            ttt: ids.ttt,
            exp_stat_sn: ids.exp_stat_sn,
            data_sn,
            buffer_offset: u32::try_from(off).unwrap_or(u32::MAX),
        };
        pdus.push(Pdu {
            header: Header::DataOut(h),
            ahs: Vec::new(),
            data: data.slice(off..seg_end),
        });
        data_sn = data_sn.wrapping_add(1);
        off = seg_end;
    }
    pdus
}

impl PendingCommand {
    /// Initiator Task Tag of the command (for ABORT TASK).
    pub fn itt(&self) -> u32 {
        self.guard.itt
    }

    /// CmdSN the command took.
    pub fn cmd_sn(&self) -> u32 {
        self.cmd_sn
    }

    /// Serve R2Ts with Data-Out (§11.8), reassemble Data-In (§11.7) and finish on the status
    /// (S bit in the last Data-In, or a SCSI Response, §11.4).
    pub async fn wait(mut self) -> Result<CommandResult> {
        let itt = self.guard.itt;
        let mrdsl = usize::try_from(
            self.session
                .inner
                .negotiated
                .target_max_recv_data_segment_length,
        )
        .unwrap_or(usize::MAX);
        let mut pieces: Vec<(usize, Bytes)> = Vec::new();
        let mut received_end = 0usize;
        let expected_in = usize::try_from(self.expected_in).unwrap_or(usize::MAX);
        loop {
            let pdu = self.rx.recv().await.ok_or(Error::Closed)?;
            match pdu.header {
                Header::R2t(r2t) => {
                    let start = usize::try_from(r2t.buffer_offset).unwrap_or(usize::MAX);
                    let len =
                        usize::try_from(r2t.desired_data_transfer_length).unwrap_or(usize::MAX);
                    let end = start
                        .checked_add(len)
                        .filter(|e| *e <= self.data_out.len() && len > 0);
                    let Some(end) = end else {
                        return Err(Error::Protocol(format!(
                            "R2T offset {} length {} outside {} bytes of data",
                            r2t.buffer_offset,
                            r2t.desired_data_transfer_length,
                            self.data_out.len()
                        )));
                    };
                    let data = self.data_out.clone();
                    let (lun, ttt) = (self.lun, r2t.ttt);
                    self.session
                        .send(SnUse::None, None, move |_, exp_stat_sn| {
                            data_out_pdus(
                                DataOutIds {
                                    lun,
                                    itt,
                                    ttt,
                                    exp_stat_sn,
                                },
                                &data,
                                start..end,
                                mrdsl,
                            )
                        })
                        .await?;
                }
                Header::DataIn(d) => {
                    if !pdu.data.is_empty() {
                        let off = usize::try_from(d.buffer_offset).unwrap_or(usize::MAX);
                        let end = off
                            .checked_add(pdu.data.len())
                            .filter(|e| *e <= expected_in)
                            .ok_or_else(|| {
                                Error::Protocol(format!(
                                    "Data-In offset {} length {} beyond expected {}",
                                    d.buffer_offset,
                                    pdu.data.len(),
                                    self.expected_in
                                ))
                            })?;
                        received_end = received_end.max(end);
                        pieces.push((off, pdu.data));
                    }
                    if d.status_present {
                        return Ok(CommandResult {
                            status: d.status,
                            sense: Bytes::new(),
                            data: assemble(pieces, received_end),
                            residual: Residual::from_flags(
                                d.underflow,
                                d.overflow,
                                d.residual_count,
                            ),
                            response: 0,
                        });
                    }
                }
                Header::ScsiResponse(r) => {
                    return Ok(CommandResult {
                        status: r.status,
                        sense: strip_sense_length(&pdu.data)?,
                        data: assemble(pieces, received_end),
                        residual: Residual::from_flags(r.underflow, r.overflow, r.residual_count),
                        response: r.response,
                    });
                }
                other => return Err(unexpected(other, &pdu.data)),
            }
        }
    }
}

/// Sense data of a SCSI Response: the 2-byte SenseLength then that many bytes (§11.4.7.2).
fn strip_sense_length(data: &Bytes) -> Result<Bytes> {
    if data.is_empty() {
        return Ok(Bytes::new());
    }
    let len_bytes: [u8; 2] = data
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Protocol("SCSI Response data shorter than SenseLength".to_owned()))?;
    let len = usize::from(u16::from_be_bytes(len_bytes));
    let end = len
        .checked_add(2)
        .filter(|e| *e <= data.len())
        .ok_or_else(|| {
            Error::Protocol(format!(
                "SenseLength {len} beyond {} data bytes",
                data.len()
            ))
        })?;
    Ok(data.slice(2..end))
}

/// Join Data-In segments by offset; a single segment at offset 0 is passed through uncopied.
fn assemble(mut pieces: Vec<(usize, Bytes)>, end: usize) -> Bytes {
    match pieces.as_slice() {
        [] => return Bytes::new(),
        [(0, only)] if only.len() == end => return only.clone(),
        _ => {}
    }
    pieces.sort_by_key(|(off, _)| *off);
    let mut buf = BytesMut::zeroed(end);
    for (off, data) in pieces {
        if let Some(dst) = off
            .checked_add(data.len())
            .and_then(|e| buf.get_mut(off..e))
        {
            dst.copy_from_slice(&data);
        }
    }
    buf.freeze()
}

/// What a target PDU says about sequence numbers (§4.2.2).
fn sequence_fields(header: &Header) -> (Option<u32>, Option<(u32, u32)>) {
    // (ExpStatSN to move to, (ExpCmdSN, MaxCmdSN))
    match header {
        Header::ScsiResponse(h) => (
            Some(h.stat_sn.wrapping_add(1)),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        Header::DataIn(h) => (
            h.status_present.then(|| h.stat_sn.wrapping_add(1)),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        // §11.19: a NOP-In with the reserved ITT does not advance StatSN.
        Header::NopIn(h) => (
            Some(if h.itt == RESERVED_TAG {
                h.stat_sn
            } else {
                h.stat_sn.wrapping_add(1)
            }),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        Header::TaskMgmtResponse(h) => (
            Some(h.stat_sn.wrapping_add(1)),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        Header::TextResponse(h) => (
            Some(h.stat_sn.wrapping_add(1)),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        Header::LogoutResponse(h) => (
            Some(h.stat_sn.wrapping_add(1)),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        Header::R2t(h) => (Some(h.stat_sn), Some((h.exp_cmd_sn, h.max_cmd_sn))),
        Header::AsyncMessage(h) => (
            Some(h.stat_sn.wrapping_add(1)),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        Header::Reject(h) => (
            Some(h.stat_sn.wrapping_add(1)),
            Some((h.exp_cmd_sn, h.max_cmd_sn)),
        ),
        _ => (None, None),
    }
}

/// ITT a target PDU answers; a Reject names it inside the rejected header it carries (§11.17).
fn task_tag(pdu: &Pdu) -> Option<u32> {
    match &pdu.header {
        Header::ScsiResponse(h) => Some(h.itt),
        Header::DataIn(h) => Some(h.itt),
        Header::NopIn(h) => Some(h.itt),
        Header::TaskMgmtResponse(h) => Some(h.itt),
        Header::TextResponse(h) => Some(h.itt),
        Header::LogoutResponse(h) => Some(h.itt),
        Header::R2t(h) => Some(h.itt),
        Header::Reject(_) => pdu
            .data
            .get(16..20)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes),
        _ => None,
    }
}

/// Background reader: update sequence numbers, answer target pings, dispatch by ITT. Ends on
/// EOF, a framing error or when the session is dropped; then every waiter sees [`Error::Closed`].
async fn reader_loop(mut reader: PduReader<OwnedReadHalf>, weak: std::sync::Weak<Inner>) {
    loop {
        let next = reader.recv().await;
        let Some(inner) = weak.upgrade() else { return };
        let pdu = match next {
            Ok(Some(pdu)) => pdu,
            Ok(None) => {
                tracing::debug!("target closed the connection");
                close(&inner);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "receive failed; closing");
                close(&inner);
                return;
            }
        };
        let (stat, window) = sequence_fields(&pdu.header);
        {
            let mut st = inner.state();
            if let Some(exp) = stat {
                st.exp_stat_sn = sn_max(st.exp_stat_sn, exp);
            }
            if let Some((exp_cmd, max_cmd)) = window {
                // §4.2.2.1: MaxCmdSN < ExpCmdSN - 1 is invalid and ignored.
                if sn_lte(exp_cmd.wrapping_sub(1), max_cmd) {
                    st.max_cmd_sn = sn_max(st.max_cmd_sn, max_cmd);
                }
            }
        }
        inner.window.notify_waiters();
        if let Header::NopIn(h) = &pdu.header {
            if h.itt == RESERVED_TAG {
                if h.ttt != RESERVED_TAG {
                    // Target ping (§11.19.2): answer with its TTT, on a separate task so that a
                    // long write in progress cannot stall this reader.
                    let session = Session {
                        inner: inner.clone(),
                    };
                    let (lun, ttt) = (h.lun, h.ttt);
                    tokio::spawn(async move {
                        let _ = session
                            .send(SnUse::Immediate, None, move |cmd_sn, exp_stat_sn| {
                                let h = NopOut {
                                    immediate: true,
                                    lun,
                                    itt: RESERVED_TAG,
                                    ttt,
                                    cmd_sn,
                                    exp_stat_sn,
                                };
                                vec![Pdu {
                                    header: Header::NopOut(h),
                                    ahs: Vec::new(),
                                    data: Bytes::new(),
                                }]
                            })
                            .await;
                    });
                }
                continue;
            }
        }
        if let Header::AsyncMessage(h) = &pdu.header {
            tracing::debug!(event = h.async_event, "asynchronous message ignored");
            continue;
        }
        let Some(itt) = task_tag(&pdu) else {
            tracing::debug!(header = ?pdu.header, "unexpected PDU from target ignored");
            continue;
        };
        let tx = inner.state().tasks.get(&itt).map(|t| t.tx.clone());
        match tx {
            Some(tx) => {
                let _ = tx.send(pdu);
            }
            None => tracing::debug!(itt, "PDU for unknown task ignored"),
        }
    }
}

fn close(inner: &Inner) {
    let mut st = inner.state();
    st.closed = true;
    st.tasks.clear();
    drop(st);
    inner.window.notify_waiters();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn data_out_split_by_mrdsl() {
        let data = Bytes::from(vec![7u8; 10_000]);
        let ids = DataOutIds {
            lun: 0,
            itt: 5,
            ttt: 9,
            exp_stat_sn: 3,
        };
        let pdus = data_out_pdus(ids, &data, 1000..10_000, 4096);
        assert_eq!(pdus.len(), 3);
        let offs: Vec<(u32, u32, usize, bool)> = pdus
            .iter()
            .map(|p| match &p.header {
                Header::DataOut(d) => (d.buffer_offset, d.data_sn, p.data.len(), d.final_),
                _ => panic!("not a Data-Out"),
            })
            .collect();
        assert_eq!(
            offs,
            vec![
                (1000, 0, 4096, false),
                (5096, 1, 4096, false),
                (9192, 2, 808, true)
            ]
        );
        assert!(data_out_pdus(ids, &data, 10..10, 4096).is_empty());
        assert!(data_out_pdus(ids, &data, 10..20_000, 1 << 20).len() == 1);
    }

    #[test]
    fn accepts_sense_with_length_prefix() {
        let d = Bytes::from_static(&[0, 3, 0x70, 0, 6, 0xee]);
        assert_eq!(
            strip_sense_length(&d).unwrap(),
            Bytes::from_static(&[0x70, 0, 6])
        );
        assert_eq!(strip_sense_length(&Bytes::new()).unwrap(), Bytes::new());
    }

    #[test]
    fn rejects_sense_length_beyond_data() {
        assert!(strip_sense_length(&Bytes::from_static(&[0, 9, 1, 2])).is_err());
        assert!(strip_sense_length(&Bytes::from_static(&[0])).is_err());
    }

    #[test]
    fn assemble_out_of_order_and_passthrough() {
        let a = Bytes::from_static(b"abcd");
        assert_eq!(assemble(vec![(0, a.clone())], 4).as_ptr(), a.as_ptr());
        let parts = vec![
            (4, Bytes::from_static(b"efgh")),
            (0, Bytes::from_static(b"abcd")),
        ];
        assert_eq!(assemble(parts, 8), Bytes::from_static(b"abcdefgh"));
        assert_eq!(assemble(Vec::new(), 0), Bytes::new());
    }

    #[test]
    fn reject_names_its_task_by_embedded_header() {
        let mut hdr = vec![0u8; 48];
        hdr[16..20].copy_from_slice(&0x1234u32.to_be_bytes());
        let pdu = Pdu {
            header: Header::Reject(ironlun_iscsi::pdu::Reject {
                reason: ironlun_iscsi::pdu::RejectReason::ProtocolError,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 3,
                data_sn_or_r2t_sn: 0,
            }),
            ahs: Vec::new(),
            data: Bytes::from(hdr),
        };
        assert_eq!(task_tag(&pdu), Some(0x1234));
    }
}
