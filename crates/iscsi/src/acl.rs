//! Access control: which initiators may log in to a target, which of its LUNs each one sees,
//! and how many sessions the portal admits.
//!
//! Initiator names are compared after case folding, the part of the RFC 3722 stringprep
//! profile that applies to the ASCII names initiators send (RFC 7143 §4.2.7.1: names are
//! case-insensitive). Patterns add `*` (any run of characters, possibly empty) and `?` (one
//! character); there is no escape, since neither character is valid in an iSCSI name.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Longest iSCSI name (RFC 7143 §4.2.7.1: 223 bytes). Longer peer names match nothing.
pub const MAX_NAME_LEN: usize = 223;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    Empty,
    TooLong,
    /// Whitespace or control characters, which no iSCSI name contains (RFC 3722 §6).
    BadCharacter(char),
}

impl std::fmt::Display for PatternError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PatternError::Empty => write!(f, "empty initiator name or pattern"),
            PatternError::TooLong => {
                write!(f, "longer than {MAX_NAME_LEN} bytes (RFC 7143 §4.2.7.1)")
            }
            PatternError::BadCharacter(c) => write!(f, "character {c:?} is not allowed"),
        }
    }
}

impl std::error::Error for PatternError {}

/// An initiator name or a `*`/`?` glob over names, matched case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    text: String,
    folded: Vec<char>,
    wild: bool,
}

impl NamePattern {
    /// Parse a name or pattern: 1 to [`MAX_NAME_LEN`] bytes, no whitespace or controls.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_NAME_LEN {
            return Err(PatternError::TooLong);
        }
        if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::BadCharacter(c));
        }
        Ok(NamePattern {
            text: text.to_string(),
            folded: fold(text),
            wild: text.contains(['*', '?']),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern has wildcards (an exact name otherwise).
    pub fn is_wildcard(&self) -> bool {
        self.wild
    }

    /// Whether `name` matches. Names longer than [`MAX_NAME_LEN`] never match.
    pub fn matches(&self, name: &str) -> bool {
        if name.len() > MAX_NAME_LEN {
            return false;
        }
        glob(&self.folded, &fold(name))
    }
}

fn fold(s: &str) -> Vec<char> {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// Glob match with one backtrack point (the last `*`): O(pattern × name), no recursion.
fn glob(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    // Position after the last `*` seen, and the name position it currently absorbs up to.
    let mut star: Option<(usize, usize)> = None;
    loop {
        match (pattern.get(p), name.get(n)) {
            (Some('*'), _) => {
                p += 1;
                star = Some((p, n));
            }
            (Some(pc), Some(nc)) if *pc == '?' || pc == nc => {
                p += 1;
                n += 1;
            }
            (None, None) => return true,
            _ => match star {
                // Let the last `*` absorb one more character and retry from there.
                Some((sp, sn)) if sn < name.len() => {
                    star = Some((sp, sn + 1));
                    p = sp;
                    n = sn + 1;
                }
                _ => return false,
            },
        }
    }
}

/// Who may log in to a target (RFC 7143 §11.13.5: others get AUTHORIZATION FAILURE, 0202).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acl {
    /// `None`: everyone; an empty list: nobody.
    allowed: Option<Vec<NamePattern>>,
}

impl Acl {
    /// Every initiator may log in (the default).
    pub fn allow_all() -> Self {
        Acl { allowed: None }
    }

    /// Only initiators matching one of `patterns` (none, if it is empty).
    pub fn allow_only(patterns: Vec<NamePattern>) -> Self {
        Acl {
            allowed: Some(patterns),
        }
    }

    /// The allowed patterns; `None`: everyone.
    pub fn patterns(&self) -> Option<&[NamePattern]> {
        self.allowed.as_deref()
    }

    /// Whether `initiator` may log in.
    pub fn allows(&self, initiator: &str) -> bool {
        match &self.allowed {
            None => true,
            Some(list) => list.iter().any(|p| p.matches(initiator)),
        }
    }
}

/// Per-initiator LUN masking of one target: rules of (initiator pattern, visible LUNs). An
/// exact-name rule wins over patterns, else the first matching pattern in order; an initiator
/// no rule matches sees every LUN.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LunMasking {
    rules: Vec<(NamePattern, Vec<u64>)>,
}

impl LunMasking {
    pub fn new(rules: Vec<(NamePattern, Vec<u64>)>) -> Self {
        LunMasking { rules }
    }

