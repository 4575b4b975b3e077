//! BHS/AHS codec tests: one hand-built byte literal per opcode, reject cases, and the
//! `decode(encode(pdu)) == pdu` property over every header type. The strategies are shared with
//! the framer tests.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;
use crate::pdu::*;
use proptest::prelude::*;

/// 48 bytes from hex text (whitespace ignored).
pub(crate) fn hex48(s: &str) -> [u8; BHS_LEN] {
    let v = hex(s);
    assert_eq!(v.len(), BHS_LEN, "literal is {} bytes", v.len());
    v.try_into().unwrap()
}

pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    assert_eq!(digits.len() % 2, 0);
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Decode `bytes`, check the header and lengths, and check encoding gives the same bytes back.
fn check(bytes: &str, want: Header, ahs_len: u32, dsl: u32) {
    let raw = hex48(bytes);
    let got = decode_header(&raw).unwrap();
    assert_eq!(
        got,
        DecodedBhs {
            header: want,
            total_ahs_len: ahs_len,
            data_segment_len: dsl
        }
    );
    assert_eq!(header_bytes(&got.header, ahs_len, dsl), raw);
}

const Z16: &str = "00000000 00000000 00000000 00000000";

#[test]
fn accepts_nop_out() {
    check(
        &format!("40800000 00000000 0000000000000000 00000001 ffffffff 00000005 00000007 {Z16}"),
        Header::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 1,
            ttt: RESERVED_TAG,
            cmd_sn: 5,
            exp_stat_sn: 7,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_scsi_command_rfc3720_read10() {
    // The Read (10) PDU of RFC 3720 Appendix B.4.
    check(
        "01c00000 00000000 0000000000000000 14000000 00000400 00000014 00000018
         28000000 00000000 02000000 00000000",
        Header::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: true,
            read: true,
            write: false,
            attr: TaskAttr::Untagged,
            lun: 0,
            itt: 0x1400_0000,
            expected_data_transfer_length: 0x400,
            cmd_sn: 0x14,
            exp_stat_sn: 0x18,
            cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
        }),
        0,
        0,
    );
}

