//! Async iSCSI initiator.
