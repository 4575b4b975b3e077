//! Write protection (SWP), SANITIZE, WRITE ATOMIC (16) and READ DEFECT DATA flows.

use super::*;

/// MODE SELECT(6) of the control page with SWP `on` (the current page, as MODE SENSE gives it).
fn set_swp(f: &mut Fixture, nexus: NexusId, on: bool) -> Completion {
    let ms = f.run_on(nexus, &[0x1A, 0x08, 0x0A, 0, 0xFF, 0], &[]);
    good(&ms);
    let mut list = ms.data.to_vec();
    list[0] = 0;
    list[2] = 0;
    if on {
        list[4 + 4] |= 0x08;
    } else {
        list[4 + 4] &= !0x08;
    }
    f.run_on(nexus, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list)
}

fn sanitize_cdb(sa: u8, param_len: u16) -> Vec<u8> {
    let mut c = vec![0x48, sa, 0, 0, 0, 0, 0];
    c.extend(param_len.to_be_bytes());
    c.push(0);
    c
}

fn overwrite_list(b0: u8, pattern: &[u8]) -> Vec<u8> {
    let mut v = vec![b0, 0];
    v.extend((pattern.len() as u16).to_be_bytes());
    v.extend_from_slice(pattern);
    v
}

/// Every command that writes the medium, as (name, CDB, Data-Out).
fn writing_commands() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let block = vec![0xA6u8; BS as usize];
    let unmap_list = {
        let mut l = vec![0, 22, 0, 16, 0, 0, 0, 0];
        l.extend(0u64.to_be_bytes());
        l.extend(1u32.to_be_bytes());
        l.extend([0; 4]);
        l
    };
    let w10 = with_op(read10(0, 1), 0x2A);
    vec![
        ("WRITE(6)", vec![0x0A, 0, 0, 0, 1, 0], block.clone()),
        ("WRITE(10)", w10.clone(), block.clone()),
        (
            "WRITE(12)",
            vec![0xAA, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
            block.clone(),
        ),
        ("WRITE(16)", cdb16(0x8A, 0, 0, 1), block.clone()),
        (
            "WRITE AND VERIFY(10)",
            with_op(w10.clone(), 0x2E),
            block.clone(),
        ),
        ("WRITE AND VERIFY(16)", cdb16(0x8E, 0, 0, 1), block.clone()),
        ("ORWRITE", cdb16(0x8B, 0, 0, 1), block.clone()),
        ("WRITE SAME(10)", with_op(w10.clone(), 0x41), block.clone()),
        (
            "WRITE SAME(10) UNMAP",
            {
                let mut c = with_op(w10.clone(), 0x41);
                c[1] = 0x08;
                c
            },
            block.clone(),
        ),
        (
            "WRITE SAME(16) UNMAP",
            cdb16(0x93, 0x08, 0, 1),
            block.clone(),
        ),
        ("UNMAP", vec![0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap_list),
        ("WRITE ATOMIC(16)", cdb16(0x9C, 0, 0, 1), block.clone()),
        (
            "SANITIZE OVERWRITE",
            sanitize_cdb(1, 8),
            overwrite_list(1, &[1, 2, 3, 4]),
        ),
        ("SANITIZE BLOCK ERASE", sanitize_cdb(2, 0), Vec::new()),
    ]
}

#[test]
fn swp_write_protects_every_writing_command_and_shows_wp() {
    let mut f = Fixture::new();
    good(&set_swp(&mut f, N, true));
    // WP=1 in the device-specific parameter; the other nexus learns of the change.
    let ms = f.run(&[0x1A, 0x08, 0x0A, 0, 0xFF, 0], &[]);
    assert_eq!(ms.data[2], 0x90);
    assert_eq!(ms.data[4 + 4] & 0x08, 0x08);
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::ModeParametersChanged,
    );
    for (name, cdb, data) in writing_commands() {
        let c = f.run(&cdb, &data);
        assert_eq!(sense(&c), SenseReason::WriteProtected.code(), "{name}");
    }
    assert!(f.ram.ops.iter().all(|op| !matches!(
        op,
        IoOp::Write { .. } | IoOp::WriteZeroes { .. } | IoOp::Unmap { .. }
    )));
    // Reads still work; clearing SWP makes the LU writable again.
    good(&f.run(&read10(0, 1), &[]));
    good(&set_swp(&mut f, N, false));
    let ms = f.run(&[0x1A, 0x08, 0x0A, 0, 0xFF, 0], &[]);
    assert_eq!(ms.data[2], 0x10);
    good(&f.run(&cdb16(0x8A, 0, 0, 1), &[0xA6; BS as usize]));
}

