//! RAM backstore.
