//! `[screening]` and `[bans]`: the greet delay, the pass cache and the
//! automatic bans. A child of `validate` so it shares its helpers.

use std::{num::NonZeroU32, time::Duration};

use super::{raw, Cx, Zero};
use crate::config::{BansConfig, ConfigError, GreetAction, ScreeningConfig};

const DEFAULT_GREET_WAIT: Duration = Duration::from_secs(6);
const DEFAULT_GREET_BANNER: &str = "ESMTP";
const DEFAULT_PASS_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_PASS_CACHE_MAX_ENTRIES: u32 = 100_000;
const DEFAULT_MAX_WAITING: u32 = 1000;
/// The longest greet wait: postscreen's own limits stay far below.
const MAX_GREET_WAIT: Duration = Duration::from_secs(300);
/// The longest `greet_banner`: it shares a reply line (512 bytes, RFC 5321
/// §4.5.3.1.5) with the host name.
const MAX_GREET_BANNER_BYTES: usize = 200;
/// Caps on the table sizes, far above any real need.
const MAX_PASS_CACHE_ENTRIES: u32 = 10_000_000;
const MAX_WAITING: u32 = 1_000_000;
const MAX_BAN_ENTRIES: u32 = 1_000_000;
const MAX_GROWTH: u32 = 100;

const DEFAULT_BAN_AFTER: u32 = 3;
const DEFAULT_BAN_WINDOW: Duration = Duration::from_secs(10 * 60);
const DEFAULT_BAN_FOR: Duration = Duration::from_secs(3600);
const DEFAULT_GROWTH: u32 = 2;
const DEFAULT_MAX_BAN_FOR: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_MAX_BAN_ENTRIES: u32 = 10_000;

impl Cx<'_> {
    pub(super) fn screening(&self, raw: raw::RawScreening) -> Result<ScreeningConfig, ConfigError> {
        let greet_wait = self.duration(
            "screening.greet_wait",
            raw.greet_wait,
            DEFAULT_GREET_WAIT,
            Zero::Allowed,
        )?;
        if greet_wait > MAX_GREET_WAIT {
            return Err(self.invalid(
                "screening.greet_wait",
                format!(
                    "is longer than the most allowed, {}",
                    humantime::format_duration(MAX_GREET_WAIT)
                ),
            ));
        }
        let greet_banner = raw
            .greet_banner
            .unwrap_or_else(|| DEFAULT_GREET_BANNER.to_owned());
        if greet_banner.len() > MAX_GREET_BANNER_BYTES {
            return Err(self.invalid(
                "screening.greet_banner",
                format!("is longer than {MAX_GREET_BANNER_BYTES} bytes"),
            ));
        }
        if let Some(c) = greet_banner
            .chars()
            .find(|c| !(c.is_ascii_graphic() || *c == ' '))
        {
            return Err(self.invalid(
                "screening.greet_banner",
                format!(
                    "= {greet_banner:?} has {c:?}; only printable ASCII and spaces may be sent"
                ),
            ));
        }
        let pass_cache_ttl = self.duration(
            "screening.pass_cache_ttl",
            raw.pass_cache_ttl,
            DEFAULT_PASS_CACHE_TTL,
            Zero::Allowed,
        )?;
        let pass_cache_max_entries = self.bounded(
            "screening.pass_cache_max_entries",
            raw.pass_cache_max_entries,
            DEFAULT_PASS_CACHE_MAX_ENTRIES,
            MAX_PASS_CACHE_ENTRIES,
        )?;
        let max_waiting = self.bounded(
            "screening.max_waiting",
            raw.max_waiting,
            DEFAULT_MAX_WAITING,
            MAX_WAITING,
        )?;
        Ok(ScreeningConfig {
            greet_wait: (!greet_wait.is_zero()).then_some(greet_wait),
            greet_action: raw.greet_action.unwrap_or(GreetAction::Ignore),
            greet_banner: (!greet_banner.trim().is_empty()).then_some(greet_banner),
            pass_cache_ttl: (!pass_cache_ttl.is_zero()).then_some(pass_cache_ttl),
            pass_cache_max_entries: pass_cache_max_entries as usize,
            max_waiting: max_waiting as usize,
        })
    }

    pub(super) fn bans(&self, raw: raw::RawBans) -> Result<BansConfig, ConfigError> {
        let ban_after = raw.ban_after.unwrap_or(DEFAULT_BAN_AFTER);
        let window = self.duration("bans.window", raw.window, DEFAULT_BAN_WINDOW, Zero::Refused)?;
        let ban_for = self.duration("bans.ban_for", raw.ban_for, DEFAULT_BAN_FOR, Zero::Refused)?;
        let growth = match raw.growth {
            None => DEFAULT_GROWTH,
            Some(0) => {
                return Err(self.invalid(
                    "bans.growth",
                    "is 0; it must be at least 1 (1: every ban lasts ban_for)",
                ))
            }
            Some(g) if g > MAX_GROWTH => {
                return Err(self.invalid(
                    "bans.growth",
                    format!("= {g} is more than the most allowed, {MAX_GROWTH}"),
                ))
            }
            Some(g) => g,
        };
        let max_ban_for = match raw.max_ban_for {
            // Unset: at least ban_for, so a long ban_for alone is valid.
            None => DEFAULT_MAX_BAN_FOR.max(ban_for),
            some => self.duration("bans.max_ban_for", some, DEFAULT_MAX_BAN_FOR, Zero::Refused)?,
        };
        if max_ban_for < ban_for {
            return Err(self.invalid(
                "bans.max_ban_for",
                format!(
                    "= \"{}\" is shorter than bans.ban_for = \"{}\"",
                    humantime::format_duration(max_ban_for),
                    humantime::format_duration(ban_for)
                ),
            ));
        }
        let max_entries = self.bounded(
            "bans.max_entries",
            raw.max_entries,
            DEFAULT_MAX_BAN_ENTRIES,
            MAX_BAN_ENTRIES,
        )?;
        Ok(BansConfig {
            ban_after: NonZeroU32::new(ban_after),
            window,
            ban_for,
            growth,
            max_ban_for,
            max_entries: max_entries as usize,
        })
    }

    /// A count from 1 to `max`.
    fn bounded(
        &self,
        key: &str,
        raw: Option<u32>,
        default: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        let n = self.at_least_one(key, raw, default)?;
        if n > max {
            return Err(self.invalid(key, format!("= {n} is more than the most allowed, {max}")));
        }
        Ok(n)
    }
}
