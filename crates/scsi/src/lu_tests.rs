//! In-memory command flows.
