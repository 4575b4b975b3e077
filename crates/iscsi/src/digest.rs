//! CRC32C header and data digests (RFC 7143 §12.1, RFC 3720 Appendix B.4).

/// CRC32C over `data`, as carried on the wire (little-endian byte order per §12.1's example).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C continued over several pieces (for data digest over data + padding).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}
