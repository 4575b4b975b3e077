//! Serial number arithmetic for CmdSN / StatSN (RFC 7143 §4.2.2.1, RFC 1982 with SERIAL_BITS=32).

/// `a < b` in serial arithmetic.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial arithmetic.
pub fn sn_lte(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// The later of `a` and `b` in serial arithmetic.
pub fn sn_max(a: u32, b: u32) -> u32 {
    if sn_lt(a, b) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_compare_table() {
        let cases: &[(u32, u32, bool)] = &[
            (0, 1, true),
            (1, 0, false),
            (5, 5, false),
            (0xffff_ffff, 0, true),
            (0, 0xffff_ffff, false),
            (0xffff_fff0, 0x10, true),
            (0, 0x7fff_ffff, true),
        ];
        for &(a, b, lt) in cases {
            assert_eq!(sn_lt(a, b), lt, "{a:#x} < {b:#x}");
        }
        assert!(sn_lte(7, 7));
        assert_eq!(sn_max(0xffff_ffff, 2), 2);
        assert_eq!(sn_max(3, 2), 3);
    }
}
