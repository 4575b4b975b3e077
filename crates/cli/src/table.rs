//! Plain-text tables for `ironlun ctl`: one header row in capitals, columns left-aligned and
//! separated by two spaces, no trailing blanks (the shape of `tgtadm`, `lsblk` and `ip -br`
//! output, easy to read and to cut with `awk`).

/// `header` and `rows` as a table, each line ending in `\n`, indented by `indent` spaces. A
/// row shorter than the header leaves its last cells empty; extra cells are dropped. Widths
/// count characters, not bytes.
pub fn render(indent: usize, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let start = s.len();
        s.push_str(&" ".repeat(indent));
        for (i, w) in width.iter().enumerate() {
            let c = cells.next().unwrap_or("");
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            let pad = w.saturating_sub(c.chars().count());
            s.push_str(&" ".repeat(pad));
        }
        let end = s.trim_end().len().max(start);
        s.truncate(end);
        s.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn pads_columns_and_trims_line_ends() {
        let t = render(
            2,
            &["LUN", "SIZE", "STATE"],
            &[
                vec!["0".into(), "1 GiB".into(), "online".into()],
                vec!["12".into(), "512 MiB".into()],
            ],
        );
        assert_eq!(
            t,
            "  LUN  SIZE     STATE\n  0    1 GiB    online\n  12   512 MiB\n"
        );
    }

    #[test]
    fn header_only_and_wide_characters() {
        assert_eq!(render(0, &["A", "B"], &[]), "A  B\n");
        let t = render(0, &["N", "X"], &[vec!["é".into(), "1".into()]]);
        assert_eq!(t, "N  X\né  1\n");
    }
}
