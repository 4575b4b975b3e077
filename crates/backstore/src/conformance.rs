//! Shared conformance suite.
