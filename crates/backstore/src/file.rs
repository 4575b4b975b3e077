//! File backstore.
