//! Ceph RBD backstore (`backstore = "rbd"`): one RBD image, served through librbd.
//!
//! - **Loading.** librados (`librados.so.2`) and librbd (`librbd.so.1`) are loaded at run time
//!   with `dlopen`, so the daemon builds and runs without Ceph; opening an RBD LUN without them
//!   fails naming the package (`librbd1`). The C API used is the stable one of Ceph 16
//!   (`include/rbd/librbd.h`, `include/rados/librados.h`).
//! - **Client.** Each [`RbdBackend`] is one rados client (`rados_create2` with the configured
//!   client id, the configured `ceph.conf` or librados' default search), with `rbd_cache =
//!   false`: no gateway keeps written data in its memory, so every gateway of a cluster reads
//!   what the others wrote, and a write completes only once the OSDs have committed it (FUA
//!   and SYNCHRONIZE CACHE hold without a cache to flush; FUA writes carry
//!   `LIBRADOS_OP_FLAG_FADVISE_FUA` anyway).
//! - **I/O.** Reads, writes and flushes are asynchronous ([`BlockBackend::is_async`]):
//!   `rbd_aio_read` / `rbd_aio_write2` / `rbd_aio_flush`, completed from librbd's callback
//!   thread into an [`IoFuture`]; each request owns its buffer (and a reference to its client)
//!   until librbd completes it, whatever happens to the future. The rest (`rbd_write_zeroes`,
//!   `rbd_diff_iterate2`, `rbd_resize`) and the synchronous methods are blocking librbd calls.
//!   Requests are split at [`MAX_IO`] bytes (librbd returns byte counts as `int`); an
//!   asynchronous one larger than that runs synchronously. UNMAP is `rbd_write_zeroes` without the
//!   thick-provision flag, which removes whole objects and zeroes partial ones: unlike
//!   `rbd_discard` it never skips a range below the discard granularity, so the range always
//!   reads as zeroes. [`extents`](BlockBackend::extents) asks `rbd_diff_iterate2` from the
//!   image's creation.
//! - **Storage fence.** [`take_exclusive`](BlockBackend::take_exclusive) makes this client the
//!   holder of the image's exclusive lock (the image needs the `exclusive-lock` feature, on by
//!   default): it breaks any other holder's lock, which blocklists that client
//!   (`rbd_blocklist_on_break_lock`, default true), then takes the lock with
//!   `rbd_lock_acquire`, after which librbd no longer hands it over on request. A fenced
//!   client's I/O fails with `ESHUTDOWN` (Ceph's `EBLOCKLISTED`) or, lock lost without a
//!   blocklist, `EROFS`: both become [`BackstoreError::Fenced`]. A fenced client that must take
//!   the lock again (it became the active gateway again) connects anew first.
//!   [`release_exclusive`](BlockBackend::release_exclusive) (`rbd_lock_release`, after the
//!   writes in flight) lets a planned successor take the lock without a blocklist, when the
//!   release comes first.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use bytes::Bytes;

use crate::{
    check_range, check_resize, BackstoreError, BlockBackend, Extent, IoCompleter, IoFuture, Result,
};

/// Largest byte count handed to one librbd call (its results are `int` byte counts).
pub const MAX_IO: u64 = 1 << 30;

/// `LIBRADOS_OP_FLAG_FADVISE_FUA` (librados.h): write through any cache.
const OP_FLAG_FUA: c_int = 0x80;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION` (librbd.h): zero without deallocating.
const WRITE_ZEROES_THICK: c_int = 1;
/// `RBD_LOCK_MODE_EXCLUSIVE` (librbd.h).
const LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` (rbd/features.h).
const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// Lock owners asked for at once by `rbd_lock_get_owners` (an exclusive lock has one).
const MAX_OWNERS: usize = 8;

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type DiffCb = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;
type CompletionT = *mut c_void;
type AioCb = extern "C" fn(CompletionT, *mut c_void);

/// Declares the C functions used, and loads them from the two libraries.
macro_rules! ceph_api {
    ($rados:ident, $rbd:ident; $( $lib:ident $name:ident ( $($arg:ty),* ) -> $ret:ty; )*) => {
        /// The librados and librbd functions, resolved once per process.
        #[allow(non_snake_case)]
        struct Api {
            $( $name: unsafe extern "C" fn($($arg),*) -> $ret, )*
        }

        impl Api {
            fn load() -> std::result::Result<Api, String> {
                let $rados = open_library("librados.so.2")?;
                let $rbd = open_library("librbd.so.1")?;
                Ok(Api {
                    $( $name: {
                        let p = symbol($lib, concat!(stringify!($name), "\0"))?;
                        // SAFETY: `p` is the non-null address of the exported C function of
                        // this name, whose prototype in librados.h / librbd.h (Ceph 16) is
                        // the one written in this declaration.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(p)
                        }
                    }, )*
                })
            }
        }
    };
}

