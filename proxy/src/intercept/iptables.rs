//! Installing and removing a [`Ruleset`] with `iptables-restore --noflush` (`ip6tables-restore`
//! for IPv6) after reading what is already there with `iptables-save`. Works with either
//! backend, whichever the `iptables` alternative selects (Debian 12: nf_tables).
//!
//! Applying is idempotent and converges from any earlier state, in one restore per family:
//! our chains are declared (`:CHAIN - [0:0]` creates a chain, or flushes it if it exists), every
//! existing rule that jumps into a `WASMESH_` chain from elsewhere is deleted with `-D` and the
//! rendered jumps are appended once, and `WASMESH_` chains the rendered set no longer has are
//! removed. The scripts are built by pure functions ([`apply_script`], [`cleanup_script`]) from a
//! parsed `iptables-save` ([`Saved`]).
//!
//! `iptables-restore` commits each table separately, so a failure in a later table (or family)
//! can leave an earlier one installed; [`super::install`] rolls back with [`cleanup`].

use std::fmt::Write as _;

use super::exec::{self, ToolError};
use super::rules::{CHAIN_PREFIX, Family, Ruleset};

fn save_program(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "iptables-save",
        Family::Ipv6 => "ip6tables-save",
    }
}

fn restore_program(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "iptables-restore",
        Family::Ipv6 => "ip6tables-restore",
    }
}

/// Reading or changing the rules of one family failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("reading the current {family} rules")]
    Save {
        family: Family,
        #[source]
        source: ToolError,
    },
    #[error("installing the {family} rules{}", at_line(line.as_deref()))]
    Restore {
        family: Family,
        /// The input line the tool rejected, when it said which.
        line: Option<String>,
        #[source]
        source: ToolError,
    },
    #[error("removing the {family} rules{}", at_line(line.as_deref()))]
    Cleanup {
        family: Family,
        line: Option<String>,
        #[source]
        source: ToolError,
    },
}

fn at_line(line: Option<&str>) -> String {
    line.map(|l| format!(" (rejected: `{l}`)"))
        .unwrap_or_default()
}

/// One table of an `iptables-save` dump: its chains and rules, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    pub chains: Vec<String>,
    pub rules: Vec<SavedRule>,
}

/// An `-A CHAIN ...` line of an `iptables-save` dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    /// The whole line, `-A CHAIN ...`, exactly as saved (so `-D` can delete it).
    pub line: String,
}

impl SavedRule {
    fn target(&self) -> Option<&str> {
        let mut words = self.line.split_whitespace();
        while let Some(word) = words.next() {
            if matches!(word, "-j" | "--jump" | "-g" | "--goto") {
                return words.next();
            }
        }
        None
    }

    /// A rule outside our chains that jumps into one of them.
    pub fn jumps_into_ours(&self) -> bool {
        !self.chain.starts_with(CHAIN_PREFIX)
            && self.target().is_some_and(|t| t.starts_with(CHAIN_PREFIX))
    }

    fn delete_command(&self) -> String {
        format!("-D{}", self.line.strip_prefix("-A").unwrap_or(&self.line))
    }
}

impl SavedTable {
    pub fn our_chains(&self) -> impl Iterator<Item = &str> {
        self.chains
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with(CHAIN_PREFIX))
    }

    pub fn jumps_into_ours(&self) -> impl Iterator<Item = &SavedRule> {
        self.rules.iter().filter(|r| r.jumps_into_ours())
    }

    fn has_ours(&self) -> bool {
        self.our_chains().next().is_some() || self.jumps_into_ours().next().is_some()
    }
}

/// A parsed `iptables-save` dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    pub tables: Vec<SavedTable>,
    /// `iptables-nft-save` noticed rules in the legacy backend too (they apply as well).
    pub legacy_tables_present: bool,
}

impl Saved {
    pub fn parse(dump: &str) -> Self {
        let mut saved = Saved::default();
        for line in dump.lines().map(str::trim_end) {
            if let Some(name) = line.strip_prefix('*') {
                saved.tables.push(SavedTable {
                    name: name.to_owned(),
                    ..SavedTable::default()
                });
            } else if line.starts_with('#') {
                saved.legacy_tables_present |= line.contains("legacy tables present");
            } else if let Some(table) = saved.tables.last_mut() {
                if let Some(decl) = line.strip_prefix(':') {
                    if let Some(chain) = decl.split_whitespace().next() {
                        table.chains.push(chain.to_owned());
                    }
                } else if let Some(chain) = line
                    .strip_prefix("-A ")
                    .and_then(|r| r.split_whitespace().next())
                {
                    table.rules.push(SavedRule {
                        chain: chain.to_owned(),
                        line: line.to_owned(),
                    });
                }
            }
        }
        saved
    }

