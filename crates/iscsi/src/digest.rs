//! CRC32C header and data digests (RFC 7143 §12.1, RFC 3720 Appendix B.4).
//!
//! The digest field carries the CRC32C value least significant byte first: RFC 3720 B.4 gives
//! 32 zero bytes → bytes `aa 36 91 8a` on the wire, i.e. the value 0x8a9136aa little-endian.

/// Length of a header or data digest on the wire.
pub const DIGEST_LEN: usize = 4;

/// CRC32C over `data` (Castagnoli polynomial, RFC 7143 §12.1).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C continued over several pieces (for data digest over data + padding).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The four digest bytes as sent (little-endian, see the module doc).
pub fn to_wire(crc: u32) -> [u8; DIGEST_LEN] {
    crc.to_le_bytes()
}

/// The CRC32C value carried by four received digest bytes.
pub fn from_wire(bytes: [u8; DIGEST_LEN]) -> u32 {
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3720 Appendix B.4 vectors, as wire bytes.
    #[test]
    fn accepts_rfc3720_b4_vectors() {
        let zeros = [0u8; 32];
        let ones = [0xffu8; 32];
        let inc: Vec<u8> = (0u8..32).collect();
        let dec: Vec<u8> = (0u8..32).rev().collect();
        // iSCSI SCSI Read (10) command PDU from B.4.
        let read10: [u8; 48] = [
            0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14,
            0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        let table: [(&[u8], [u8; 4]); 5] = [
            (&zeros, [0xaa, 0x36, 0x91, 0x8a]),
            (&ones, [0x43, 0xab, 0xa8, 0x62]),
            (&inc, [0x4e, 0x79, 0xdd, 0x46]),
            (&dec, [0x5c, 0xdb, 0x3f, 0x11]),
            (&read10, [0x56, 0x3a, 0x96, 0xd9]),
        ];
        for (input, wire) in table {
            assert_eq!(to_wire(crc32c(input)), wire);
            assert_eq!(from_wire(wire), crc32c(input));
        }
        assert_eq!(crc32c(&zeros), 0x8a91_36aa);
    }

    #[test]
    fn accepts_append_over_pieces() {
        let data: Vec<u8> = (0u8..=255).collect();
        let (a, b) = data.split_at(100);
        assert_eq!(crc32c_append(crc32c(a), b), crc32c(&data));
    }
}