ceph_api! {
    rados, rbd;
    rados rados_create2(*mut RadosT, *const c_char, *const c_char, u64) -> c_int;
    rados rados_conf_read_file(RadosT, *const c_char) -> c_int;
    rados rados_conf_set(RadosT, *const c_char, *const c_char) -> c_int;
    rados rados_conf_get(RadosT, *const c_char, *mut c_char, usize) -> c_int;
    rados rados_connect(RadosT) -> c_int;
    rados rados_shutdown(RadosT) -> ();
    rados rados_ioctx_create(RadosT, *const c_char, *mut IoctxT) -> c_int;
    rados rados_ioctx_destroy(IoctxT) -> ();
    rados rados_get_instance_id(RadosT) -> u64;
    rados rados_getaddrs(RadosT, *mut *mut c_char) -> c_int;
    rbd rbd_create(IoctxT, *const c_char, u64, *mut c_int) -> c_int;
    rbd rbd_open(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd rbd_close(ImageT) -> c_int;
    rbd rbd_get_size(ImageT, *mut u64) -> c_int;
    rbd rbd_get_features(ImageT, *mut u64) -> c_int;
    rbd rbd_read(ImageT, u64, usize, *mut c_char) -> isize;
    rbd rbd_write2(ImageT, u64, usize, *const c_char, c_int) -> isize;
    rbd rbd_flush(ImageT) -> c_int;
    rbd rbd_write_zeroes(ImageT, u64, usize, c_int, c_int) -> isize;
    rbd rbd_resize(ImageT, u64) -> c_int;
    rbd rbd_diff_iterate2(ImageT, *const c_char, u64, u64, u8, u8, DiffCb, *mut c_void) -> c_int;
    rbd rbd_aio_create_completion(*mut c_void, AioCb, *mut CompletionT) -> c_int;
    rbd rbd_aio_get_return_value(CompletionT) -> isize;
    rbd rbd_aio_release(CompletionT) -> ();
    rbd rbd_aio_read(ImageT, u64, usize, *mut c_char, CompletionT) -> c_int;
    rbd rbd_aio_write2(ImageT, u64, usize, *const c_char, CompletionT, c_int) -> c_int;
    rbd rbd_aio_flush(ImageT, CompletionT) -> c_int;
    rbd rbd_is_exclusive_lock_owner(ImageT, *mut c_int) -> c_int;
    rbd rbd_lock_acquire(ImageT, c_int) -> c_int;
    rbd rbd_lock_release(ImageT) -> c_int;
    rbd rbd_lock_get_owners(ImageT, *mut c_int, *mut *mut c_char, *mut usize) -> c_int;
    rbd rbd_lock_get_owners_cleanup(*mut *mut c_char, usize) -> ();
    rbd rbd_lock_break(ImageT, c_int, *const c_char) -> c_int;
}

/// A library handle (never closed: the functions stay valid for the process's life).
#[derive(Clone, Copy)]
struct Library(*mut c_void);

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a pointer to a NUL-terminated string valid until the
    // next dl* call on this thread; it is copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".to_owned()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn open_library(name: &str) -> std::result::Result<Library, String> {
    let c = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a NUL-terminated file name; dlopen has no other precondition. librados
    // and librbd run no code at load that depends on the caller.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err(format!(
            "cannot load {name} ({}): the rbd backstore needs Ceph's client libraries \
             (Debian/Ubuntu: apt-get install librbd1)",
            dl_error()
        ));
    }
    Ok(Library(h))
}

fn symbol(lib: Library, name: &'static str) -> std::result::Result<*mut c_void, String> {
    // SAFETY: `lib.0` is a live handle from dlopen and `name` ends with NUL (the macro appends
    // it).
    let p = unsafe { libc::dlsym(lib.0, name.as_ptr().cast()) };
    if p.is_null() {
        return Err(format!(
            "{} not found in Ceph's client libraries ({}): librbd1 16 (Pacific) or later is needed",
            name.trim_end_matches('\0'),
            dl_error()
        ));
    }
    Ok(p)
}

/// The loaded API, or why it cannot be loaded.
fn api() -> std::result::Result<&'static Api, BackstoreError> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(Api::load)
        .as_ref()
        .map_err(|e| open_error(e.clone()))
}

/// Whether librados and librbd can be loaded on this machine.
pub fn rbd_available() -> bool {
    api().is_ok()
}

fn open_error(message: String) -> BackstoreError {
    BackstoreError::Io {
        op: "rbd open",
        offset: 0,
        source: io::Error::other(message),
    }
}