    /// The LUNs `initiator` may see, or `None` for all of them.
    pub fn visible(&self, initiator: &str) -> Option<&[u64]> {
        let exact = self
            .rules
            .iter()
            .find(|(p, _)| !p.is_wildcard() && p.matches(initiator));
        exact
            .or_else(|| self.rules.iter().find(|(p, _)| p.matches(initiator)))
            .map(|(_, luns)| luns.as_slice())
    }
}

/// Default session limit per target.
pub const DEFAULT_MAX_SESSIONS_PER_TARGET: usize = 256;
/// Default session limit for the whole daemon.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;

/// Live-session counters, shared by every connection of a daemon: a total and one per
/// target. A login beyond a limit is refused with OUT OF RESOURCES (0302, RFC 7143
/// §11.13.5). Discovery sessions count toward the total only.
#[derive(Debug)]
pub struct SessionLimits {
    total: Counter,
    /// By case-folded target name.
    targets: Vec<(String, Counter)>,
}

#[derive(Debug)]
struct Counter {
    live: AtomicUsize,
    max: usize,
}

impl Counter {
    fn new(max: usize) -> Self {
        Counter {
            live: AtomicUsize::new(0),
            max,
        }
    }

    fn try_acquire(&self) -> bool {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n.saturating_add(1))
            })
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// Which limit refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    Total,
    Target,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits::new(DEFAULT_MAX_SESSIONS)
    }
}

impl SessionLimits {
    /// At most `max_total` sessions; targets not added with [`SessionLimits::with_target`]
    /// have no limit of their own.
    pub fn new(max_total: usize) -> Self {
        SessionLimits {
            total: Counter::new(max_total),
            targets: Vec::new(),
        }
    }

    /// Limit `target` to `max` sessions.
    #[must_use]
    pub fn with_target(mut self, target: &str, max: usize) -> Self {
        let key = target.to_lowercase();
        self.targets.retain(|(t, _)| *t != key);
        self.targets.push((key, Counter::new(max)));
        self
    }

    fn index_of(&self, target: &str) -> Option<usize> {
        self.targets
            .iter()
            .position(|(t, _)| t.eq_ignore_ascii_case(target))
    }

    /// Take a slot for a session to `target` (`None`: a discovery session). The slot is
    /// given back when the returned guard drops.
    pub fn acquire(self: &Arc<Self>, target: Option<&str>) -> Result<SessionSlot, SessionRefusal> {
        if !self.total.try_acquire() {
            return Err(SessionRefusal::Total);
        }
        let index = target.and_then(|t| self.index_of(t));
        if let Some(i) = index {
            if !self.targets.get(i).is_some_and(|(_, c)| c.try_acquire()) {
                self.total.release();
                return Err(SessionRefusal::Target);
            }
        }
        Ok(SessionSlot {
            limits: self.clone(),
            target: index,
        })
    }

    /// Live sessions in total.
    pub fn live(&self) -> usize {
        self.total.live.load(Ordering::Acquire)
    }

    /// Live sessions to `target`, if it has a limit.
    pub fn live_for(&self, target: &str) -> Option<usize> {
        self.index_of(target)
            .and_then(|i| self.targets.get(i))
            .map(|(_, c)| c.live.load(Ordering::Acquire))
    }
}

/// One admitted session; dropping it releases its counts.
#[derive(Debug)]
pub struct SessionSlot {
    limits: Arc<SessionLimits>,
    target: Option<usize>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        if let Some((_, c)) = self.target.and_then(|i| self.limits.targets.get(i)) {
            c.release();
        }
        self.limits.total.release();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn pat(s: &str) -> NamePattern {
        NamePattern::parse(s).unwrap()
    }

    #[test]
    fn pattern_table() {
        let cases: &[(&str, &str, bool)] = &[
            (
                "iqn.2026-11.io.example:host1",
                "iqn.2026-11.io.example:host1",
                true,
            ),
            (
                "iqn.2026-11.io.example:host1",
                "IQN.2026-11.IO.Example:Host1",
                true,
            ),
            (
                "IQN.2026-11.io.example:HOST1",
                "iqn.2026-11.io.example:host1",
                true,
            ),
            (
                "iqn.2026-11.io.example:host1",
                "iqn.2026-11.io.example:host10",
                false,
            ),
            (
                "iqn.2026-11.io.example:host1",
                "iqn.2026-11.io.example:host",
                false,
            ),
            (
                "iqn.1994-05.com.redhat:*",
                "iqn.1994-05.com.redhat:abc123",
                true,
            ),
            ("iqn.1994-05.com.redhat:*", "iqn.1994-05.com.redhat:", true),
            (
                "iqn.1994-05.com.redhat:*",
                "iqn.1994-05.com.redhatx:abc",
                false,
            ),
            ("iqn.*.example:host?", "iqn.2026-11.io.example:host7", true),
            (
                "iqn.*.example:host?",
                "iqn.2026-11.io.example:host77",
                false,
            ),
            ("*", "anything", true),
            ("*", "", true),
            ("*host*", "iqn.x:a-host-b", true),
            ("*a*b*c", "xaxbxbxc", true),
            ("*a*b*c", "xaxbxbxcx", false),
            ("a?c", "ac", false),
            ("a?c", "abc", true),
            ("**", "", true),
        ];
        for (p, n, want) in cases {
            assert_eq!(pat(p).matches(n), *want, "{p} vs {n}");
        }
    }

