//! Login phase (RFC 7143 §6, §11.12–11.13): stages, status classes, the target's login state machine.

/// Login status class and detail (§11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    pub const SUCCESS: Self = Self { class: 0, detail: 0 };
    pub const TARGET_MOVED_TEMPORARILY: Self = Self { class: 1, detail: 1 };
    pub const INITIATOR_ERROR: Self = Self { class: 2, detail: 0 };
    pub const AUTHENTICATION_FAILURE: Self = Self { class: 2, detail: 1 };
    pub const AUTHORIZATION_FAILURE: Self = Self { class: 2, detail: 2 };
    pub const NOT_FOUND: Self = Self { class: 2, detail: 3 };
    pub const TARGET_REMOVED: Self = Self { class: 2, detail: 4 };
    pub const UNSUPPORTED_VERSION: Self = Self { class: 2, detail: 5 };
    pub const TOO_MANY_CONNECTIONS: Self = Self { class: 2, detail: 6 };
    pub const MISSING_PARAMETER: Self = Self { class: 2, detail: 7 };
    pub const CANT_INCLUDE_IN_SESSION: Self = Self { class: 2, detail: 8 };
    pub const SESSION_TYPE_NOT_SUPPORTED: Self = Self { class: 2, detail: 9 };
    pub const SESSION_DOES_NOT_EXIST: Self = Self { class: 2, detail: 0x0a };
    pub const INVALID_DURING_LOGIN: Self = Self { class: 2, detail: 0x0b };
    pub const TARGET_ERROR: Self = Self { class: 3, detail: 0 };
    pub const SERVICE_UNAVAILABLE: Self = Self { class: 3, detail: 1 };
    pub const OUT_OF_RESOURCES: Self = Self { class: 3, detail: 2 };
}