/// An error of one open step, naming it and what it worked on.
fn step_error(step: &str, what: &str, r: c_int) -> BackstoreError {
    let os = io::Error::from_raw_os_error(r.saturating_neg());
    BackstoreError::Io {
        op: "rbd open",
        offset: 0,
        source: io::Error::new(os.kind(), format!("{step} {what}: {os}")),
    }
}

/// The error of an I/O call that returned `-errno`. `ESHUTDOWN` (Ceph's `EBLOCKLISTED`: this
/// client was blocklisted) and `EROFS` (the exclusive lock is someone else's) mean that the
/// storage fenced this client: [`BackstoreError::Fenced`].
fn io_error(op: &'static str, offset: u64, r: i64) -> BackstoreError {
    let errno = c_int::try_from(r.saturating_neg()).unwrap_or(libc::EIO);
    let source = io::Error::from_raw_os_error(errno);
    match errno {
        libc::ESHUTDOWN | libc::EROFS => BackstoreError::Fenced { op, offset, source },
        libc::ENOSPC | libc::EDQUOT => BackstoreError::NoSpace { op, offset },
        _ => BackstoreError::Io { op, offset, source },
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| open_error(format!("{what} {s:?} contains a NUL byte")))
}

/// Where and how to open an RBD image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    /// The pool (`rbd` by default in the config).
    pub pool: String,
    /// The image's name in the pool.
    pub image: String,
    /// The `ceph.conf` to read; `None`: librados' default search (`$CEPH_CONF`,
    /// `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`).
    pub ceph_conf: Option<PathBuf>,
    /// The Ceph client id (`admin` for `client.admin`).
    pub client: String,
    /// Create the image with this size (bytes) when it does not exist; `None`: a missing
    /// image is an error.
    pub create_size: Option<u64>,
    /// Refuse every modifying operation ([`BackstoreError::ReadOnly`]); never take the lock.
    pub read_only: bool,
}

impl RbdOptions {
    /// Options for `pool/image` as `client.admin` with the default `ceph.conf`.
    pub fn new(pool: &str, image: &str) -> Self {
        Self {
            pool: pool.to_owned(),
            image: image.to_owned(),
            ceph_conf: None,
            client: "admin".to_owned(),
            create_size: None,
            read_only: false,
        }
    }
}

/// One rados client with the image open; closed (image, pool context, client) on drop.
struct Conn {
    api: &'static Api,
    cluster: RadosT,
    ioctx: IoctxT,
    image: ImageT,
}

// SAFETY: librados cluster handles, io contexts and librbd image handles may be used from
// any thread, and concurrently for I/O (librbd serialises internally); `Conn` hands them
// only to librados/librbd calls, and frees them once, in `drop`, when no other user is left.
unsafe impl Send for Conn {}
// SAFETY: as above: shared use is concurrent librbd calls, which librbd allows.
unsafe impl Sync for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: each handle is null or was returned by its create/open call and is released
        // here exactly once, image before pool context before client; no I/O is in flight
        // (every caller holds an `Arc<Conn>` for the duration of its call).
        unsafe {
            if !self.image.is_null() {
                let r = (self.api.rbd_close)(self.image);
                if r < 0 {
                    tracing::warn!(error = %io::Error::from_raw_os_error(-r), "rbd_close failed");
                }
            }
            if !self.ioctx.is_null() {
                (self.api.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.api.rados_shutdown)(self.cluster);
            }
        }
    }
}

