//! The interception rules as data: [`render_rules`] turns an [`InitConfig`] into [`Rules`], a pure
//! function with golden tests (`proxy/tests/golden/`). A [`Ruleset`] prints as
//! `iptables-restore --noflush` input for a fresh network namespace; rules are written in the
//! canonical form `iptables-save` prints them in, so what is installed can be compared line by
//! line with what was rendered.
//!
//! nat table (one copy per address family):
//!
//! ```text
//! PREROUTING -p tcp ─▶ WASMESH_INBOUND:    own ports + --exclude-inbound-ports → RETURN
//!                                          --include-inbound-ports (* = all)   → WASMESH_IN_REDIRECT
//! OUTPUT -p tcp ─────▶ WASMESH_OUTPUT:     --exclude-outbound-ports            → RETURN
//!                                          -o lo from 127.0.0.6 (inbound passthrough) → RETURN
//!                                          -o lo, proxy UID/GID, not to 127/8  → WASMESH_INBOUND (hairpin)
//!                                          -o lo                               → RETURN
//!                                          proxy UID/GID                       → RETURN
//!                                          --exclude-outbound-cidrs            → RETURN
//!                                          --include-outbound-cidrs (* = all)  → WASMESH_REDIRECT
//! WASMESH_IN_REDIRECT: REDIRECT --to-ports 15006      WASMESH_REDIRECT: REDIRECT --to-ports 15001
//! ```
//!
//! filter table: `OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT`, an empty chain that the
//! proxy's `run` fills with the Service ports that have no endpoints. `docs/interception.md` says
//! why each rule exists.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::config::{Cidr, Include, InitConfig, PortRange};

/// Every chain `init` creates starts with this; `--cleanup` removes every such chain.
pub const CHAIN_PREFIX: &str = "WASMESH_";
/// nat: decides whether an inbound (or hairpinned) connection goes to the inbound listener.
pub const INBOUND_CHAIN: &str = "WASMESH_INBOUND";
/// nat: redirects to the inbound listener.
pub const IN_REDIRECT_CHAIN: &str = "WASMESH_IN_REDIRECT";
/// nat: decides whether a locally made connection goes to the outbound listener.
pub const OUTPUT_CHAIN: &str = "WASMESH_OUTPUT";
/// nat: redirects to the outbound listener.
pub const REDIRECT_CHAIN: &str = "WASMESH_REDIRECT";
/// filter: left empty by `init`; `run` lists the Service ports with no endpoints here.
pub const REJECT_CHAIN: &str = "WASMESH_REJECT";

/// `multiport` takes at most 15 ports per rule; a range counts as two.
const MULTIPORT_MAX: usize = 15;