#[test]
fn read_only_lu_write_protects_the_same_commands() {
    let mut cfg = LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:disk");
    cfg.read_only = true;
    let mut f = Fixture::with(cfg);
    for (name, cdb, data) in writing_commands() {
        let c = f.run(&cdb, &data);
        assert_eq!(sense(&c), SenseReason::WriteProtected.code(), "{name}");
    }
    // A LUN reset puts SWP back to its default; a read-only LU stays protected.
    let _ = f.lu.reset(N, ResetKind::LogicalUnit);
    f.run(&TUR, &[]);
    expect(
        &f.run(&cdb16(0x8A, 0, 0, 1), &[0; BS as usize]),
        SenseReason::WriteProtected,
    );
}

#[test]
fn sanitize_overwrite_writes_the_pattern_everywhere() {
    let mut f = Fixture::new();
    good(&f.run(&cdb16(0x8A, 0, 7, 1), &[0x61; BS as usize]));
    let list = overwrite_list(0x01, &[0xAA, 0x55, 0x0F]);
    good(&f.run(&sanitize_cdb(1, list.len() as u16), &list));
    let want: Vec<u8> = [0xAA, 0x55, 0x0F]
        .iter()
        .copied()
        .cycle()
        .take(BS as usize)
        .collect();
    for b in f.ram.bytes.chunks(BS as usize) {
        assert_eq!(b, &want[..]);
    }
    assert_eq!(f.ram.ops.last(), Some(&IoOp::Flush));
    // Two passes with INVERT: the last pass writes the pattern as given.
    let list = overwrite_list(0x82, &[0x0F]);
    good(&f.run(&sanitize_cdb(1, list.len() as u16), &list));
    assert!(f.ram.bytes.iter().all(|b| *b == 0x0F));
}

#[test]
fn sanitize_block_erase_deallocates_everything() {
    let mut f = Fixture::new();
    good(&f.run(&cdb16(0x8A, 0, 0, 4), &[0x61; 4 * BS as usize]));
    good(&f.run(&sanitize_cdb(2, 0), &[]));
    assert!(f.ram.bytes.iter().all(|b| *b == 0));
    assert!(f.ram.mapped.iter().all(|m| !m));
    // A thick LU has no BLOCK ERASE (and REPORT SUPPORTED OPERATION CODES says so).
    let mut cfg = LuConfig::new(0, BS, BLOCKS, "iqn.2026-01.test:disk");
    cfg.thin = false;
    let mut thick = Fixture::with(cfg);
    expect(
        &thick.run(&sanitize_cdb(2, 0), &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)),
    );
    let rsoc = thick.run(&[0xA3, 0x0C, 0x02, 0x48, 0, 0x02, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(rsoc.data[1] & 0x07, 0x01);
    let rsoc = thick.run(&[0xA3, 0x0C, 0x02, 0x48, 0, 0x01, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(rsoc.data[1] & 0x07, 0x03);
}

#[test]
fn sanitize_refuses_crypto_erase_bad_lists_and_reservations() {
    let mut f = Fixture::new();
    // CRYPTOGRAPHIC ERASE and unknown service actions: INVALID FIELD IN CDB.
    for sa in [0u8, 3, 4, 0x10, 0x1E] {
        expect(
            &f.run(&sanitize_cdb(sa, 0), &[]),
            SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)),
        );
    }
    // IMMED (not supported) and reserved bytes.
    let mut c = sanitize_cdb(2, 0);
    c[1] |= 0x80;
    expect(
        &f.run(&c, &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 7)),
    );
    expect(
        &f.run(&sanitize_cdb(2, 8), &[0; 8]),
        SenseReason::InvalidFieldInCdb(FieldPointer::byte(7)),
    );
    let list = overwrite_list(0, &[1]);
    expect(
        &f.run(&sanitize_cdb(1, list.len() as u16), &list),
        SenseReason::InvalidFieldInParameterList(FieldPointer::byte(0)),
    );
    assert!(f.ram.ops.is_empty());
    // An SPC-2 reservation of another nexus: RESERVATION CONFLICT.
    good(&f.run_on(OTHER, &[0x16, 0, 0, 0, 0, 0], &[]));
    let c = f.run(&sanitize_cdb(2, 0), &[]);
    assert_eq!(c.status, status::RESERVATION_CONFLICT);
}