impl Conn {
    /// Connect a new client and open the image (creating it if allowed); returns its size.
    fn open(o: &RbdOptions) -> Result<(Conn, u64)> {
        let api = api()?;
        let name = cstring("client", &format!("client.{}", o.client))?;
        let pool = cstring("pool", &o.pool)?;
        let image = cstring("image", &o.image)?;
        let conf = o
            .ceph_conf
            .as_deref()
            .map(|p| cstring("ceph_conf", &p.to_string_lossy()))
            .transpose()?;
        let mut c = Conn {
            api,
            cluster: ptr::null_mut(),
            ioctx: ptr::null_mut(),
            image: ptr::null_mut(),
        };
        let conf_name = o.ceph_conf.as_deref().map_or_else(
            || "(default search)".to_owned(),
            |p| p.display().to_string(),
        );
        // SAFETY: every pointer passed is a NUL-terminated string that outlives the call, an
        // out-pointer to a field of `c`, or `v` with its true length (zeroed, and NUL-terminated
        // by rados_conf_get when it succeeds); handles are used only after their call
        // succeeded, and `c`'s drop releases whatever was created if a later step fails.
        unsafe {
            let r = (api.rados_create2)(&mut c.cluster, c"ceph".as_ptr(), name.as_ptr(), 0);
            if r < 0 {
                c.cluster = ptr::null_mut();
                return Err(step_error(
                    "rados_create2",
                    &format!("client.{}", o.client),
                    r,
                ));
            }
            let r = (api.rados_conf_read_file)(
                c.cluster,
                conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            );
            if r < 0 {
                return Err(step_error("reading ceph.conf", &conf_name, r));
            }
            // Give up connecting after 30 s, not librados' 300 s, so that a daemon whose
            // cluster does not answer says so while starting; a value in the file is kept.
            let mut v = [0 as c_char; 32];
            let r = (api.rados_conf_get)(
                c.cluster,
                c"client_mount_timeout".as_ptr(),
                v.as_mut_ptr(),
                v.len(),
            );
            if r >= 0 && CStr::from_ptr(v.as_ptr()).to_bytes() == b"300" {
                let r = (api.rados_conf_set)(
                    c.cluster,
                    c"client_mount_timeout".as_ptr(),
                    c"30".as_ptr(),
                );
                if r < 0 {
                    return Err(step_error("rados_conf_set", "client_mount_timeout = 30", r));
                }
            }
            // Gateways never cache: every gateway sees every other's writes (README).
            let r = (api.rados_conf_set)(c.cluster, c"rbd_cache".as_ptr(), c"false".as_ptr());
            if r < 0 {
                return Err(step_error("rados_conf_set", "rbd_cache = false", r));
            }
            let r = (api.rados_connect)(c.cluster);
            if r < 0 {
                return Err(step_error("connecting to the cluster of", &conf_name, r));
            }
            let r = (api.rados_ioctx_create)(c.cluster, pool.as_ptr(), &mut c.ioctx);
            if r < 0 {
                c.ioctx = ptr::null_mut();
                return Err(step_error("opening pool", &o.pool, r));
            }
            let what = format!("{}/{}", o.pool, o.image);
            let mut r = (api.rbd_open)(c.ioctx, image.as_ptr(), &mut c.image, ptr::null());
            if r == -libc::ENOENT {
                if let Some(size) = o.create_size {
                    let mut order: c_int = 0;
                    let rc = (api.rbd_create)(c.ioctx, image.as_ptr(), size, &mut order);
                    if rc < 0 && rc != -libc::EEXIST {
                        return Err(step_error("creating image", &what, rc));
                    }
                    r = (api.rbd_open)(c.ioctx, image.as_ptr(), &mut c.image, ptr::null());
                }
            }
            if r < 0 {
                c.image = ptr::null_mut();
                return Err(step_error("opening image", &what, r));
            }
            let mut size = 0u64;
            let r = (api.rbd_get_size)(c.image, &mut size);
            if r < 0 {
                return Err(step_error("rbd_get_size", &what, r));
            }
            Ok((c, size))
        }
    }

    /// `client.<instance id>` and the client's addresses (as `ceph osd blocklist ls` shows
    /// them).
    fn identity(&self) -> (String, String) {
        // SAFETY: `cluster` is connected; rados_getaddrs stores a malloc'd NUL-terminated
        // string (freed here with free) or leaves the pointer null on failure.
        unsafe {
            let id = (self.api.rados_get_instance_id)(self.cluster);
            let mut addrs: *mut c_char = ptr::null_mut();
            let r = (self.api.rados_getaddrs)(self.cluster, &mut addrs);
            let a = if r >= 0 && !addrs.is_null() {
                let s = CStr::from_ptr(addrs).to_string_lossy().into_owned();
                libc::free(addrs.cast());
                s
            } else {
                String::new()
            };
            (format!("client.{id}"), a)
        }
    }

