//! The bearer token of the admin API (RFC 6750 §2.1): `[admin] token_file` on the daemon,
//! `--token-file` / `IRONLUN_ADMIN_TOKEN_FILE` on the client; both read it with [`Token::load`].

use std::path::Path;

/// Token files larger than this are refused (a token is a short line).
const MAX_TOKEN_FILE: u64 = 4096;
/// Shortest bearer token accepted (128 bits of hex or base64 are 22 characters or more).
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer token. Never printed.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from text: surrounding whitespace removed; at least [`MIN_TOKEN_LEN`] visible
    /// ASCII characters (it travels in a header field).
    pub fn new(text: &str) -> Result<Token, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "token too short: at least {MIN_TOKEN_LEN} characters"
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("token must be visible ASCII without spaces".into());
        }
        Ok(Token(t.as_bytes().to_vec()))
    }

    /// Read the token file (at most 4 KiB).
    pub fn load(path: &Path) -> Result<Token, String> {
        use std::io::Read;
        let f = std::fs::File::open(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut text = String::new();
        f.take(MAX_TOKEN_FILE.saturating_add(1))
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        if u64::try_from(text.len()).map_or(true, |n| n > MAX_TOKEN_FILE) {
            return Err(format!(
                "{}: larger than {MAX_TOKEN_FILE} bytes",
                path.display()
            ));
        }
        Token::new(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The token as the `Authorization` field carries it after `Bearer `.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Whether an `Authorization` field value is `Bearer <this token>` (scheme
    /// case-insensitive, RFC 9110 §11.1); constant time in the token's bytes.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let Some(v) = authorization else {
            return false;
        };
        let Some((scheme, cred)) = v.split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return false;
        }
        let cred = cred.trim_start_matches(' ').as_bytes();
        if cred.len() != self.0.len() {
            return false;
        }
        cred.iter()
            .zip(&self.0)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}