#[test]
fn accepts_scsi_command_write_immediate_data() {
    check(
        "41a10000 00000200 0001000000000000 00000009 00001000 0000000a 0000000b
         2a000000 00100000 08000000 00000000",
        Header::ScsiCommand(ScsiCommand {
            immediate: true,
            final_: true,
            read: false,
            write: true,
            attr: TaskAttr::Simple,
            lun: 0x0001_0000_0000_0000,
            itt: 9,
            expected_data_transfer_length: 0x1000,
            cmd_sn: 10,
            exp_stat_sn: 11,
            cdb: [0x2a, 0, 0, 0, 0, 0x10, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
        }),
        0,
        0x200,
    );
}

#[test]
fn accepts_task_mgmt_request() {
    check(
        "42810000 00000000 0002000000000000 00000030 00000021 00000031 00000040
         00000020 00000003 00000000 00000000",
        Header::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function: TmfFunction::AbortTask,
            lun: 0x0002_0000_0000_0000,
            itt: 0x30,
            referenced_task_tag: 0x21,
            cmd_sn: 0x31,
            exp_stat_sn: 0x40,
            ref_cmd_sn: 0x20,
            exp_data_sn: 3,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_task_mgmt_request_unassigned_function() {
    let raw = hex48(&format!(
        "027f0000 00000000 0000000000000000 00000001 ffffffff 00000001 00000001 {Z16}"
    ));
    let Header::TaskMgmtRequest(h) = decode_header(&raw).unwrap().header else {
        panic!()
    };
    assert_eq!(h.function, TmfFunction::Other(0x7f));
}

#[test]
fn accepts_login_request() {
    check(
        &format!("43870000 0000001c 00023d000001 0000 00000000 0001 0000 00000000 00000000 {Z16}"),
        Header::LoginRequest(LoginRequest {
            transit: true,
            continue_: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_min: 0,
            isid: [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01],
            tsih: 0,
            itt: 0,
            cid: 1,
            cmd_sn: 0,
            exp_stat_sn: 0,
        }),
        0,
        0x1c,
    );
}

#[test]
fn accepts_login_request_continue_security() {
    let raw = hex48(&format!(
        "03410000 00000100 800000000000 0005 00000002 0000 0000 00000003 00000004 {Z16}"
    ));
    let Header::LoginRequest(h) = decode_header(&raw).unwrap().header else {
        panic!()
    };
    // The I bit is fixed on a Login Request; encoding sets it even if the peer did not.
    assert!(!h.transit && h.continue_);
    assert_eq!((h.csg, h.nsg), (Stage::Security, Stage::Operational));
    assert_eq!((h.tsih, h.itt, h.cmd_sn, h.exp_stat_sn), (5, 2, 3, 4));
    assert_eq!(header_bytes(&Header::LoginRequest(h), 0, 0x100)[0], 0x43);
}

#[test]
fn accepts_text_request() {
    check(
        &format!("44c00000 00000010 0000000000000000 00000002 ffffffff 00000003 00000004 {Z16}"),
        Header::TextRequest(TextRequest {
            immediate: true,
            final_: true,
            continue_: true,
            lun: 0,
            itt: 2,
            ttt: RESERVED_TAG,
            cmd_sn: 3,
            exp_stat_sn: 4,
        }),
        0,
        0x10,
    );
}

#[test]
fn accepts_data_out() {
    check(
        "05800000 00002000 0001000000000000 00000009 0000abcd 00000000 0000000b
         00000000 00000002 00004000 00000000",
        Header::DataOut(DataOut {
            final_: true,
            lun: 0x0001_0000_0000_0000,
            itt: 9,
            ttt: 0xabcd,
            exp_stat_sn: 11,
            data_sn: 2,
            buffer_offset: 0x4000,
        }),
        0,
        0x2000,
    );
}

#[test]
fn accepts_logout_request() {
    check(
        &format!("46810000 00000000 0000000000000000 00000077 0001 0000 00000008 00000009 {Z16}"),
        Header::LogoutRequest(LogoutRequest {
            immediate: true,
            reason: LogoutReason::CloseConnection,
            itt: 0x77,
            cid: 1,
            cmd_sn: 8,
            exp_stat_sn: 9,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_snack_request() {
    check(
        "10830000 00000000 0000000000000000 00000005 00000006 00000000 00000007
         00000000 00000000 00000001 00000000",
        Header::SnackRequest(SnackRequest {
            snack_type: 3,
            lun: 0,
            itt: 5,
            ttt: 6,
            exp_stat_sn: 7,
            beg_run: 1,
            run_length: 0,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_nop_in() {
    check(
        "20800000 00000000 0000000000000000 ffffffff 00000010 00000020 00000021
         00000040 00000000 00000000 00000000",
        Header::NopIn(NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt: 0x10,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_scsi_response_check_condition() {
    check(
        "21820002 00000014 0000000000000000 00000009 00000000 00000020 00000021
         00000040 00000000 00000000 00000200",
        Header::ScsiResponse(ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow: false,
            underflow: true,
            response: 0,
            status: 2,
            itt: 9,
            snack_tag: 0,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
            exp_data_sn: 0,
            bidi_residual_count: 0,
            residual_count: 0x200,
        }),
        0,
        0x14,
    );
}

#[test]
fn accepts_scsi_response_bidi_flags() {
    let raw = hex48(&format!(
        "219c0100 00000000 0000000000000000 00000001 00000000 00000001 00000001 {Z16}"
    ));
    let Header::ScsiResponse(h) = decode_header(&raw).unwrap().header else {
        panic!()
    };
    assert!(h.bidi_overflow && h.bidi_underflow && h.overflow && !h.underflow);
    assert_eq!(h.response, 1);
}

#[test]
fn accepts_task_mgmt_response() {
    check(
        "22800500 00000000 0000000000000000 00000030 00000000 00000020 00000021
         00000040 00000000 00000000 00000000",
        Header::TaskMgmtResponse(TaskMgmtResponse {
            response: TmfResponse::FunctionNotSupported,
            itt: 0x30,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
        }),
        0,
        0,
    );
}

#[test]
fn rejects_task_mgmt_response_unassigned_code() {
    let raw = hex48(&format!(
        "22800700 00000000 0000000000000000 00000030 00000000 00000020 00000021 {Z16}"
    ));
    assert_eq!(
        decode_header(&raw),
        Err(PduError::InvalidField("TMF response"))
    );
}

#[test]
fn accepts_login_response_failure() {
    check(
        "23000000 00000000 00023d000001 0000 00000000 00000000 00000000 00000001
         00000001 0201 0000 00000000 00000000",
        Header::LoginResponse(LoginResponse {
            transit: false,
            continue_: false,
            csg: Stage::Security,
            nsg: Stage::Security,
            version_max: 0,
            version_active: 0,
            isid: [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01],
            tsih: 0,
            itt: 0,
            stat_sn: 0,
            exp_cmd_sn: 1,
            max_cmd_sn: 1,
            status_class: 2,
            status_detail: 1,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_login_response_to_full_feature() {
    let raw = hex48(
        "23870000 00000040 00023d000001 0007 00000000 00000000 00000001 00000001
         00000020 0000 0000 00000000 00000000",
    );
    let Header::LoginResponse(h) = decode_header(&raw).unwrap().header else {
        panic!()
    };
    assert!(h.transit);
    assert_eq!(
        (h.csg, h.nsg, h.tsih, h.max_cmd_sn),
        (Stage::Operational, Stage::FullFeature, 7, 0x20)
    );
}

#[test]
fn accepts_text_response() {
    check(
        "24400000 00000100 0000000000000000 00000002 00000099 00000003 00000004
         00000005 00000000 00000000 00000000",
        Header::TextResponse(TextResponse {
            final_: false,
            continue_: true,
            lun: 0,
            itt: 2,
            ttt: 0x99,
            stat_sn: 3,
            exp_cmd_sn: 4,
            max_cmd_sn: 5,
        }),
        0,
        0x100,
    );
}

#[test]
fn accepts_data_in_with_status() {
    check(
        "25830000 00000200 0001000000000000 00000009 ffffffff 00000020 00000021
         00000040 00000001 00000200 00000100",
        Header::DataIn(DataIn {
            final_: true,
            acknowledge: false,
            overflow: false,
            underflow: true,
            status_present: true,
            status: 0,
            lun: 0x0001_0000_0000_0000,
            itt: 9,
            ttt: RESERVED_TAG,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
            data_sn: 1,
            buffer_offset: 0x200,
            residual_count: 0x100,
        }),
        0,
        0x200,
    );
}

#[test]
fn accepts_logout_response() {
    check(
        "26800000 00000000 0000000000000000 00000077 00000000 00000020 00000021
         00000040 00000000 0002 0014 00000000",
        Header::LogoutResponse(LogoutResponse {
            response: 0,
            itt: 0x77,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
            time2wait: 2,
            time2retain: 20,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_r2t() {
    check(
        "31800000 00000000 0001000000000000 00000009 00000100 00000020 00000021
         00000040 00000000 00002000 00010000",
        Header::R2t(R2t {
            lun: 0x0001_0000_0000_0000,
            itt: 9,
            ttt: 0x100,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
            r2t_sn: 0,
            buffer_offset: 0x2000,
            desired_data_transfer_length: 0x10000,
        }),
        0,
        0,
    );
}

#[test]
fn accepts_async_message() {
    check(
        "32800000 00000012 0001000000000000 ffffffff 00000000 00000020 00000021
         00000040 0100 0001 0002 0003 00000000",
        Header::AsyncMessage(AsyncMessage {
            lun: 0x0001_0000_0000_0000,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
            async_event: 1,
            async_vcode: 0,
            parameter1: 1,
            parameter2: 2,
            parameter3: 3,
        }),
        0,
        0x12,
    );
}

#[test]
fn accepts_reject() {
    check(
        "3f800900 00000030 0000000000000000 ffffffff 00000000 00000020 00000021
         00000040 00000000 00000000 00000000",
        Header::Reject(Reject {
            reason: RejectReason::InvalidPduField,
            stat_sn: 0x20,
            exp_cmd_sn: 0x21,
            max_cmd_sn: 0x40,
            data_sn_or_r2t_sn: 0,
        }),
        0,
        0x30,
    );
}

#[test]
fn rejects_reject_reserved_reason() {
    let raw = hex48(&format!(
        "3f800100 00000030 0000000000000000 ffffffff 00000000 00000020 00000021 {Z16}"
    ));
    assert_eq!(
        decode_header(&raw),
        Err(PduError::InvalidField("Reject reason"))
    );
}

#[test]
fn rejects_unknown_opcodes() {
    for code in [0x07u8, 0x0f, 0x1c, 0x1e, 0x27, 0x30, 0x3c, 0x3e] {
        let mut raw = [0u8; BHS_LEN];
        raw[0] = code;
        assert_eq!(
            decode_header(&raw),
            Err(PduError::UnknownOpcode(code)),
            "{code:#x}"
        );
    }
}

#[test]
fn accepts_every_known_opcode_and_only_those() {
    let known = (0u8..64).filter(|c| Opcode::from_u8(*c).is_some()).count();
    assert_eq!(known, 18);
    for code in 0u8..64 {
        if let Some(op) = Opcode::from_u8(code) {
            assert_eq!(op.code(), code);
        }
    }
}

#[test]
fn accepts_reserved_bits_ignored_and_zeroed() {
    // NOP-Out with byte 0 bit 7, byte 1 low bits, bytes 2-3 and 32-47 all set.
    let dirty = hex48(
        "c0ff ffff 00000000 0000000000000000 00000001 ffffffff 00000005 00000007
         ffffffff ffffffff ffffffff ffffffff",
    );
    let clean = hex48(&format!(
        "40800000 00000000 0000000000000000 00000001 ffffffff 00000005 00000007 {Z16}"
    ));
    let d = decode_header(&dirty).unwrap();
    assert_eq!(d, decode_header(&clean).unwrap());
    assert_eq!(header_bytes(&d.header, 0, 0), clean);
}

#[test]
fn accepts_largest_lengths() {
    let raw = hex48(&format!(
        "00800000 ffffffff 0000000000000000 00000001 ffffffff 00000005 00000007 {Z16}"
    ));
    let d = decode_header(&raw).unwrap();
    assert_eq!(
        (d.total_ahs_len, d.data_segment_len),
        (MAX_TOTAL_AHS_LEN, MAX_DATA_SEGMENT_LEN)
    );
    assert_eq!(
        header_bytes(&d.header, MAX_TOTAL_AHS_LEN, MAX_DATA_SEGMENT_LEN),
        raw
    );
}

#[test]
fn accepts_extended_cdb_ahs() {
    // A 32-byte CDB: 16 bytes beyond the BHS, AHSLength 17, padded to 20 bytes (§11.2.2.3).
    let area = hex("0011 01 00 7f00000000000000 0000000000000018");
    let ahs = decode_ahs(&area).unwrap();
    let mut cdb_tail = [0u8; 16];
    cdb_tail[0] = 0x7f;
    cdb_tail[15] = 0x18;
    assert_eq!(
        ahs,
        vec![Ahs::ExtendedCdb(Bytes::copy_from_slice(&cdb_tail))]
    );
    let mut out = BytesMut::new();
    encode_ahs(&ahs, &mut out);
    assert_eq!(&out[..], &area[..]);
    assert_eq!(ahs_encoded_len(&ahs), 20);
}

#[test]
fn accepts_bidi_read_length_ahs_after_extended_cdb() {
    let area = hex("0002 01 00 aa000000  0005 02 00 00010000");
    let ahs = decode_ahs(&area).unwrap();
    assert_eq!(
        ahs,
        vec![
            Ahs::ExtendedCdb(Bytes::from_static(&[0xaa])),
            Ahs::BidiReadLength(0x10000)
        ]
    );
    let mut out = BytesMut::new();
    encode_ahs(&ahs, &mut out);
    assert_eq!(&out[..], &area[..]);
}

#[test]
fn accepts_other_ahs_kept_with_reserved_type_bits_ignored() {
    let area = hex("0003 fc 07 beef0000");
    assert_eq!(
        decode_ahs(&area).unwrap(),
        vec![Ahs::Other {
            ahs_type: 0x3c,
            specific: 7,
            payload: Bytes::from_static(&[0xbe, 0xef])
        }]
    );
}

#[test]
fn rejects_bad_ahs() {
    let cases: [(&str, &str); 5] = [
        ("AHSLength 0", "0000 01 00"),
        ("runs past the area", "0009 01 00 00000000"),
        ("bidi length 4", "0004 02 00 000100 00"),
        ("bidi length 9", "0009 02 00 00000000 00000000"),
        ("area not a whole AHS", "0001 01"),
    ];
    for (what, area) in cases {
        assert_eq!(
            decode_ahs(&hex(area)),
            Err(PduError::InvalidField("AHSLength")),
            "{what}"
        );
    }
}

#[test]
fn accepts_encode_pdu_plain_with_ahs_and_padded_data() {
    let pdu = Pdu {
        header: Header::NopIn(NopIn {
            itt: 1,
            ttt: RESERVED_TAG,
            ..NopIn::default()
        }),
        ahs: vec![Ahs::BidiReadLength(7)],
        data: Bytes::from_static(b"hello"),
    };
    let bytes = encode_pdu_plain(&pdu);
    assert_eq!(bytes.len(), 48 + 8 + 5 + 3);
    assert_eq!(bytes[4], 2, "TotalAHSLength in words");
    assert_eq!(&bytes[5..8], &[0, 0, 5]);
    assert_eq!(&bytes[61..], &[0, 0, 0]);
}

// ---- strategies shared with the framer tests ----

fn tag() -> impl Strategy<Value = u32> {
    prop_oneof![Just(RESERVED_TAG), Just(0u32), any::<u32>()]
}

fn stage() -> impl Strategy<Value = Stage> {
    (0u8..4).prop_map(Stage::from_bits)
}

prop_compose! {
    fn nop_out()(immediate in any::<bool>(), lun in any::<u64>(), itt in tag(), ttt in tag(),
                 sn in any::<[u32; 2]>()) -> Header {
        Header::NopOut(NopOut { immediate, lun, itt, ttt, cmd_sn: sn[0], exp_stat_sn: sn[1] })
    }
}

prop_compose! {
    fn scsi_command()(f in any::<[bool; 4]>(), attr in 0u8..8, lun in any::<u64>(), itt in tag(),
                      n in any::<[u32; 3]>(), cdb in any::<[u8; 16]>()) -> Header {
        Header::ScsiCommand(ScsiCommand {
            immediate: f[0], final_: f[1], read: f[2], write: f[3], attr: TaskAttr::from_bits(attr),
            lun, itt, expected_data_transfer_length: n[0], cmd_sn: n[1], exp_stat_sn: n[2], cdb,
        })
    }
}

prop_compose! {
    fn task_mgmt_request()(immediate in any::<bool>(), function in 0u8..0x80, lun in any::<u64>(),
                           itt in tag(), n in any::<[u32; 5]>()) -> Header {
        Header::TaskMgmtRequest(TaskMgmtRequest {
            immediate, function: TmfFunction::from_u8(function), lun, itt,
            referenced_task_tag: n[0], cmd_sn: n[1], exp_stat_sn: n[2], ref_cmd_sn: n[3],
            exp_data_sn: n[4],
        })
    }
}

prop_compose! {
    fn login_request()(f in any::<[bool; 2]>(), csg in stage(), nsg in stage(), v in any::<[u8; 2]>(),
                       isid in any::<[u8; 6]>(), tsih in any::<u16>(), itt in tag(), cid in any::<u16>(),
                       n in any::<[u32; 2]>()) -> Header {
        Header::LoginRequest(LoginRequest {
            transit: f[0], continue_: f[1], csg, nsg, version_max: v[0], version_min: v[1], isid,
            tsih, itt, cid, cmd_sn: n[0], exp_stat_sn: n[1],
        })
    }
}

prop_compose! {
    fn text_request()(f in any::<[bool; 3]>(), lun in any::<u64>(), itt in tag(), ttt in tag(),
                      n in any::<[u32; 2]>()) -> Header {
        Header::TextRequest(TextRequest {
            immediate: f[0], final_: f[1], continue_: f[2], lun, itt, ttt, cmd_sn: n[0],
            exp_stat_sn: n[1],
        })
    }
}

prop_compose! {
    fn data_out()(final_ in any::<bool>(), lun in any::<u64>(), itt in tag(), ttt in tag(),
                  n in any::<[u32; 3]>()) -> Header {
        Header::DataOut(DataOut {
            final_, lun, itt, ttt, exp_stat_sn: n[0], data_sn: n[1], buffer_offset: n[2],
        })
    }
}

prop_compose! {
    fn logout_request()(immediate in any::<bool>(), reason in 0u8..0x80, itt in tag(),
                        cid in any::<u16>(), n in any::<[u32; 2]>()) -> Header {
        Header::LogoutRequest(LogoutRequest {
            immediate, reason: LogoutReason::from_u8(reason), itt, cid, cmd_sn: n[0],
            exp_stat_sn: n[1],
        })
    }
}

prop_compose! {
    fn snack_request()(snack_type in 0u8..16, lun in any::<u64>(), itt in tag(), ttt in tag(),
                       n in any::<[u32; 3]>()) -> Header {
        Header::SnackRequest(SnackRequest {
            snack_type, lun, itt, ttt, exp_stat_sn: n[0], beg_run: n[1], run_length: n[2],
        })
    }
}

prop_compose! {
    fn nop_in()(lun in any::<u64>(), itt in tag(), ttt in tag(), n in any::<[u32; 3]>()) -> Header {
        Header::NopIn(NopIn { lun, itt, ttt, stat_sn: n[0], exp_cmd_sn: n[1], max_cmd_sn: n[2] })
    }
}

prop_compose! {
    fn scsi_response()(f in any::<[bool; 4]>(), rs in any::<[u8; 2]>(), itt in tag(),
                       n in any::<[u32; 7]>()) -> Header {
        Header::ScsiResponse(ScsiResponse {
            bidi_overflow: f[0], bidi_underflow: f[1], overflow: f[2], underflow: f[3],
            response: rs[0], status: rs[1], itt, snack_tag: n[0], stat_sn: n[1], exp_cmd_sn: n[2],
            max_cmd_sn: n[3], exp_data_sn: n[4], bidi_residual_count: n[5], residual_count: n[6],
        })
    }
}

prop_compose! {
    fn task_mgmt_response()(code in prop::sample::select(vec![0u8, 1, 2, 3, 4, 5, 6, 255]),
                            itt in tag(), n in any::<[u32; 3]>()) -> Header {
        Header::TaskMgmtResponse(TaskMgmtResponse {
            response: TmfResponse::from_u8(code).unwrap(), itt, stat_sn: n[0], exp_cmd_sn: n[1],
            max_cmd_sn: n[2],
        })
    }
}

prop_compose! {
    fn login_response()(f in any::<[bool; 2]>(), csg in stage(), nsg in stage(), v in any::<[u8; 4]>(),
                        isid in any::<[u8; 6]>(), tsih in any::<u16>(), itt in tag(),
                        n in any::<[u32; 3]>()) -> Header {
        Header::LoginResponse(LoginResponse {
            transit: f[0], continue_: f[1], csg, nsg, version_max: v[0], version_active: v[1], isid,
            tsih, itt, stat_sn: n[0], exp_cmd_sn: n[1], max_cmd_sn: n[2], status_class: v[2],
            status_detail: v[3],
        })
    }
}

prop_compose! {
    fn text_response()(f in any::<[bool; 2]>(), lun in any::<u64>(), itt in tag(), ttt in tag(),
                       n in any::<[u32; 3]>()) -> Header {
        Header::TextResponse(TextResponse {
            final_: f[0], continue_: f[1], lun, itt, ttt, stat_sn: n[0], exp_cmd_sn: n[1],
            max_cmd_sn: n[2],
        })
    }
}

prop_compose! {
    fn data_in()(f in any::<[bool; 5]>(), status in any::<u8>(), lun in any::<u64>(), itt in tag(),
                 ttt in tag(), n in any::<[u32; 6]>()) -> Header {
        Header::DataIn(DataIn {
            final_: f[0], acknowledge: f[1], overflow: f[2], underflow: f[3], status_present: f[4],
            status, lun, itt, ttt, stat_sn: n[0], exp_cmd_sn: n[1], max_cmd_sn: n[2], data_sn: n[3],
            buffer_offset: n[4], residual_count: n[5],
        })
    }
}

prop_compose! {
    fn logout_response()(response in any::<u8>(), itt in tag(), n in any::<[u32; 3]>(),
                         t in any::<[u16; 2]>()) -> Header {
        Header::LogoutResponse(LogoutResponse {
            response, itt, stat_sn: n[0], exp_cmd_sn: n[1], max_cmd_sn: n[2], time2wait: t[0],
            time2retain: t[1],
        })
    }
}

prop_compose! {
    fn r2t()(lun in any::<u64>(), itt in tag(), ttt in tag(), n in any::<[u32; 6]>()) -> Header {
        Header::R2t(R2t {
            lun, itt, ttt, stat_sn: n[0], exp_cmd_sn: n[1], max_cmd_sn: n[2], r2t_sn: n[3],
            buffer_offset: n[4], desired_data_transfer_length: n[5],
        })
    }
}

prop_compose! {
    fn async_message()(lun in any::<u64>(), n in any::<[u32; 3]>(), e in any::<[u8; 2]>(),
                       p in any::<[u16; 3]>()) -> Header {
        Header::AsyncMessage(AsyncMessage {
            lun, stat_sn: n[0], exp_cmd_sn: n[1], max_cmd_sn: n[2], async_event: e[0],
            async_vcode: e[1], parameter1: p[0], parameter2: p[1], parameter3: p[2],
        })
    }
}

prop_compose! {
    fn reject()(reason in 2u8..=0x0c, n in any::<[u32; 4]>()) -> Header {
        Header::Reject(Reject {
            reason: RejectReason::from_u8(reason).unwrap(), stat_sn: n[0], exp_cmd_sn: n[1],
            max_cmd_sn: n[2], data_sn_or_r2t_sn: n[3],
        })
    }
}

/// Any header of any opcode, with fields in their valid encodable ranges.
pub(crate) fn arb_header() -> impl Strategy<Value = Header> {
    prop_oneof![
        nop_out(),
        scsi_command(),
        task_mgmt_request(),
        login_request(),
        text_request(),
        data_out(),
        logout_request(),
        snack_request(),
        nop_in(),
        scsi_response(),
        task_mgmt_response(),
        login_response(),
        text_response(),
        data_in(),
        logout_response(),
        r2t(),
        async_message(),
        reject(),
    ]
}

fn small_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

/// Any AHS; `Other` only with codes the decoder keeps as `Other`.
pub(crate) fn arb_ahs() -> impl Strategy<Value = Ahs> {
    prop_oneof![
        small_bytes(40).prop_map(Ahs::ExtendedCdb),
        any::<u32>().prop_map(Ahs::BidiReadLength),
        (
            (0u8..64).prop_filter("not 1 or 2", |c| *c != 1 && *c != 2),
            any::<u8>(),
            small_bytes(40)
        )
            .prop_map(|(ahs_type, specific, payload)| Ahs::Other {
                ahs_type,
                specific,
                payload
            }),
    ]
}

/// Any PDU with up to 3 AHSs and up to `max_data` data bytes.
pub(crate) fn arb_pdu(max_data: usize) -> impl Strategy<Value = Pdu> {
    (
        arb_header(),
        proptest::collection::vec(arb_ahs(), 0..3),
        small_bytes(max_data),
    )
        .prop_map(|(header, ahs, data)| Pdu { header, ahs, data })
}

proptest! {
    #[test]
    fn header_decode_inverts_encode(h in arb_header(), ahs_words in 0u32..256, dsl in 0u32..=MAX_DATA_SEGMENT_LEN) {
        let raw = header_bytes(&h, ahs_words * 4, dsl);
        let d = decode_header(&raw).unwrap();
        prop_assert_eq!(d, DecodedBhs { header: h, total_ahs_len: ahs_words * 4, data_segment_len: dsl });
    }

    #[test]
    fn ahs_decode_inverts_encode(ahs in proptest::collection::vec(arb_ahs(), 0..5)) {
        let mut out = BytesMut::new();
        encode_ahs(&ahs, &mut out);
        prop_assert_eq!(out.len(), ahs_encoded_len(&ahs));
        prop_assert_eq!(out.len() % 4, 0);
        prop_assert_eq!(decode_ahs(&out).unwrap(), ahs);
    }

    #[test]
    fn decode_of_any_bhs_reencodes_to_itself(raw in any::<[u8; 48]>()) {
        if let Ok(d) = decode_header(&raw) {
            let again = header_bytes(&d.header, d.total_ahs_len, d.data_segment_len);
            prop_assert_eq!(decode_header(&again).unwrap(), d);
        }
    }

    #[test]
    fn decode_of_any_ahs_area_reencodes_to_itself(area in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(ahs) = decode_ahs(&area) {
            let mut out = BytesMut::new();
            encode_ahs(&ahs, &mut out);
            prop_assert_eq!(decode_ahs(&out).unwrap(), ahs);
        }
    }
}
