//! Random PERSISTENT RESERVE OUT sequences from four I_T nexuses (two of them ports of one
//! initiator name with different ISIDs) against a small independent reference model of
//! SPC-4 §5.13: after each step the status, READ KEYS and READ RESERVATION must agree.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use proptest::prelude::*;

use super::sa;
use super::tests::{A, A2, B, C, F};
use crate::status;

const NEXUSES: [u64; 4] = [A, A2, B, C];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Good,
    Conflict,
    Check,
}

#[derive(Debug, Default)]
struct Model {
    /// (nexus index, key), in registration order.
    regs: Vec<(usize, u64)>,
    /// (holder nexus index, type).
    res: Option<(usize, u8)>,
}

fn all_reg(ty: u8) -> bool {
    ty >= 7
}

impl Model {
    fn key(&self, n: usize) -> Option<u64> {
        self.regs.iter().find(|r| r.0 == n).map(|r| r.1)
    }

    fn holds(&self, n: usize) -> bool {
        match self.res {
            Some((h, ty)) => h == n || (all_reg(ty) && self.key(n).is_some()),
            None => false,
        }
    }

    fn unregister(&mut self, n: usize) {
        self.regs.retain(|r| r.0 != n);
        if let Some((h, ty)) = self.res {
            if (all_reg(ty) && self.regs.is_empty()) || (!all_reg(ty) && h == n) {
                self.res = None;
            }
        }
    }

    fn step(&mut self, n: usize, action: u8, ty: u8, rk: u64, sark: u64) -> Outcome {
        use Outcome::*;
        let mine = self.key(n);
        if action == sa::REGISTER || action == sa::REGISTER_AND_IGNORE_EXISTING_KEY {
            let ignore = action == sa::REGISTER_AND_IGNORE_EXISTING_KEY;
            match mine {
                None if !ignore && rk != 0 => return Conflict,
                None if sark != 0 => self.regs.push((n, sark)),
                None => {}
                Some(k) if !ignore && rk != k => return Conflict,
                Some(_) if sark == 0 => self.unregister(n),
                Some(_) => self.regs.iter_mut().for_each(|r| {
                    if r.0 == n {
                        r.1 = sark
                    }
                }),
            }
            return Good;
        }
        if mine != Some(rk) {
            return Conflict;
        }
        match action {
            sa::RESERVE => match self.res {
                Some((_, t)) => {
                    if self.holds(n) && t == ty {
                        Good
                    } else {
                        Conflict
                    }
                }
                None => {
                    self.res = Some((n, ty));
                    Good
                }
            },
            sa::RELEASE => match self.res {
                Some((_, t)) if self.holds(n) => {
                    if t != ty {
                        return Check;
                    }
                    self.res = None;
                    Good
                }
                _ => Good,
            },
            sa::CLEAR => {
                self.regs.clear();
                self.res = None;
                Good
            }
            _ => {
                let holder_key = self.res.and_then(|(h, _)| self.key(h));
                let victims: Vec<usize> = match self.res {
                    Some((_, t)) if all_reg(t) && sark == 0 => {
                        let v = self.regs.iter().map(|r| r.0).filter(|m| *m != n).collect();
                        self.res = Some((n, ty));
                        v
                    }
                    Some((_, t)) if !all_reg(t) && sark != 0 && holder_key == Some(sark) => {
                        let v = self
                            .regs
                            .iter()
                            .filter(|r| r.1 == sark && r.0 != n)
                            .map(|r| r.0)
                            .collect();
                        self.res = Some((n, ty));
                        v
                    }
                    Some((_, t)) if !all_reg(t) && sark == 0 => return Check,
                    None if sark == 0 => return Check,
                    _ => {
                        let v: Vec<usize> = self
                            .regs
                            .iter()
                            .filter(|r| r.1 == sark)
                            .map(|r| r.0)
                            .collect();
                        if v.is_empty() {
                            return Conflict;
                        }
                        v
                    }
                };
                for v in victims {
                    self.unregister(v);
                }
                Good
            }
        }
    }

    fn keys(&self) -> Vec<u64> {
        let mut k: Vec<u64> = self.regs.iter().map(|r| r.1).collect();
        k.sort_unstable();
        k
    }

    fn reservation(&self) -> Option<(u64, u8)> {
        self.res.map(|(h, ty)| {
            let key = if all_reg(ty) {
                0
            } else {
                self.key(h).unwrap_or(0)
            };
            (key, ty)
        })
    }
}

fn op() -> impl Strategy<Value = (usize, u8, u8, u64, u64)> {
    (
        0..4usize,
        prop::sample::select(vec![
            sa::REGISTER,
            sa::REGISTER_AND_IGNORE_EXISTING_KEY,
            sa::RESERVE,
            sa::RELEASE,
            sa::CLEAR,
            sa::PREEMPT,
            sa::PREEMPT_AND_ABORT,
        ]),
        prop::sample::select(vec![1u8, 3, 5, 6, 7, 8]),
        0..4u64,
        0..4u64,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn prout_sequences_match_the_model(ops in prop::collection::vec(op(), 1..40)) {
        let mut f = F::new();
        let mut m = Model::default();
        for (i, (n, action, ty, rk, sark)) in ops.into_iter().enumerate() {
            let nexus = NEXUSES[n];
            while f.ua(nexus).is_some() {}
            let c = f.out(nexus, action, ty, rk, sark, 0);
            let got = match c.status {
                status::GOOD => Outcome::Good,
                status::RESERVATION_CONFLICT => Outcome::Conflict,
                _ => Outcome::Check,
            };
            let want = m.step(n, action, ty, rk, sark);
            prop_assert_eq!(got, want, "step {} nexus {} sa {} ty {} rk {} sark {}", i, n, action, ty, rk, sark);
            let mut keys = f.keys().1;
            keys.sort_unstable();
            prop_assert_eq!(keys, m.keys(), "keys after step {}", i);
            prop_assert_eq!(f.reservation(), m.reservation(), "reservation after step {}", i);
        }
    }
}
