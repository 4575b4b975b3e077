//! Ownership and handover scenarios through the LU (semantics.md §3.2-§3.5).