    pub fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// Whether any `WASMESH_` chain, or a jump into one, exists.
    pub fn has_ours(&self) -> bool {
        self.tables.iter().any(SavedTable::has_ours)
    }
}

/// Restore input that turns `saved` into exactly `ruleset` as far as our chains and jumps go;
/// rules that are not ours are left alone.
pub fn apply_script(ruleset: &Ruleset, saved: &Saved) -> String {
    let mut script = String::new();
    for t in &ruleset.tables {
        let existing = saved.table(t.table.name());
        let _ = writeln!(script, "*{}", t.table);
        for chain in &t.chains {
            let _ = writeln!(script, ":{chain} - [0:0]");
        }
        if let Some(existing) = existing {
            for jump in existing.jumps_into_ours() {
                let _ = writeln!(script, "{}", jump.delete_command());
            }
            let stale: Vec<&str> = existing
                .our_chains()
                .filter(|c| !t.chains.contains(c))
                .collect();
            remove_chains(&mut script, &stale);
        }
        for rule in &t.rules {
            let _ = writeln!(script, "{rule}");
        }
        let _ = writeln!(script, "COMMIT");
    }
    // Tables the ruleset no longer uses but an earlier version of `init` did.
    for existing in &saved.tables {
        let used = ruleset
            .tables
            .iter()
            .any(|t| t.table.name() == existing.name);
        if !used && existing.has_ours() {
            cleanup_table(&mut script, existing);
        }
    }
    script
}

/// Restore input that removes every `WASMESH_` chain and every jump into one; `None` when there
/// is nothing to remove.
pub fn cleanup_script(saved: &Saved) -> Option<String> {
    let mut script = String::new();
    for table in saved.tables.iter().filter(|t| t.has_ours()) {
        cleanup_table(&mut script, table);
    }
    (!script.is_empty()).then_some(script)
}

fn cleanup_table(script: &mut String, table: &SavedTable) {
    let _ = writeln!(script, "*{}", table.name);
    for jump in table.jumps_into_ours() {
        let _ = writeln!(script, "{}", jump.delete_command());
    }
    let ours: Vec<&str> = table.our_chains().collect();
    remove_chains(script, &ours);
    let _ = writeln!(script, "COMMIT");
}

/// Flush all, then delete all: our chains may jump into each other.
fn remove_chains(script: &mut String, chains: &[&str]) {
    for chain in chains {
        let _ = writeln!(script, "-F {chain}");
    }
    for chain in chains {
        let _ = writeln!(script, "-X {chain}");
    }
}

/// The current rules of `family` in this network namespace.
pub fn read(family: Family) -> Result<Saved, IptablesError> {
    let dump = exec::run(save_program(family), &[], None)
        .map_err(|source| IptablesError::Save { family, source })?;
    let saved = Saved::parse(&dump);
    if saved.legacy_tables_present {
        tracing::warn!(
            %family,
            "this network namespace also has iptables-legacy rules; they apply alongside ours"
        );
    }
    Ok(saved)
}

/// Installs `ruleset` over `saved` (what [`read`] returned), replacing any earlier set of ours.
pub fn apply(ruleset: &Ruleset, saved: &Saved) -> Result<(), IptablesError> {
    let family = ruleset.family;
    let script = apply_script(ruleset, saved);
    restore(family, &script).map_err(|(line, source)| IptablesError::Restore {
        family,
        line,
        source,
    })
}

/// Removes every chain of ours and every jump into one. Returns whether there was anything.
pub fn cleanup(family: Family) -> Result<bool, IptablesError> {
    let Some(script) = cleanup_script(&read(family)?) else {
        return Ok(false);
    };
    restore(family, &script).map_err(|(line, source)| IptablesError::Cleanup {
        family,
        line,
        source,
    })?;
    Ok(true)
}

fn restore(family: Family, script: &str) -> Result<(), (Option<String>, ToolError)> {
    tracing::debug!(%family, "{}", script);
    exec::run(restore_program(family), &["--noflush"], Some(script))
        .map(drop)
        .map_err(|e| (rejected_line(&e, script), e))
}

