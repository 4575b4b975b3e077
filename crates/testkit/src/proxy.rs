//! A TCP proxy on 127.0.0.1 that a test can black-hole: the partition of one client (a
//! gateway) from a server (etcd) without touching either process (scale-out.md §5, topology L).
//!
//! While [`Proxy::block`] is in force, bytes are neither forwarded nor refused: connections
//! stay open and silent, as behind a dead link; new connections are accepted and held.
//! [`Proxy::unblock`] lets the held bytes through. Threads, not tasks, so a test's runtime
//! being busy cannot stall the proxy.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A proxy from a local port to one upstream address ([module docs](self)).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Every socket the proxy holds, to shut them down when it is dropped.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Listen on 127.0.0.1 (a free port) and forward each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        Proxy::start_at("127.0.0.1:0".parse().expect("address"), upstream)
    }

    /// Listen on `listen` (e.g. where a dropped proxy listened, so that its clients come
    /// back through the new one) and forward each connection to `upstream`.
    pub fn start_at(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen).expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let blocked = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        listener.set_nonblocking(true).expect("nonblocking");
        let (b, s, socks) = (blocked.clone(), stop.clone(), sockets.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    if let (Ok(f), Ok(t)) = (from.try_clone(), to.try_clone()) {
                        socks.lock().expect("sockets").extend([f, t]);
                    }
                    let (b, s) = (b.clone(), s.clone());
                    std::thread::spawn(move || pump(from, to, &b, &s));
                }
            }
        });
        Proxy {
            addr,
            blocked,
            stop,
            sockets,
        }
    }

    /// Where clients connect: `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Black-hole every connection, open and new, until [`Proxy::unblock`].
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
    }

    /// Forward again (bytes held meanwhile go through).
    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

/// Copy `from` → `to` until either side ends; while `blocked`, hold the bytes read so far.
fn pump(mut from: TcpStream, mut to: TcpStream, blocked: &AtomicBool, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 << 10];
    let mut held: Vec<u8> = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if !blocked.load(Ordering::SeqCst) && !held.is_empty() {
            if to.write_all(&held).is_err() {
                break;
            }
            held.clear();
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let data = buf.get(..n).unwrap_or_default();
                if blocked.load(Ordering::SeqCst) {
                    held.extend_from_slice(data);
                } else if to.write_all(data).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.sockets.lock().expect("sockets").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