    /// Whether this client holds the exclusive lock.
    fn is_lock_owner(&self) -> Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: `image` is open; `owner` is a valid out-pointer.
        let r = unsafe { (self.api.rbd_is_exclusive_lock_owner)(self.image, &mut owner) };
        if r < 0 {
            return Err(io_error("rbd lock owner", 0, r.into()));
        }
        Ok(owner != 0)
    }

    /// The current holders of the exclusive lock (none when it is free).
    fn lock_owners(&self) -> Result<Vec<String>> {
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; MAX_OWNERS] = [ptr::null_mut(); MAX_OWNERS];
        let mut n: usize = MAX_OWNERS;
        // SAFETY: `owners` has room for `n` pointers, which librbd fills with strings it
        // allocates; those are copied, then released with the matching cleanup call.
        unsafe {
            let r =
                (self.api.rbd_lock_get_owners)(self.image, &mut mode, owners.as_mut_ptr(), &mut n);
            if r == -libc::ENOENT {
                return Ok(Vec::new());
            }
            if r < 0 {
                return Err(io_error("rbd lock owners", 0, r.into()));
            }
            let n = n.min(MAX_OWNERS);
            let list = owners
                .iter()
                .take(n)
                .filter(|p| !p.is_null())
                .map(|p| CStr::from_ptr(*p).to_string_lossy().into_owned())
                .collect();
            (self.api.rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), n);
            Ok(list)
        }
    }

    /// Break every other holder's exclusive lock (blocklisting it), then take it.
    fn take_lock(&self) -> Result<Vec<String>> {
        if self.is_lock_owner()? {
            return Ok(Vec::new());
        }
        let owners = self.lock_owners()?;
        for owner in &owners {
            let c = cstring("lock owner", owner)?;
            // SAFETY: `image` is open and `c` a NUL-terminated string outliving the call.
            let r =
                unsafe { (self.api.rbd_lock_break)(self.image, LOCK_MODE_EXCLUSIVE, c.as_ptr()) };
            // Gone meanwhile: nothing to break.
            if r < 0 && r != -libc::ENOENT {
                return Err(io_error("rbd lock break", 0, r.into()));
            }
        }
        // SAFETY: `image` is open.
        let r = unsafe { (self.api.rbd_lock_acquire)(self.image, LOCK_MODE_EXCLUSIVE) };
        if r < 0 {
            return Err(io_error("rbd lock acquire", 0, r.into()));
        }
        Ok(owners)
    }
}

/// An RBD image as a backstore. See the module documentation.
pub struct RbdBackend {
    opts: RbdOptions,
    /// The current client; replaced by a new one when a fenced client takes the lock again.
    conn: RwLock<Arc<Conn>>,
    size: AtomicU64,
    /// The exclusive lock is ours, as last seen ([`BlockBackend::holds_exclusive`]); shared
    /// with the completions of asynchronous requests.
    held: Arc<AtomicBool>,
    /// Serialises [`BlockBackend::take_exclusive`] (and the reconnect it may do).
    taking: Mutex<()>,
}

impl std::fmt::Debug for RbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdBackend")
            .field("pool", &self.opts.pool)
            .field("image", &self.opts.image)
            .field("size", &self.size())
            .finish()
    }
}

impl RbdBackend {
    /// Connect to the cluster and open the image (see [`RbdOptions`]).
    pub fn open(opts: RbdOptions) -> Result<Self> {
        let (conn, size) = Conn::open(&opts)?;
        check_range(0, size, crate::MAX_SIZE)?;
        Ok(Self {
            opts,
            conn: RwLock::new(Arc::new(conn)),
            size: AtomicU64::new(size),
            held: Arc::new(AtomicBool::new(false)),
            taking: Mutex::new(()),
        })
    }

    /// The options it was opened with.
    pub fn options(&self) -> &RbdOptions {
        &self.opts
    }

    /// The current client's name (`client.<id>`) and addresses (as `ceph osd blocklist ls`
    /// lists them).
    pub fn client(&self) -> (String, String) {
        self.conn().identity()
    }

    /// Whether this client holds the image's exclusive lock.
    pub fn holds_lock(&self) -> Result<bool> {
        self.conn().is_lock_owner()
    }

    fn conn(&self) -> Arc<Conn> {
        Arc::clone(&self.conn.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Note a fenced answer: the lock is no longer ours.
    fn seen<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(BackstoreError::Fenced { .. }) = &r {
            self.held.store(false, Ordering::Release);
        }
        r
    }

    fn writable(&self, op: &'static str) -> Result<()> {
        if self.opts.read_only {
            return Err(BackstoreError::ReadOnly { op });
        }
        Ok(())
    }

    /// Run `f(offset, len)` over `offset..offset + len` in pieces of at most [`MAX_IO`].
    fn chunked(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut at = offset;
        let end = offset.saturating_add(len);
        while at < end {
            let n = (end - at).min(MAX_IO);
            f(at, n)?;
            at += n;
        }
        Ok(())
    }

    fn zero(&self, op: &'static str, offset: u64, len: u64, flags: c_int) -> Result<()> {
        self.writable(op)?;
        check_range(offset, len, self.size())?;
        let c = self.conn();
        let r = self.chunked(offset, len, |at, n| {
            let n = usize::try_from(n).map_err(|_| io_error(op, at, -i64::from(libc::EINVAL)))?;
            // SAFETY: `image` is open; no buffer is passed.
            let r = unsafe { (c.api.rbd_write_zeroes)(c.image, at, n, flags, 0) };
            if r < 0 {
                return Err(io_error(op, at, i64::try_from(r).unwrap_or(-1)));
            }
            Ok(())
        });
        self.seen(r)
    }

    /// The mapped runs `rbd_diff_iterate2` reports in `offset..end`, sorted.
    fn mapped_runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        extern "C" fn collect(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            if exists != 0 {
                // SAFETY: `arg` is the `&mut Vec` passed to rbd_diff_iterate2 below, alive and
                // not otherwise borrowed while librbd calls back (synchronously, one call at a
                // time).
                let runs = unsafe { &mut *arg.cast::<Vec<(u64, u64)>>() };
                runs.push((off, u64::try_from(len).unwrap_or(u64::MAX)));
            }
            0
        }
        let c = self.conn();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        // SAFETY: `image` is open; `collect` matches librbd's callback type and `runs`
        // outlives the call, which returns only after its last callback.
        let r = unsafe {
            (c.api.rbd_diff_iterate2)(
                c.image,
                ptr::null(),
                offset,
                len,
                1,
                0,
                collect,
                ptr::from_mut(&mut runs).cast(),
            )
        };
        if r < 0 {
            return Err(io_error("extents", offset, r.into()));
        }
        runs.sort_unstable();
        Ok(runs)
    }
}