/// `iptables-restore` ends its complaint with "Error occurred at line: N".
fn rejected_line(error: &ToolError, script: &str) -> Option<String> {
    let ToolError::Failed { message, .. } = error else {
        return None;
    };
    let (_, rest) = message.rsplit_once("line: ")?;
    let n: usize = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    script.lines().nth(n.checked_sub(1)?).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::{InitConfig, render_rules};

    const SAVED_WITH_OURS: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Sat Nov 21 17:21:23 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:WASMESH_REJECT - [0:0]
-A OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT
-A OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT
-A OUTPUT -d 10.1.1.1/32 -m comment --comment \"not ours\" -j DROP
-A WASMESH_REJECT -d 10.96.0.11/32 -p tcp -j REJECT --reject-with tcp-reset
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:WASMESH_OLD - [0:0]
:WASMESH_OUTPUT - [0:0]
-A PREROUTING -j WASMESH_OLD
-A OUTPUT -p tcp -j WASMESH_OUTPUT
-A WASMESH_OUTPUT -j WASMESH_OLD
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:WASMESH_DIVERT - [0:0]
-A PREROUTING -p tcp -g WASMESH_DIVERT
COMMIT
";

    #[test]
    fn parses_tables_chains_and_jumps() {
        let saved = Saved::parse(SAVED_WITH_OURS);
        assert_eq!(
            saved
                .tables
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["filter", "nat", "mangle"]
        );
        let nat = saved.table("nat").expect("nat");
        assert_eq!(
            nat.our_chains().collect::<Vec<_>>(),
            ["WASMESH_OLD", "WASMESH_OUTPUT"]
        );
        assert_eq!(
            nat.jumps_into_ours()
                .map(|r| r.line.as_str())
                .collect::<Vec<_>>(),
            [
                "-A PREROUTING -j WASMESH_OLD",
                "-A OUTPUT -p tcp -j WASMESH_OUTPUT"
            ]
        );
        assert!(saved.has_ours());
        assert!(!saved.legacy_tables_present);
        assert!(!Saved::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").has_ours());
    }

    #[test]
    fn applying_over_an_earlier_set_replaces_it() {
        let rules = render_rules(&InitConfig::default());
        let script = apply_script(&rules.ipv4, &Saved::parse(SAVED_WITH_OURS));
        let expected = format!(
            "\
*nat
:WASMESH_INBOUND - [0:0]
:WASMESH_IN_REDIRECT - [0:0]
:WASMESH_OUTPUT - [0:0]
:WASMESH_REDIRECT - [0:0]
-D PREROUTING -j WASMESH_OLD
-D OUTPUT -p tcp -j WASMESH_OUTPUT
-F WASMESH_OLD
-X WASMESH_OLD
{nat_rules}COMMIT
*filter
:WASMESH_REJECT - [0:0]
-D OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT
-D OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT
-A OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT
COMMIT
*mangle
-D PREROUTING -p tcp -g WASMESH_DIVERT
-F WASMESH_DIVERT
-X WASMESH_DIVERT
COMMIT
",
            nat_rules = rules.ipv4.tables[0]
                .rules
                .iter()
                .map(|r| format!("{r}\n"))
                .collect::<String>()
        );
        assert_eq!(script, expected);
    }

    #[test]
    fn applying_to_a_fresh_namespace_is_the_rendered_set() {
        let rules = render_rules(&InitConfig::default());
        assert_eq!(
            apply_script(&rules.ipv4, &Saved::default()),
            rules.ipv4.to_string()
        );
    }

    #[test]
    fn cleanup_removes_jumps_then_chains_and_leaves_other_rules() {
        let script = cleanup_script(&Saved::parse(SAVED_WITH_OURS)).expect("something to remove");
        assert_eq!(
            script,
            "\
*filter
-D OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT
-D OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT
-F WASMESH_REJECT
-X WASMESH_REJECT
COMMIT
*nat
-D PREROUTING -j WASMESH_OLD
-D OUTPUT -p tcp -j WASMESH_OUTPUT
-F WASMESH_OLD
-F WASMESH_OUTPUT
-X WASMESH_OLD
-X WASMESH_OUTPUT
COMMIT
*mangle
-D PREROUTING -p tcp -g WASMESH_DIVERT
-F WASMESH_DIVERT
-X WASMESH_DIVERT
COMMIT
"
        );
        assert_eq!(cleanup_script(&Saved::default()), None);
    }

    #[test]
    fn a_rejected_line_is_quoted_from_the_script() {
        let error = ToolError::Failed {
            command: "iptables-restore --noflush".into(),
            status: "exit status: 2".into(),
            message: "iptables-restore v1.8.9 (nf_tables): Chain 'X' does not exist; Error occurred at line: 2; Try `iptables-restore -h'".into(),
        };
        assert_eq!(
            rejected_line(&error, "*nat\n-A OUTPUT -j X\nCOMMIT\n").as_deref(),
            Some("-A OUTPUT -j X")
        );
    }
}
