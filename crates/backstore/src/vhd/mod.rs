//! VHD images (Microsoft Virtual Hard Disk Image Format Specification v1.0; QEMU's `vpc`
//! driver), as a format over a [`Store`]: see `reference/semantics.md` §4.
//!
//! - [`footer`], [`header`], [`bat`]: parsing and validation, each error naming its field.
//! - [`VhdBackend`]: fixed and dynamic disks as a [`BlockBackend`](crate::BlockBackend); the
//!   crash-safe block allocation order is documented on [`image`].
//! - [`create_fixed`] / [`create_dynamic`]: images `qemu-img -f vpc` opens.
//!
//! Differencing disks are parsed but not served yet ([`VhdError::Unsupported`]).

pub mod bat;
pub mod check;
pub mod footer;
pub mod header;
pub mod image;
pub mod store;
#[cfg(test)]
mod tests;

pub use footer::{DiskType, Footer, Geometry};
pub use header::DynamicHeader;
pub use image::{create_dynamic, create_fixed, CreateOptions, VhdBackend, VhdInfo};
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