    #[test]
    fn rejects_bad_patterns() {
        assert_eq!(NamePattern::parse(""), Err(PatternError::Empty));
        assert_eq!(
            NamePattern::parse(&"a".repeat(224)),
            Err(PatternError::TooLong)
        );
        assert_eq!(
            NamePattern::parse("iqn.x: host"),
            Err(PatternError::BadCharacter(' '))
        );
        assert!(NamePattern::parse(&"a".repeat(223)).is_ok());
    }

    #[test]
    fn overlong_names_match_nothing() {
        assert!(!pat("*").matches(&"a".repeat(224)));
    }

    #[test]
    fn pathological_pattern_is_fast() {
        // Backtracking over one `*` at a time keeps this quadratic at worst.
        let p = pat(&format!("{}b", "*a".repeat(100)));
        assert!(!p.matches(&"a".repeat(223)));
    }

    #[test]
    fn acl_absent_empty_and_listed() {
        assert!(Acl::allow_all().allows("iqn.x:any"));
        assert!(Acl::default().allows("iqn.x:any"));
        assert!(!Acl::allow_only(Vec::new()).allows("iqn.x:any"));
        let acl = Acl::allow_only(vec![pat("iqn.x:a"), pat("iqn.y:*")]);
        assert!(acl.allows("IQN.X:A"));
        assert!(acl.allows("iqn.y:b"));
        assert!(!acl.allows("iqn.x:b"));
    }

    #[test]
    fn lun_masking_prefers_exact_then_first_pattern() {
        let m = LunMasking::new(vec![
            (pat("iqn.x:*"), vec![1]),
            (pat("iqn.x:h?"), vec![2]),
            (pat("iqn.x:host1"), vec![0, 2]),
        ]);
        assert_eq!(m.visible("iqn.x:HOST1"), Some(&[0, 2][..]));
        assert_eq!(m.visible("iqn.x:h2"), Some(&[1][..]));
        assert_eq!(m.visible("iqn.y:h2"), None);
        assert_eq!(LunMasking::default().visible("iqn.y:h2"), None);
    }

    #[test]
    fn session_limits_count_and_release() {
        let l = Arc::new(SessionLimits::new(3).with_target("iqn.t:a", 2));
        let a1 = l.acquire(Some("iqn.t:a")).unwrap();
        let a2 = l.acquire(Some("IQN.T:A")).unwrap();
        assert_eq!(
            l.acquire(Some("iqn.t:a")).err(),
            Some(SessionRefusal::Target)
        );
        assert_eq!(
            l.live(),
            2,
            "a refused target slot gives back its total slot"
        );
        let d = l.acquire(None).unwrap();
        assert_eq!(
            l.acquire(Some("iqn.t:other")).err(),
            Some(SessionRefusal::Total)
        );
        assert_eq!(l.live_for("iqn.t:a"), Some(2));
        drop(a1);
        assert_eq!(l.live_for("iqn.t:a"), Some(1));
        let a3 = l.acquire(Some("iqn.t:a")).unwrap();
        drop((a2, a3, d));
        assert_eq!((l.live(), l.live_for("iqn.t:a")), (0, Some(0)));
        assert_eq!(l.live_for("iqn.t:none"), None);
    }

    #[test]
    fn zero_limit_refuses_everything() {
        let l = Arc::new(SessionLimits::new(0));
        assert_eq!(l.acquire(None).err(), Some(SessionRefusal::Total));
        assert_eq!(l.live(), 0);
    }

    #[test]
    fn concurrent_acquire_never_exceeds_the_limit() {
        let l = Arc::new(SessionLimits::new(5));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut held = 0;
                    for _ in 0..1000 {
                        if let Ok(s) = l.acquire(None) {
                            assert!(l.live() <= 5);
                            held += 1;
                            drop(s);
                        }
                    }
                    held
                })
            })
            .collect();
        let total: i32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(total > 0);
        assert_eq!(l.live(), 0);
    }
}