/// Address family: each has its own tables and tools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }

    /// The source address the proxy connects from when it passes an inbound connection on to
    /// the app at the pod's own IP; such connections are never captured.
    pub fn passthrough_source(self) -> IpAddr {
        match self {
            Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
            Family::Ipv6 => IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
        }
    }

    /// Loopback destinations, in `iptables-save` form: never hairpinned.
    fn loopback(self) -> &'static str {
        match self {
            Family::Ipv4 => "127.0.0.0/8",
            Family::Ipv6 => "::1/128",
        }
    }

    fn holds(self, cidr: &Cidr) -> bool {
        cidr.is_ipv4() == (self == Family::Ipv4)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The netfilter tables `init` writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rule appended to `chain`; `spec` is everything after `-A <chain>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: String,
}

impl Rule {
    /// A rule in a chain that is not ours (`PREROUTING`, `OUTPUT`) jumping into one of ours.
    pub fn is_jump(&self) -> bool {
        !self.chain.starts_with(CHAIN_PREFIX)
    }
}

/// `-A CHAIN SPEC`, as in `iptables-save`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec)
    }
}

/// Our chains in one table and the rules to append, jumps into our chains last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    pub chains: Vec<&'static str>,
    pub rules: Vec<Rule>,
}

impl TableRules {
    fn new(table: Table, chains: &[&'static str]) -> Self {
        Self {
            table,
            chains: chains.to_vec(),
            rules: Vec::new(),
        }
    }

    fn push(&mut self, chain: &'static str, spec: impl Into<String>) {
        self.rules.push(Rule {
            chain,
            spec: spec.into(),
        });
    }
}

/// Everything for one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub tables: Vec<TableRules>,
}

impl Ruleset {
    /// The rules of `chain` in `table`, as `iptables-save` would print them.
    pub fn chain_rules(&self, table: Table, chain: &str) -> Vec<String> {
        self.tables
            .iter()
            .filter(|t| t.table == table)
            .flat_map(|t| &t.rules)
            .filter(|r| r.chain == chain)
            .map(ToString::to_string)
            .collect()
    }
}

/// `iptables-restore --noflush` input that installs the rules in a namespace that has none yet
/// (`init` itself also replaces a previous set: see `iptables::apply_script`).
impl fmt::Display for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            writeln!(f, "*{}", t.table)?;
            for chain in &t.chains {
                writeln!(f, ":{chain} - [0:0]")?;
            }
            for rule in &t.rules {
                writeln!(f, "{rule}")?;
            }
            writeln!(f, "COMMIT")?;
        }
        Ok(())
    }
}

/// The rules for both families; IPv6 is installed only where the namespace has IPv6.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub ipv4: Ruleset,
    pub ipv6: Ruleset,
}

impl Rules {
    pub fn family(&self, family: Family) -> &Ruleset {
        match family {
            Family::Ipv4 => &self.ipv4,
            Family::Ipv6 => &self.ipv6,
        }
    }
}

/// What `--dry-run` prints: both families, each valid restore input (`#` lines are comments).
impl fmt::Display for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# IPv4: iptables-restore --noflush")?;
        write!(f, "{}", self.ipv4)?;
        writeln!(
            f,
            "# IPv6: ip6tables-restore --noflush (when the network namespace has IPv6)"
        )?;
        write!(f, "{}", self.ipv6)
    }
}

/// Renders the interception rules for `cfg` (which should have passed
/// [`InitConfig::validate`]). The same config always renders the same bytes.
pub fn render_rules(cfg: &InitConfig) -> Rules {
    Rules {
        ipv4: render_family(cfg, Family::Ipv4),
        ipv6: render_family(cfg, Family::Ipv6),
    }
}

fn render_family(cfg: &InitConfig, family: Family) -> Ruleset {
    Ruleset {
        family,
        tables: vec![render_nat(cfg, family), render_filter()],
    }
}

fn render_nat(cfg: &InitConfig, family: Family) -> TableRules {
    let mut nat = TableRules::new(
        Table::Nat,
        &[
            INBOUND_CHAIN,
            IN_REDIRECT_CHAIN,
            OUTPUT_CHAIN,
            REDIRECT_CHAIN,
        ],
    );

    // Inbound: what arrives from the network (and the proxy's hairpin, below).
    for ports in port_matches(&cfg.inbound_ports_not_captured()) {
        nat.push(INBOUND_CHAIN, format!("{ports} -j RETURN"));
    }
    match &cfg.include_inbound_ports {
        Include::All => nat.push(INBOUND_CHAIN, format!("-p tcp -j {IN_REDIRECT_CHAIN}")),
        Include::Only(included) => {
            for ports in port_matches(included) {
                nat.push(INBOUND_CHAIN, format!("{ports} -j {IN_REDIRECT_CHAIN}"));
            }
        }
    }
    nat.push(
        IN_REDIRECT_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_port),
    );

    // Outbound: connections made in the pod.
    for ports in port_matches(&cfg.exclude_outbound_ports) {
        nat.push(OUTPUT_CHAIN, format!("{ports} -j RETURN"));
    }
    let passthrough = Cidr::host(family.passthrough_source());
    nat.push(OUTPUT_CHAIN, format!("-s {passthrough} -o lo -j RETURN"));
    let owners: Vec<String> = std::iter::once(format!("--uid-owner {}", cfg.proxy_uid))
        .chain(cfg.proxy_gid.map(|gid| format!("--gid-owner {gid}")))
        .collect();
    let loopback = family.loopback();
    for owner in &owners {
        nat.push(
            OUTPUT_CHAIN,
            format!("! -d {loopback} -o lo -m owner {owner} -j {INBOUND_CHAIN}"),
        );
    }
    nat.push(OUTPUT_CHAIN, "-o lo -j RETURN");
    for owner in &owners {
        nat.push(OUTPUT_CHAIN, format!("-m owner {owner} -j RETURN"));
    }
    for cidr in cfg
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| family.holds(c))
    {
        nat.push(OUTPUT_CHAIN, format!("-d {cidr} -j RETURN"));
    }
    match &cfg.include_outbound_cidrs {
        Include::All => nat.push(OUTPUT_CHAIN, format!("-j {REDIRECT_CHAIN}")),
        Include::Only(cidrs) => {
            for cidr in cidrs.iter().filter(|c| family.holds(c)) {
                nat.push(OUTPUT_CHAIN, format!("-d {cidr} -j {REDIRECT_CHAIN}"));
            }
        }
    }
    nat.push(
        REDIRECT_CHAIN,
        format!("-p tcp -j REDIRECT --to-ports {}", cfg.outbound_port),
    );

    nat.push("PREROUTING", format!("-p tcp -j {INBOUND_CHAIN}"));
    nat.push("OUTPUT", format!("-p tcp -j {OUTPUT_CHAIN}"));
    nat
}

