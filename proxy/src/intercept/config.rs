//! What `wasmesh-proxy init` is asked to do: [`InitConfig`] and the value types its flags parse
//! into ([`Port`], [`PortRange`], [`Cidr`], [`List`], [`Include`]).
//!
//! Every value type implements [`FromStr`] with a [`ValueError`] that says what is wrong with the
//! value; clap puts the flag's name in front of it (`invalid value '70000' for
//! '--exclude-inbound-ports <LIST>': port 70000 is out of range ...`). Checks that involve more
//! than one flag live in [`InitConfig::validate`]. Tests build configs as literals.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU16;
use std::str::FromStr;

/// UID the proxy runs as by default (Istio's convention).
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Port the proxy's inbound listener accepts redirected inbound connections on.
pub const DEFAULT_INBOUND_PORT: Port = Port::new_const(15006);
/// Port the proxy's outbound listener accepts redirected outbound connections on.
pub const DEFAULT_OUTBOUND_PORT: Port = Port::new_const(15001);
/// The proxy's admin port (`/ready`, `/live`, `/config`, `/metrics`); never captured inbound.
pub const ADMIN_PORT: Port = Port::new_const(15000);

/// A TCP port, 1-65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(NonZeroU16);

impl Port {
    /// `None` for port 0.
    pub fn new(port: u16) -> Option<Self> {
        NonZeroU16::new(port).map(Self)
    }

    /// For constants; fails to compile (in a `const`) for port 0.
    pub const fn new_const(port: u16) -> Self {
        match NonZeroU16::new(port) {
            Some(p) => Self(p),
            None => panic!("port 0 is not a port"),
        }
    }

    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Port {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let s = s.trim();
        let n: u64 = s.parse().map_err(|_| ValueError::NotAPort(s.to_owned()))?;
        u16::try_from(n)
            .ok()
            .and_then(Port::new)
            .ok_or(ValueError::PortOutOfRange(n))
    }
}

/// One port (`8080`) or an inclusive range (`8000-8100`, also written `8000:8100`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: Port,
    last: Port,
}

impl PortRange {
    pub fn single(port: Port) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// `None` when `first > last`.
    pub fn new(first: Port, last: Port) -> Option<Self> {
        (first <= last).then_some(Self { first, last })
    }

    pub fn first(self) -> Port {
        self.first
    }

    pub fn last(self) -> Port {
        self.last
    }
}

impl From<Port> for PortRange {
    fn from(port: Port) -> Self {
        Self::single(port)
    }
}

/// iptables' syntax: `8080` or `8000:8100`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let s = s.trim();
        match s.split_once(['-', ':']) {
            None => Ok(Self::single(s.parse()?)),
            Some((first, last)) => {
                let (first, last) = (first.parse()?, last.parse()?);
                Self::new(first, last).ok_or_else(|| ValueError::ReversedRange(s.to_owned()))
            }
        }
    }
}

/// An IPv4 or IPv6 network. A bare address is a /32 (/128) network; host bits are cleared, so
/// `10.96.0.1/12` is `10.96.0.0/12` (the form `iptables-save` prints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `None` if `prefix` is longer than the address (32 or 128 bits).
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
            _ => return None,
        };
        Some(Self { addr, prefix })
    }

    /// The network holding exactly `addr`.
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    pub fn addr(self) -> IpAddr {
        self.addr
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let s = s.trim();
        let bad = || ValueError::NotACidr(s.to_owned());
        match s.split_once('/') {
            None => s.parse().map(Self::host).map_err(|_| bad()),
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| bad())?;
                let prefix: u8 = prefix.parse().map_err(|_| bad())?;
                Self::new(addr, prefix).ok_or_else(|| ValueError::PrefixTooLong(s.to_owned()))
            }
        }
    }
}

/// A comma-separated list (`8080,9090`); the empty string is the empty list. Blanks around
/// entries are ignored and repeated entries kept once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

impl<T> Default for List<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: FromStr<Err = ValueError> + PartialEq> FromStr for List<T> {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let mut items = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let item = entry.parse()?;
            if !items.contains(&item) {
                items.push(item);
            }
        }
        Ok(Self(items))
    }
}

