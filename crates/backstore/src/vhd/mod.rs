//! VHD images (Microsoft Virtual Hard Disk Image Format Specification v1.0; QEMU's `vpc`
//! driver), as a format over a [`Store`]: see `reference/semantics.md` §4.
//!
//! - [`footer`], [`header`], [`bat`], [`locator`]: parsing and validation, each error naming
//!   its field.
//! - [`VhdBackend`]: fixed, dynamic and differencing disks as a
//!   [`BlockBackend`](crate::BlockBackend); the crash-safe block allocation order and the
//!   differencing read/write rules are documented on [`image`], parent resolution on
//!   [`VhdBackend::open`].
//! - [`create_fixed`] / [`create_dynamic`]: images `qemu-img -f vpc` opens;
//!   [`create_differencing`]: a child of an existing image (libvhdi reads it with its parent).

pub mod bat;
pub mod check;
pub mod footer;
pub mod header;
pub mod image;
pub mod locator;
pub mod store;
#[cfg(test)]
mod tests;

pub use footer::{DiskType, Footer, Geometry};
pub use header::DynamicHeader;
pub use image::{
    create_differencing, create_dynamic, create_fixed, CreateOptions, VhdBackend, VhdInfo,
    MAX_CHAIN_DEPTH,
};
pub use locator::Locator;
pub use store::{MemStore, Store};

use crate::BackstoreError;

/// Why an image was refused or an operation on it failed.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// A footer field is invalid (§4.1).
    #[error("VHD footer {field}: {reason}")]
    Footer { field: &'static str, reason: String },
    /// A dynamic header field is invalid (§4.2).
    #[error("VHD dynamic header {field}: {reason}")]
    Header { field: &'static str, reason: String },
    /// A BAT entry is invalid (§4.3).
    #[error("VHD BAT entry {index}: {reason}")]
    Bat { index: u32, reason: String },
    /// The file as a whole is unusable (too short, truncated data area).
    #[error("VHD file: {reason}")]
    File { reason: String },
    /// A parent locator entry or its data is invalid (§4.2 offset 576).
    #[error("VHD parent locator {index} {field}: {reason}")]
    Locator {
        index: usize,
        field: &'static str,
        reason: String,
    },
    /// The parent of a differencing disk cannot be used: not found (the message lists every
    /// place tried), a loop, a chain too deep, or a parent given where none belongs.
    #[error("VHD parent: {reason}")]
    Parent { reason: String },
    /// The parent found is not the one the child was made from (§4.2 offset 40).
    #[error(
        "VHD parent {path}: unique id {} does not match the child's parent unique id {}",
        uuid(found),
        uuid(want)
    )]
    ParentMismatch {
        path: std::path::PathBuf,
        want: [u8; 16],
        found: [u8; 16],
    },
    /// The parent was found but could not be opened.
    #[error("VHD parent {path}: {source}")]
    ParentOpen {
        path: std::path::PathBuf,
        #[source]
        source: Box<VhdError>,
    },
    /// A valid image of a kind not served (yet).
    #[error("{0} VHDs are not supported")]
    Unsupported(&'static str),
    /// A creation parameter is out of range.
    #[error("VHD create {field}: {reason}")]
    Create { field: &'static str, reason: String },
    #[error("{op} at {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

impl From<VhdError> for BackstoreError {
    fn from(e: VhdError) -> Self {
        match e {
            VhdError::Io { op, offset, source } => BackstoreError::Io { op, offset, source },
            other => BackstoreError::Io {
                op: "vhd",
                offset: 0,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
            },
        }
    }
}

/// A unique id in the usual 8-4-4-4-12 hex form (bytes in stored order, as libvhdi prints
/// the footer's id).
pub fn uuid(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let part = |r: std::ops::Range<usize>| hex.get(r).unwrap_or_default().to_owned();
    format!(
        "{}-{}-{}-{}-{}",
        part(0..8),
        part(8..12),
        part(12..16),
        part(16..20),
        part(20..32)
    )
}

/// `N` bytes at `at`, if present.
pub(crate) fn field<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    let src = b.get(at..at.checked_add(N)?)?;
    let mut out = [0u8; N];
    out.copy_from_slice(src);
    Some(out)
}

pub(crate) fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    field::<2>(b, at).map(u16::from_be_bytes)
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    field::<4>(b, at).map(u32::from_be_bytes)
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    field::<8>(b, at).map(u64::from_be_bytes)
}