#[test]
fn commands_during_a_sanitize_get_not_ready_with_progress() {
    let mut f = Fixture::new();
    f.lu.add_nexus(7, it(7));
    let mut step = f.lu.execute(N, &sanitize_cdb(2, 0), Bytes::new());
    let Step::Io(op, cont) = step else {
        panic!("sanitize did not start")
    };
    assert!(cont.is_sanitize());
    // NOT READY, SANITIZE IN PROGRESS for TUR and READ, before the pending unit attention
    // of nexus 7; INQUIRY, REPORT LUNS and REQUEST SENSE still answer.
    for (nexus, cdb) in [(N, TUR.to_vec()), (OTHER, read10(0, 1)), (7, TUR.to_vec())] {
        let c = f.run_on(nexus, &cdb, &[]);
        assert_eq!(sense(&c), (key::NOT_READY, 0x04, 0x1B));
        assert_eq!(c.sense[15], 0x80, "progress indication valid");
    }
    good(&f.run(&[0x12, 0, 0, 0, 36, 0], &[]));
    good(&f.run(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]));
    let rs = f.run(&[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!((rs.data[2], rs.data[12], rs.data[13]), (2, 0x04, 0x1B));
    // A LUN reset does not stop it.
    let _ = f.lu.reset(N, ResetKind::LogicalUnit);
    let r = f.ram.perform(&op);
    step = f.lu.resume(N, cont, r);
    loop {
        match step {
            Step::Io(op, cont) => {
                let r = f.ram.perform(&op);
                step = f.lu.resume(N, cont, r);
            }
            Step::Done(c) => {
                good(&c);
                break;
            }
            Step::PrCommit(_) => panic!("unexpected commit"),
            Step::Wait(_) => panic!("unexpected wait"),
            Step::Replicate(_) => panic!("unexpected replicate"),
        }
    }
    // Afterwards: the unit attention of the reset, then GOOD.
    expect(&f.run(&TUR, &[]), SenseReason::BusDeviceResetOccurred);
    good(&f.run(&TUR, &[]));
}

#[test]
fn a_failed_sanitize_enters_failure_mode_until_exit_or_success() {
    let mut f = Fixture::new();
    for (ause, exit_ok) in [(true, true), (false, false)] {
        let cdb = {
            let mut c = sanitize_cdb(2, 0);
            if ause {
                c[1] |= 0x20;
            }
            c
        };
        let Step::Io(_, cont) = f.lu.execute(N, &cdb, Bytes::new()) else {
            panic!("sanitize did not start")
        };
        let Step::Done(c) =
            f.lu.resume(N, cont, IoResult::Error(IoErrorKind::WriteError))
        else {
            panic!("no completion")
        };
        expect(&c, SenseReason::SanitizeFailed);
        expect(&f.run(&read10(0, 1), &[]), SenseReason::SanitizeFailed);
        good(&f.run(&[0x12, 0, 0, 0, 36, 0], &[]));
        let exit = f.run(&sanitize_cdb(0x1F, 0), &[]);
        if exit_ok {
            good(&exit);
        } else {
            expect(
                &exit,
                SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 4)),
            );
            // A sanitize that completes leaves the failure mode.
            good(&f.run(&sanitize_cdb(2, 0), &[]));
        }
        good(&f.run(&read10(0, 1), &[]));
    }
    // EXIT FAILURE MODE outside failure mode: nothing to do.
    good(&f.run(&sanitize_cdb(0x1F, 0), &[]));
}

#[test]
fn write_atomic_writes_whole_or_refuses() {
    let mut f = Fixture::new();
    let data = pattern(4 * BS as usize, 3);
    let mut c = cdb16(0x9C, 0x08, 10, 0);
    c[10..14].copy_from_slice(&[0, 0, 0, 4]);
    good(&f.run(&c, &data));
    assert_eq!(&f.ram.bytes[10 * BS as usize..14 * BS as usize], &data[..]);
    assert_eq!(
        f.ram.ops.last(),
        Some(&IoOp::Write {
            offset: 10 * u64::from(BS),
            data: Bytes::from(data.clone()),
            fua: true
        })
    );
    // Zero blocks: GOOD at the end of the medium, LBA OUT OF RANGE beyond.
    let mut z = cdb16(0x9C, 0, BLOCKS, 0);
    z[10..14].fill(0);
    good(&f.run(&z, &[]));
    let mut z = cdb16(0x9C, 0, BLOCKS + 1, 0);
    z[10..14].fill(0);
    expect(&f.run(&z, &[]), SenseReason::LbaOutOfRange);
    // A short Data-Out is not written in part; WRPROTECT and bytes 10-11 are reserved.
    expect(
        &f.run(&c, &data[..BS as usize]),
        SenseReason::InvalidFieldInCommandIu,
    );
    let mut w = c.clone();
    w[1] |= 0x20;
    expect(
        &f.run(&w, &data),
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 5)),
    );
    let mut w = c.clone();
    w[10] = 1;
    expect(
        &f.run(&w, &data),
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(10, 0)),
    );
}