/// What an asynchronous request owns until librbd completes it: its buffer and completer.
enum Owned {
    /// The buffer librbd reads into.
    Read(Vec<u8>, IoCompleter<Bytes>),
    /// The data librbd writes from.
    Write(Bytes, IoCompleter<()>),
    Flush(IoCompleter<()>),
}

/// One asynchronous request, handed to librbd as its completion's argument.
struct Aio {
    api: &'static Api,
    /// The client it was submitted on, kept open until it completes.
    conn: Option<Arc<Conn>>,
    held: Arc<AtomicBool>,
    op: &'static str,
    offset: u64,
    owned: Owned,
}

impl Aio {
    /// Complete the future with librbd's return value `r` (bytes read for a read, 0 for a
    /// write or flush, or `-errno`).
    fn finish(self, r: isize) {
        let Aio {
            held,
            op,
            offset,
            owned,
            ..
        } = self;
        let failed = (r < 0).then(|| {
            let e = io_error(op, offset, i64::try_from(r).unwrap_or(-1));
            if matches!(e, BackstoreError::Fenced { .. }) {
                held.store(false, Ordering::Release);
            }
            e
        });
        match owned {
            Owned::Read(buf, done) => done.complete(match failed {
                Some(e) => Err(e),
                None if usize::try_from(r).ok() == Some(buf.len()) => Ok(Bytes::from(buf)),
                None => Err(BackstoreError::Io {
                    op,
                    offset,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short read: {r} of {} bytes", buf.len()),
                    ),
                }),
            }),
            Owned::Write(_, done) | Owned::Flush(done) => done.complete(match failed {
                Some(e) => Err(e),
                None => Ok(()),
            }),
        }
    }
}