/// `*` (everything) or a [`List`] (only these; the empty list means nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Include<T> {
    All,
    Only(Vec<T>),
}

impl<T: FromStr<Err = ValueError> + PartialEq> FromStr for Include<T> {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        if s.trim() == "*" {
            return Ok(Self::All);
        }
        if s.split(',').any(|e| e.trim() == "*") {
            return Err(ValueError::StarInList(s.to_owned()));
        }
        s.parse::<List<T>>().map(|l| Self::Only(l.0))
    }
}

/// A flag's value that cannot be used; clap prefixes the flag's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("`{0}` is not a port number (expected 1-65535)")]
    NotAPort(String),
    #[error("port {0} is out of range (expected 1-65535)")]
    PortOutOfRange(u64),
    #[error("port range `{0}` ends before it starts (write it low-high, e.g. 8000-8100)")]
    ReversedRange(String),
    #[error(
        "`{0}` is not an IP address or network (expected e.g. 10.96.0.0/12, 10.0.0.1 or fd00::/64)"
    )]
    NotACidr(String),
    #[error(
        "`{0}`: the prefix length is longer than the address (at most /32 for IPv4, /128 for IPv6)"
    )]
    PrefixTooLong(String),
    #[error("`{0}`: `*` means everything and cannot be combined with other entries")]
    StarInList(String),
}

/// Everything `init` needs to render the rules. [`Default`] is what the flags default to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitConfig {
    /// Connections made by this UID are not captured (the proxy's own upstream connections).
    pub proxy_uid: u32,
    /// Also exempt connections made by this GID (a proxy running as root with this group).
    pub proxy_gid: Option<u32>,
    /// Inbound connections are redirected here.
    pub inbound_port: Port,
    /// Outbound connections are redirected here.
    pub outbound_port: Port,
    /// Inbound destination ports that reach the app directly.
    pub exclude_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports that are never captured (for any UID).
    pub exclude_outbound_ports: Vec<PortRange>,
    /// Outbound destination networks that are never captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound destination networks that are captured (`*`: all).
    pub include_outbound_cidrs: Include<Cidr>,
    /// Inbound destination ports that are captured (`*`: all).
    pub include_inbound_ports: Include<PortRange>,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: None,
            inbound_port: DEFAULT_INBOUND_PORT,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_cidrs: Include::All,
            include_inbound_ports: Include::All,
        }
    }
}

impl InitConfig {
    /// Checks that involve more than one flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.inbound_port == self.outbound_port {
            return Err(ConfigError::SamePort(self.inbound_port));
        }
        for (flag, port) in [
            ("--inbound-port", self.inbound_port),
            ("--outbound-port", self.outbound_port),
        ] {
            if port == ADMIN_PORT {
                return Err(ConfigError::AdminPort { flag });
            }
        }
        Ok(())
    }

    /// Inbound ports never redirected: the proxy's own ports first, then the user's.
    pub fn inbound_ports_not_captured(&self) -> Vec<PortRange> {
        let mut ports: Vec<PortRange> = vec![
            ADMIN_PORT.into(),
            self.outbound_port.into(),
            self.inbound_port.into(),
        ];
        for p in &self.exclude_inbound_ports {
            if !ports.contains(p) {
                ports.push(*p);
            }
        }
        ports
    }
}