#[test]
fn write_atomic_and_overlapping_io_exclude_each_other() {
    let mut f = Fixture::new();
    let mut atomic = cdb16(0x9C, 0, 8, 0);
    atomic[10..14].copy_from_slice(&[0, 0, 0, 8]);
    let data = Bytes::from(vec![1u8; 8 * BS as usize]);
    let Step::Io(op, cont) = f.lu.execute(N, &atomic, data.clone()) else {
        panic!("atomic write did not start")
    };
    // An overlapping READ gets BUSY; a disjoint one runs.
    assert_eq!(f.run_on(OTHER, &read10(15, 2), &[]).status, status::BUSY);
    good(&f.run_on(OTHER, &read10(16, 2), &[]));
    let r = f.ram.perform(&op);
    assert!(matches!(f.lu.resume(N, cont, r), Step::Done(ref c) if c.status == 0));
    good(&f.run_on(OTHER, &read10(15, 2), &[]));
    // A WRITE in flight makes an overlapping WRITE ATOMIC busy.
    let Step::Io(_, cont) = f.lu.execute(OTHER, &read10(0, 9), Bytes::new()) else {
        panic!("read did not start")
    };
    assert_eq!(
        f.lu.execute(N, &atomic, data).status_of(),
        Some(status::BUSY)
    );
    f.lu.abandon(cont);
}

#[test]
fn read_defect_data_returns_empty_lists() {
    let mut f = Fixture::new();
    let c = f.run(&[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[]);
    good(&c);
    assert_eq!(&c.data[..], &[0, 0x18, 0, 0]);
    let c = f.run(&[0xB7, 0x0D, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]);
    good(&c);
    assert_eq!(&c.data[..], &[0, 0x0D, 0, 0, 0, 0, 0, 0]);
    // Allocation length cuts; reserved formats are refused.
    assert_eq!(
        f.run(&[0x37, 0, 0x18, 0, 0, 0, 0, 0, 2, 0], &[]).data.len(),
        2
    );
    expect(
        &f.run(&[0x37, 0, 0x01, 0, 0, 0, 0, 0, 32, 0], &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(2, 2)),
    );
    expect(
        &f.run(&[0xB7, 0x07, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]),
        SenseReason::InvalidFieldInCdb(FieldPointer::bit(1, 2)),
    );
}

impl Step {
    fn status_of(&self) -> Option<u8> {
        match self {
            Step::Done(c) => Some(c.status),
            _ => None,
        }
    }
}

#[test]
fn offline_lu_answers_not_ready_and_comes_back_with_a_unit_attention() {
    let mut f = Fixture::new();
    assert!(f.lu.set_offline(true));
    assert!(!f.lu.set_offline(true), "no change the second time");
    assert!(f.lu.is_offline());
    // TEST UNIT READY, READ, WRITE and PR IN: NOT READY, LOGICAL UNIT NOT READY, OFFLINE.
    let block = vec![1u8; BS as usize];
    for (cdb, data) in [
        (TUR.to_vec(), vec![]),
        (read10(0, 1), vec![]),
        (with_op(read10(0, 1), 0x2A), block),
        (vec![0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], vec![]),
    ] {
        assert_eq!(
            sense(&f.run(&cdb, &data)),
            (key::NOT_READY, 0x04, 0x12),
            "{cdb:02x?}"
        );
    }
    // INQUIRY and REPORT LUNS answer; REQUEST SENSE reports the state.
    good(&f.run(&[0x12, 0, 0, 0, 36, 0], &[]));
    good(&f.run(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]));
    let rs = f.run(&[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!((rs.data[2], rs.data[12], rs.data[13]), (2, 0x04, 0x12));
    // Back online: each nexus sees 28h/00h once, then GOOD.
    assert!(f.lu.set_offline(false));
    for nexus in [N, OTHER] {
        expect(
            &f.run_on(nexus, &TUR, &[]),
            SenseReason::NotReadyToReadyChange,
        );
        good(&f.run_on(nexus, &TUR, &[]));
    }
}

#[test]
fn lun_inventory_change_raises_reported_luns_changed_until_report_luns() {
    let mut f = Fixture::new();
    f.lu.luns_changed();
    // REPORT LUNS answered by the target above the LU clears it for that nexus only.
    f.lu.report_luns_seen(N);
    good(&f.run_on(N, &TUR, &[]));
    expect(
        &f.run_on(OTHER, &TUR, &[]),
        SenseReason::ReportedLunsDataChanged,
    );
    good(&f.run_on(OTHER, &TUR, &[]));
}
