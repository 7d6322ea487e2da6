//! Traffic interception for a pod: the nat rules that send the pod's TCP connections through the
//! proxy, installed by `wasmesh-proxy init` in the pod's network namespace.
//!
//! - [`config`]: what to capture ([`InitConfig`]) and the flag value types.
//! - [`rules`]: [`render_rules`], the pure renderer, and the chain names.
//! - [`iptables`]: reading (`iptables-save`), installing and removing (`iptables-restore`).
//! - `netns`: whether the namespace has IPv6, and the `::6` passthrough address on `lo`.
//! - `exec`: running those tools.
//!
//! [`install`] is all or nothing: `iptables-restore` commits table by table and each family is a
//! separate tool, so when any step fails everything of ours is removed again. Rules, chains
//! and the reasons for each exclusion: `docs/interception.md`.

pub mod config;
pub(crate) mod exec;
pub mod iptables;
mod netns;
pub mod rules;

use std::error::Error;
use std::fmt;
use std::str::FromStr;

pub use config::{
    ADMIN_PORT, Cidr, ConfigError, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_UID,
    Include, InitConfig, List, Port, PortRange, ValueError,
};
pub use exec::ToolError;
pub use iptables::IptablesError;
pub use netns::{AddressError, has_ipv6};
pub use rules::{Family, Rules, Ruleset, Table, render_rules};

/// Whether to install (and remove) the IPv6 rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// When the network namespace has IPv6 ([`has_ipv6`]).
    #[default]
    Auto,
    On,
    Off,
}

impl Ipv6Mode {
    /// The families to work on in the current network namespace.
    pub fn families(self) -> Vec<Family> {
        match self {
            Ipv6Mode::Auto if has_ipv6() => Family::ALL.to_vec(),
            Ipv6Mode::On => Family::ALL.to_vec(),
            Ipv6Mode::Auto | Ipv6Mode::Off => vec![Family::Ipv4],
        }
    }
}

impl FromStr for Ipv6Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Ipv6Mode::Auto),
            "on" => Ok(Ipv6Mode::On),
            "off" => Ok(Ipv6Mode::Off),
            other => Err(format!("`{other}` is not one of auto, on, off")),
        }
    }
}

impl fmt::Display for Ipv6Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ipv6Mode::Auto => "auto",
            Ipv6Mode::On => "on",
            Ipv6Mode::Off => "off",
        })
    }
}

/// One step of installing or removing failed.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error(transparent)]
    Iptables(#[from] IptablesError),
    #[error(transparent)]
    Address(#[from] AddressError),
}

/// Installing failed; says what state the namespace was left in.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("installing the interception rules failed before anything was changed")]
    NothingChanged {
        #[source]
        cause: Box<InterceptError>,
    },
    #[error(
        "installing the interception rules failed and was undone (no wasmesh rules are left in this network namespace)"
    )]
    RolledBack {
        #[source]
        cause: Box<InterceptError>,
    },
    #[error(
        "installing the interception rules failed, and undoing it failed too ({rollback}); remove what is left with `wasmesh-proxy init --cleanup`"
    )]
    RollbackFailed {
        #[source]
        cause: Box<InterceptError>,
        rollback: String,
    },
}

/// Installs `rules` for `families` in the current network namespace, replacing an earlier set.
/// On failure, removes everything of ours before returning the error.
pub fn install(rules: &Rules, families: &[Family]) -> Result<(), InstallError> {
    let mut changed = false;
    let Err(cause) = install_families(rules, families, &mut changed) else {
        return Ok(());
    };
    let cause = Box::new(cause);
    if !changed {
        return Err(InstallError::NothingChanged { cause });
    }
    match remove(families) {
        Ok(_) => Err(InstallError::RolledBack { cause }),
        Err(rollback) => Err(InstallError::RollbackFailed {
            cause,
            rollback: error_chain(&rollback),
        }),
    }
}

/// Sets `changed` before the first step that may change the namespace, even if it then fails
/// (`iptables-restore` may have committed some tables).
fn install_families(
    rules: &Rules,
    families: &[Family],
    changed: &mut bool,
) -> Result<(), InterceptError> {
    for &family in families {
        let ruleset = rules.family(family);
        let saved = iptables::read(family)?;
        *changed = true;
        iptables::apply(ruleset, &saved)?;
        if family == Family::Ipv6 {
            netns::add_passthrough_address()?;
        }
        let count: usize = ruleset.tables.iter().map(|t| t.rules.len()).sum();
        tracing::info!(%family, rules = count, "installed the interception rules");
    }
    Ok(())
}

/// Removes every chain of ours, every jump into one, and the `::6` address, for `families`.
/// Tries every family even when one fails; returns the first error, or whether anything was
/// there to remove.
pub fn remove(families: &[Family]) -> Result<bool, InterceptError> {
    let mut removed = false;
    let mut first_error = None;
    for &family in families {
        match iptables::cleanup(family) {
            Ok(any) => removed |= any,
            Err(e) => {
                first_error.get_or_insert(InterceptError::from(e));
            }
        }
        if family == Family::Ipv6 {
            match netns::remove_passthrough_address() {
                Ok(any) => removed |= any,
                Err(e) => {
                    first_error.get_or_insert(InterceptError::from(e));
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// `error: cause: cause...` on one line.
fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}