fn render_filter() -> TableRules {
    let mut filter = TableRules::new(Table::Filter, &[REJECT_CHAIN]);
    filter.push(
        "OUTPUT",
        format!("-m conntrack --ctstate NEW -j {REJECT_CHAIN}"),
    );
    filter
}

/// TCP destination-port matches for `ports`: `-m tcp --dport P` for one entry, `-m multiport`
/// in chunks of at most 15 ports otherwise. Nothing for an empty list.
fn port_matches(ports: &[PortRange]) -> Vec<String> {
    fn weight(p: &PortRange) -> usize {
        if p.first() == p.last() { 1 } else { 2 }
    }
    let mut chunks: Vec<Vec<PortRange>> = Vec::new();
    let mut used = MULTIPORT_MAX;
    for p in ports {
        if used + weight(p) > MULTIPORT_MAX {
            chunks.push(Vec::new());
            used = 0;
        }
        used += weight(p);
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(*p);
        }
    }
    chunks
        .iter()
        .map(|chunk| match chunk.as_slice() {
            [one] => format!("-p tcp -m tcp --dport {one}"),
            many => {
                let list: Vec<String> = many.iter().map(ToString::to_string).collect();
                format!("-p tcp -m multiport --dports {}", list.join(","))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(s: &str) -> Vec<PortRange> {
        s.parse::<super::super::config::List<PortRange>>()
            .expect("ports")
            .0
    }

    #[test]
    fn one_port_uses_the_tcp_match() {
        assert_eq!(port_matches(&ranges("25")), ["-p tcp -m tcp --dport 25"]);
        assert_eq!(
            port_matches(&ranges("8000-8100")),
            ["-p tcp -m tcp --dport 8000:8100"]
        );
        assert!(port_matches(&[]).is_empty());
    }

    #[test]
    fn multiport_is_split_at_fifteen_ports_ranges_counting_two() {
        let list: Vec<String> = (1..=16).map(|p| p.to_string()).collect();
        let m = port_matches(&ranges(&list.join(",")));
        assert_eq!(
            m,
            [
                "-p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
                "-p tcp -m tcp --dport 16",
            ]
        );
        let m = port_matches(&ranges("1,2,3,4,5,6,7,8,9,10,11,12,13,14,20-30"));
        assert_eq!(
            m,
            [
                "-p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14",
                "-p tcp -m tcp --dport 20:30",
            ]
        );
    }

    #[test]
    fn rendering_is_deterministic() {
        let cfg = InitConfig::default();
        assert_eq!(
            render_rules(&cfg).to_string(),
            render_rules(&cfg).to_string()
        );
    }

    #[test]
    fn only_jumps_leave_our_chains() {
        let rules = render_rules(&InitConfig::default());
        let jumps: Vec<String> = rules
            .ipv4
            .tables
            .iter()
            .flat_map(|t| &t.rules)
            .filter(|r| r.is_jump())
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            jumps,
            [
                "-A PREROUTING -p tcp -j WASMESH_INBOUND",
                "-A OUTPUT -p tcp -j WASMESH_OUTPUT",
                "-A OUTPUT -m conntrack --ctstate NEW -j WASMESH_REJECT",
            ]
        );
    }
}