/// librbd's completion callback for every [`Aio`].
extern "C" fn aio_done(c: CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<Aio>` that `submit` leaked for this completion alone, and
    // librbd calls this callback exactly once per completion; nothing else frees it.
    let mut req = unsafe { Box::from_raw(arg.cast::<Aio>()) };
    let api = req.api;
    // SAFETY: `c` is this request's completion, complete now; it is released once, here.
    let r = unsafe {
        let r = (api.rbd_aio_get_return_value)(c);
        (api.rbd_aio_release)(c);
        r
    };
    let conn = req.conn.take();
    req.finish(r);
    // A client replaced meanwhile whose last user this was: close it on a thread of its own
    // (closing an image from its own callback thread would wait for that thread).
    if let Some(last) = conn.and_then(Arc::into_inner) {
        let _ = std::thread::Builder::new()
            .name("rbd-close".into())
            .spawn(move || drop(last));
    }
}

impl RbdBackend {
    /// Hand `owned` to librbd with `go(image, buffer pointer, completion)`; the future it
    /// completes is the caller's.
    fn submit(
        &self,
        op: &'static str,
        offset: u64,
        owned: Owned,
        go: impl FnOnce(&Api, ImageT, *mut c_char, CompletionT) -> c_int,
    ) {
        let conn = self.conn();
        let api = conn.api;
        let image = conn.image;
        let mut req = Box::new(Aio {
            api,
            conn: Some(conn),
            held: Arc::clone(&self.held),
            op,
            offset,
            owned,
        });
        // The buffer's address is stable: the Vec's or Bytes' heap block, owned by `req`
        // until the callback runs.
        let buf: *mut c_char = match &mut req.owned {
            Owned::Read(v, _) => v.as_mut_ptr().cast(),
            Owned::Write(b, _) => b.as_ptr().cast_mut().cast(),
            Owned::Flush(_) => ptr::null_mut(),
        };
        let raw = Box::into_raw(req);
        let mut c: CompletionT = ptr::null_mut();
        // SAFETY: `raw` stays valid until `aio_done` reclaims it (or until it is reclaimed
        // below when nothing was submitted); `aio_done` matches librbd's callback type.
        let r = unsafe { (api.rbd_aio_create_completion)(raw.cast(), aio_done, &mut c) };
        if r < 0 {
            // SAFETY: no completion exists, so `raw` is still ours alone.
            let req = unsafe { Box::from_raw(raw) };
            req.finish(r.try_into().unwrap_or(-1));
            return;
        }
        let r = go(api, image, buf, c);
        if r < 0 {
            // Not submitted: librbd will not call back.
            // SAFETY: `c` was created above and never submitted; `raw` is ours alone again.
            let req = unsafe {
                (api.rbd_aio_release)(c);
                Box::from_raw(raw)
            };
            req.finish(r.try_into().unwrap_or(-1));
        }
    }
}

impl BlockBackend for RbdBackend {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        check_range(offset, len64, self.size())?;
        let mut buf = vec![0u8; len];
        let c = self.conn();
        let mut done = 0usize;
        let r = self.chunked(offset, len64, |at, n| {
            let n =
                usize::try_from(n).map_err(|_| io_error("read", at, -i64::from(libc::EINVAL)))?;
            let dst = buf
                .get_mut(done..done.saturating_add(n))
                .ok_or_else(|| io_error("read", at, -i64::from(libc::EINVAL)))?;
            // SAFETY: `image` is open and `dst` is a writable buffer of exactly `n` bytes,
            // borrowed for the whole (synchronous) call.
            let r = unsafe { (c.api.rbd_read)(c.image, at, n, dst.as_mut_ptr().cast()) };
            if r < 0 {
                return Err(io_error("read", at, i64::try_from(r).unwrap_or(-1)));
            }
            if usize::try_from(r).ok() != Some(n) {
                return Err(BackstoreError::Io {
                    op: "read",
                    offset: at,
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short read: {r} of {n} bytes"),
                    ),
                });
            }
            done += n;
            Ok(())
        });
        self.seen(r)?;
        Ok(Bytes::from(buf))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.writable("write")?;
        let len64 = u64::try_from(data.len()).unwrap_or(u64::MAX);
        check_range(offset, len64, self.size())?;
        let c = self.conn();
        let flags = if fua { OP_FLAG_FUA } else { 0 };
        let mut done = 0usize;
        let r = self.chunked(offset, len64, |at, n| {
            let n =
                usize::try_from(n).map_err(|_| io_error("write", at, -i64::from(libc::EINVAL)))?;
            let src = data
                .get(done..done.saturating_add(n))
                .ok_or_else(|| io_error("write", at, -i64::from(libc::EINVAL)))?;
            // SAFETY: `image` is open and `src` is `n` readable bytes borrowed for the whole
            // (synchronous) call; librbd copies what it keeps.
            let r = unsafe { (c.api.rbd_write2)(c.image, at, n, src.as_ptr().cast(), flags) };
            if r < 0 {
                return Err(io_error("write", at, i64::try_from(r).unwrap_or(-1)));
            }
            if usize::try_from(r).ok() != Some(n) {
                return Err(BackstoreError::Io {
                    op: "write",
                    offset: at,
                    source: io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short write: {r} of {n} bytes"),
                    ),
                });
            }
            done += n;
            Ok(())
        });
        self.seen(r)
    }

    fn flush(&self) -> Result<()> {
        let c = self.conn();
        // SAFETY: `image` is open.
        let r = unsafe { (c.api.rbd_flush)(c.image) };
        if r < 0 {
            return self.seen(Err(io_error("flush", 0, r.into())));
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let flags = if unmap { 0 } else { WRITE_ZEROES_THICK };
        self.zero("write zeroes", offset, len, flags)
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.zero("unmap", offset, len, 0)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = check_range(offset, len, self.size())?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |o: u64, l: u64, mapped: bool| {
            if l == 0 {
                return;
            }
            match out.last_mut() {
                Some(e) if e.mapped == mapped && e.offset.saturating_add(e.len) == o => {
                    e.len = e.len.saturating_add(l);
                }
                _ => out.push(Extent {
                    offset: o,
                    len: l,
                    mapped,
                }),
            }
        };
        let mut at = offset;
        for (o, l) in self.mapped_runs(offset, len)? {
            let s = o.max(at);
            let e = o.saturating_add(l).min(end);
            if e <= s {
                continue;
            }
            push(at, s - at, false);
            push(s, e - s, true);
            at = e;
        }
        push(at, end - at, false);
        Ok(out)
    }

    fn thin_provisioning(&self) -> bool {
        true
    }

    fn is_async(&self) -> bool {
        true
    }

    fn read_async(&self, offset: u64, len: usize) -> IoFuture<Bytes> {
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        if let Err(e) = check_range(offset, len64, self.size()) {
            return IoFuture::ready(Err(e));
        }
        if len64 > MAX_IO || len == 0 {
            return IoFuture::ready(self.read(offset, len));
        }
        let (fut, done) = IoFuture::pending();
        self.submit(
            "read",
            offset,
            Owned::Read(vec![0u8; len], done),
            |api, image, buf, c| {
                // SAFETY: `image` is open (its client is held by the request), `buf` is the
                // request's `len`-byte buffer, alive until the completion's callback.
                unsafe { (api.rbd_aio_read)(image, offset, len, buf, c) }
            },
        );
        fut
    }

    fn write_async(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<()> {
        if let Err(e) = self.writable("write") {
            return IoFuture::ready(Err(e));
        }
        let len = data.len();
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        if let Err(e) = check_range(offset, len64, self.size()) {
            return IoFuture::ready(Err(e));
        }
        if len64 > MAX_IO || len == 0 {
            return IoFuture::ready(self.write(offset, &data, fua));
        }
        let flags = if fua { OP_FLAG_FUA } else { 0 };
        let (fut, done) = IoFuture::pending();
        self.submit(
            "write",
            offset,
            Owned::Write(data, done),
            |api, image, buf, c| {
                // SAFETY: `image` is open (its client is held by the request); `buf` points at
                // the request's `len` bytes, alive and unchanged until the completion's callback.
                unsafe { (api.rbd_aio_write2)(image, offset, len, buf.cast_const(), c, flags) }
            },
        );
        fut
    }

    fn flush_async(&self) -> IoFuture<()> {
        let (fut, done) = IoFuture::pending();
        self.submit("flush", 0, Owned::Flush(done), |api, image, _, c| {
            // SAFETY: `image` is open (its client is held by the request).
            unsafe { (api.rbd_aio_flush)(image, c) }
        });
        fut
    }

    fn release_exclusive(&self) -> Result<()> {
        self.held.store(false, Ordering::Release);
        if self.opts.read_only {
            return Ok(());
        }
        let _one = self.taking.lock().unwrap_or_else(PoisonError::into_inner);
        let c = self.conn();
        // A fenced client holds nothing to give up.
        match c.is_lock_owner() {
            Ok(true) => {}
            Ok(false) | Err(BackstoreError::Fenced { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        // SAFETY: `image` is open. librbd completes the writes in flight before it releases.
        let r = unsafe { (c.api.rbd_lock_release)(c.image) };
        if r < 0 && r != -libc::ESHUTDOWN {
            return Err(io_error("rbd lock release", 0, r.into()));
        }
        Ok(())
    }

    fn holds_exclusive(&self) -> bool {
        self.opts.read_only || self.held.load(Ordering::Acquire)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.writable("resize")?;
        if !check_resize(self.size(), new_size)? {
            return Ok(());
        }
        let c = self.conn();
        // SAFETY: `image` is open.
        let r = unsafe { (c.api.rbd_resize)(c.image, new_size) };
        if r < 0 {
            return Err(io_error("resize", new_size, r.into()));
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn take_exclusive(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _one = self.taking.lock().unwrap_or_else(PoisonError::into_inner);
        let started = std::time::Instant::now();
        let c = self.conn();
        let mut features = 0u64;
        // SAFETY: `image` is open; `features` is a valid out-pointer.
        let r = unsafe { (c.api.rbd_get_features)(c.image, &mut features) };
        if r < 0 {
            return Err(io_error("rbd features", 0, r.into()));
        }
        if features & FEATURE_EXCLUSIVE_LOCK == 0 {
            return Err(BackstoreError::Io {
                op: "rbd lock acquire",
                offset: 0,
                source: io::Error::other(format!(
                    "image {}/{} lacks the exclusive-lock feature (rbd feature enable {}/{} exclusive-lock)",
                    self.opts.pool, self.opts.image, self.opts.pool, self.opts.image
                )),
            });
        }
        let broken = match c.take_lock() {
            Err(BackstoreError::Fenced { .. }) => {
                // This client was fenced by another one's take-over: connect anew.
                let (fresh, size) = Conn::open(&self.opts)?;
                let (name, addrs) = fresh.identity();
                tracing::warn!(pool = %self.opts.pool, image = %self.opts.image, client = %name, %addrs, "rbd: this client was fenced; connected again");
                let broken = fresh.take_lock()?;
                self.size.fetch_max(size, Ordering::AcqRel);
                *self.conn.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(fresh);
                broken
            }
            r => r?,
        };
        self.held.store(true, Ordering::Release);
        if !broken.is_empty() {
            tracing::warn!(pool = %self.opts.pool, image = %self.opts.image, owners = ?broken, took = ?started.elapsed(), "rbd: broke the exclusive lock of another client (librbd blocklists it unless it had released the lock meanwhile)");
        }
        Ok(())
    }
}