/// Flags that are fine alone but not together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--inbound-port and --outbound-port are both {0}: the proxy needs a different port for each direction"
    )]
    SamePort(Port),
    #[error("{flag} is {ADMIN_PORT}, the proxy's admin port: choose another port")]
    AdminPort { flag: &'static str },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(n: u16) -> Port {
        Port::new(n).expect("nonzero")
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!("1".parse(), Ok(port(1)));
        assert_eq!(" 65535 ".parse(), Ok(port(65535)));
        assert_eq!("0".parse::<Port>(), Err(ValueError::PortOutOfRange(0)));
        assert_eq!(
            "70000".parse::<Port>(),
            Err(ValueError::PortOutOfRange(70000))
        );
        assert_eq!(
            "http".parse::<Port>(),
            Err(ValueError::NotAPort("http".into()))
        );
        assert_eq!("-1".parse::<Port>(), Err(ValueError::NotAPort("-1".into())));
    }

    #[test]
    fn port_ranges_accept_dash_and_colon() {
        let r: PortRange = "8000-8100".parse().expect("range");
        assert_eq!((r.first(), r.last()), (port(8000), port(8100)));
        assert_eq!("8000:8100".parse(), Ok(r));
        assert_eq!(r.to_string(), "8000:8100");
        assert_eq!(
            "25".parse::<PortRange>().map(|r| r.to_string()),
            Ok("25".into())
        );
        assert_eq!(
            "9-8".parse::<PortRange>(),
            Err(ValueError::ReversedRange("9-8".into()))
        );
        assert_eq!(
            "1-0".parse::<PortRange>(),
            Err(ValueError::PortOutOfRange(0))
        );
    }

    #[test]
    fn cidrs_are_normalized() {
        let c: Cidr = "10.96.0.1/12".parse().expect("cidr");
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert_eq!(
            "10.0.0.7".parse::<Cidr>().map(|c| c.to_string()),
            Ok("10.0.0.7/32".into())
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().map(|c| c.to_string()),
            Ok("0.0.0.0/0".into())
        );
        assert_eq!(
            "fd00:1::5/64".parse::<Cidr>().map(|c| c.to_string()),
            Ok("fd00:1::/64".into())
        );
        assert_eq!(
            "::1".parse::<Cidr>().map(|c| c.to_string()),
            Ok("::1/128".into())
        );
        assert_eq!(
            "::/0".parse::<Cidr>().map(|c| c.to_string()),
            Ok("::/0".into())
        );
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(ValueError::PrefixTooLong("10.0.0.0/33".into()))
        );
        assert_eq!(
            "10.0.0/8".parse::<Cidr>(),
            Err(ValueError::NotACidr("10.0.0/8".into()))
        );
        assert_eq!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(ValueError::NotACidr("10.0.0.0/x".into()))
        );
    }

    #[test]
    fn lists_split_on_commas_and_drop_repeats() {
        let l: List<PortRange> = " 8080, 9090,8080,,".parse().expect("list");
        assert_eq!(l.0, vec![port(8080).into(), port(9090).into()]);
        assert_eq!("".parse::<List<Cidr>>(), Ok(List(vec![])));
        assert_eq!(
            "8080,0".parse::<List<PortRange>>(),
            Err(ValueError::PortOutOfRange(0))
        );
    }

    #[test]
    fn include_is_star_or_a_list() {
        assert_eq!("*".parse::<Include<Cidr>>(), Ok(Include::All));
        assert_eq!("".parse::<Include<Cidr>>(), Ok(Include::Only(vec![])));
        assert_eq!(
            "10.0.0.0/8".parse::<Include<Cidr>>(),
            Ok(Include::Only(vec!["10.0.0.0/8".parse().expect("cidr")]))
        );
        assert_eq!(
            "*,10.0.0.0/8".parse::<Include<Cidr>>(),
            Err(ValueError::StarInList("*,10.0.0.0/8".into()))
        );
    }

    #[test]
    fn validate_rejects_colliding_ports() {
        let same = InitConfig {
            inbound_port: port(15001),
            ..InitConfig::default()
        };
        assert_eq!(same.validate(), Err(ConfigError::SamePort(port(15001))));
        let admin = InitConfig {
            outbound_port: ADMIN_PORT,
            ..InitConfig::default()
        };
        assert_eq!(
            admin.validate(),
            Err(ConfigError::AdminPort {
                flag: "--outbound-port"
            })
        );
        assert_eq!(InitConfig::default().validate(), Ok(()));
    }

    #[test]
    fn own_ports_are_never_captured_inbound() {
        let cfg = InitConfig {
            exclude_inbound_ports: vec![port(15006).into(), port(9999).into()],
            ..InitConfig::default()
        };
        let ports: Vec<String> = cfg
            .inbound_ports_not_captured()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ports, ["15000", "15001", "15006", "9999"]);
    }
}
