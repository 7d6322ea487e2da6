//! Facts about, and the one non-iptables change to, the current network namespace: whether it
//! has IPv6, and the IPv6 inbound-passthrough address `::6` on `lo`.
//!
//! IPv4 needs no address: all of 127.0.0.0/8 is local, so the proxy can connect from 127.0.0.6.
//! IPv6 loopback owns only `::1`, so `init` adds `::6/128` to `lo` (as istio-iptables does) for
//! the proxy's inbound passthrough to the app at the pod's IPv6 address.

use std::fs;

use super::exec::{self, ToolError};
use super::rules::Family;

const DISABLE_IPV6: &str = "/proc/sys/net/ipv6/conf/all/disable_ipv6";

/// The namespace has an IPv6 stack: the kernel has IPv6 and it is not disabled here. `/proc/sys/net`
/// shows the settings of the namespace the reading process is in.
pub fn has_ipv6() -> bool {
    fs::read_to_string(DISABLE_IPV6).is_ok_and(|v| v.trim() == "0")
}

fn passthrough_v6() -> String {
    format!("{}/128", Family::Ipv6.passthrough_source())
}

/// Adding or removing `::6` on `lo` failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} the IPv6 inbound-passthrough address ::6 on lo")]
pub struct AddressError {
    action: &'static str,
    #[source]
    source: ToolError,
}

/// Adds `::6/128` to `lo` (no-op if present).
pub fn add_passthrough_address() -> Result<(), AddressError> {
    let addr = passthrough_v6();
    exec::run(
        "ip",
        &["-6", "addr", "replace", &addr, "dev", "lo", "nodad"],
        None,
    )
    .map(drop)
    .map_err(|source| AddressError {
        action: "adding",
        source,
    })
}

/// Removes `::6/128` from `lo` if it is there. Returns whether it was.
pub fn remove_passthrough_address() -> Result<bool, AddressError> {
    let addr = passthrough_v6();
    let shown =
        exec::run("ip", &["-6", "-o", "addr", "show", "dev", "lo"], None).map_err(|source| {
            AddressError {
                action: "looking for",
                source,
            }
        })?;
    if !shown.split_whitespace().any(|word| word == addr) {
        return Ok(false);
    }
    exec::run("ip", &["-6", "addr", "del", &addr, "dev", "lo"], None).map_err(|source| {
        AddressError {
            action: "removing",
            source,
        }
    })?;
    Ok(true)
}
