//! Exact kube-proxy refusals, when the sidecar may change its pod's rules.
//!
//! The outbound listener can only reset a connection the kernel already accepted for it. With
//! `--reject-chain` (and CAP_NET_ADMIN), the proxy also lists Service ports without usable
//! endpoints in the `WASMESH_REJECT` filter chain that `init` created, matched on the
//! connection's original destination: the client's `connect()` then fails with ECONNREFUSED,
//! as with kube-proxy's REJECT; and Service ports whose endpoints are all on other nodes under
//! `internalTrafficPolicy: Local` are dropped, as kube-proxy's DROP does.
//!
//! The chain is rewritten whole, in one `iptables-restore --noflush` per family, only when the
//! set changes; the set is kept up to date per changed Service port (see
//! [`crate::table::TableBuilder`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;

use crate::intercept::rules::REJECT_CHAIN;
use crate::intercept::{Family, exec};

/// What the filter rule does with a new connection to one Service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// No usable endpoint: refuse (the client's connect fails with ECONNREFUSED).
    Reject,
    /// internalTrafficPolicy Local with no endpoint on this node: drop (the connect times out).
    Drop,
}

pub type Verdicts = BTreeMap<SocketAddr, Verdict>;

/// `iptables-restore --noflush` input that replaces the chain's content for one family.
pub fn render(family: Family, verdicts: &Verdicts) -> String {
    let mut out = format!("*filter\n:{REJECT_CHAIN} - [0:0]\n");
    for (addr, verdict) in verdicts {
        if addr.is_ipv6() != (family == Family::Ipv6) {
            continue;
        }
        let target = match verdict {
            Verdict::Reject => "REJECT --reject-with tcp-reset",
            Verdict::Drop => "DROP",
        };
        let _ = writeln!(
            out,
            "-A {REJECT_CHAIN} -p tcp -m conntrack --ctorigdst {} --ctorigdstport {} -j {target}",
            addr.ip(),
            addr.port()
        );
    }
    out.push_str("COMMIT\n");
    out
}

/// Writes the chain for each family; the first error is returned (with the tool's message).
pub fn apply(verdicts: &Verdicts, ipv6: bool) -> Result<(), exec::ToolError> {
    exec::run(
        "iptables-restore",
        &["--noflush"],
        Some(&render(Family::Ipv4, verdicts)),
    )?;
    if ipv6 {
        exec::run(
            "ip6tables-restore",
            &["--noflush"],
            Some(&render(Family::Ipv6, verdicts)),
        )?;
    }
    Ok(())
}

/// Keeps the chain in line with the table until the sender goes away. Gives up (with one clear
/// log line) when the proxy is not allowed to change the rules.
pub async fn run(mut rx: tokio::sync::watch::Receiver<Verdicts>) {
    let ipv6 = crate::intercept::has_ipv6();
    loop {
        let verdicts = rx.borrow_and_update().clone();
        let result = tokio::task::spawn_blocking(move || apply(&verdicts, ipv6)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the WASMESH_REJECT chain; clients of Services without endpoints get a reset instead of ECONNREFUSED (run the sidecar with CAP_NET_ADMIN, or without --reject-chain)");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "reject-chain task failed"),
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_rule_per_refused_service_address_in_its_family() {
        let v: Verdicts = [
            ("10.96.0.11:80".parse().expect("addr"), Verdict::Reject),
            ("10.96.0.12:443".parse().expect("addr"), Verdict::Drop),
            ("[fd00::11]:80".parse().expect("addr"), Verdict::Reject),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            render(Family::Ipv4, &v),
            "*filter\n:WASMESH_REJECT - [0:0]\n\
             -A WASMESH_REJECT -p tcp -m conntrack --ctorigdst 10.96.0.11 --ctorigdstport 80 -j REJECT --reject-with tcp-reset\n\
             -A WASMESH_REJECT -p tcp -m conntrack --ctorigdst 10.96.0.12 --ctorigdstport 443 -j DROP\n\
             COMMIT\n"
        );
        assert_eq!(
            render(Family::Ipv6, &v),
            "*filter\n:WASMESH_REJECT - [0:0]\n\
             -A WASMESH_REJECT -p tcp -m conntrack --ctorigdst fd00::11 --ctorigdstport 80 -j REJECT --reject-with tcp-reset\n\
             COMMIT\n"
        );
        // An empty set empties the chain.
        assert_eq!(
            render(Family::Ipv4, &Verdicts::new()),
            "*filter\n:WASMESH_REJECT - [0:0]\nCOMMIT\n"
        );
    }
}
