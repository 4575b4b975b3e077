//! Hand-written requests to the admin API (Unix socket or TCP) and their raw responses.

use std::io::Read;
use std::time::Duration;

/// A raw admin connection of either kind.
pub enum AdminStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

/// Connect to the admin API at `url` (`unix:PATH` or `http://ADDR`).
pub fn admin_connect(url: &str) -> AdminStream {
    match url.strip_prefix("unix:") {
        Some(p) => AdminStream::Unix(
            std::os::unix::net::UnixStream::connect(p).expect("connect admin socket"),
        ),
        None => AdminStream::Tcp(
            std::net::TcpStream::connect(url.trim_start_matches("http://"))
                .expect("connect admin TCP"),
        ),
    }
}

impl AdminStream {
    pub fn set_read_timeout(&self, t: Option<Duration>) {
        match self {
            AdminStream::Unix(s) => s.set_read_timeout(t).unwrap(),
            AdminStream::Tcp(s) => s.set_read_timeout(t).unwrap(),
        }
    }

    /// Half-close: no more request bytes.
    pub fn shutdown_write(&self) {
        let _ = match self {
            AdminStream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            AdminStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Read for AdminStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            AdminStream::Unix(s) => s.read(buf),
            AdminStream::Tcp(s) => s.read(buf),
        }
    }
}

impl std::io::Write for AdminStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            AdminStream::Unix(s) => s.write(buf),
            AdminStream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A raw HTTP/1.1 response: status and body (by `Content-Length`, else to end of stream).
/// `None` when `buf` holds no complete status line and head.
pub fn parse_http_response(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let len = head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    let body = &buf[end..];
    let body = match len {
        Some(n) => body.get(..n)?.to_vec(),
        None => body.to_vec(),
    };
    Some((status, body))
}
