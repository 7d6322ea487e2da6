//! The Proxy-Wasm ABI as the host sees it: the numeric codes that cross the boundary
//! ([`Status`], [`MapType`], [`BufferType`], …), the ABI version a module declares, and the
//! host functions a module imports ([`hostcalls`] for `env.proxy_*`, [`wasi`] for the
//! `wasi_snapshot_preview1` shims).
//!
//! Values follow `proxy-wasm/spec` v0.2.1 and the `proxy-wasm` Rust SDK 0.2.5. A status the SDK
//! does not expect for a call makes the SDK panic, so every host function answers only with a
//! status listed as tolerated for it in `shared/proxy-wasm-abi.md` §7.

pub(crate) mod hostcalls;
pub(crate) mod wasi;

/// Status codes returned by host functions (`proxy_status_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

impl Status {
    pub(crate) fn code(self) -> i32 {
        self as i32
    }
}

/// Which header map a host function acts on (`proxy_map_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    CallResponseHeaders,
    CallResponseTrailers,
}

impl MapType {
    pub(crate) fn from_abi(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            4 => Self::GrpcInitialMetadata,
            5 => Self::GrpcTrailingMetadata,
            6 => Self::CallResponseHeaders,
            7 => Self::CallResponseTrailers,
            _ => return None,
        })
    }
}

/// Which byte buffer a host function acts on (`proxy_buffer_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    CallResponseBody,
    GrpcMessage,
    VmConfiguration,
    PluginConfiguration,
    ForeignFunctionArguments,
}

impl BufferType {
    pub(crate) fn from_abi(v: i32) -> Option<Self> {
        Some(match v {
            0 => Self::RequestBody,
            1 => Self::ResponseBody,
            2 => Self::DownstreamData,
            3 => Self::UpstreamData,
            4 => Self::CallResponseBody,
            5 => Self::GrpcMessage,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            8 => Self::ForeignFunctionArguments,
            _ => return None,
        })
    }
}

/// `proxy_continue_stream` / `proxy_close_stream` targets (`proxy_stream_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The request (downstream → upstream).
    Request,
    /// The response (upstream → downstream).
    Response,
}

impl Direction {
    pub(crate) fn from_abi(v: i32) -> Option<Self> {
        match v {
            0 => Some(Self::Request),
            1 => Some(Self::Response),
            _ => None,
        }
    }
}

/// What a stream callback returns (`proxy_action_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GuestAction {
    Continue,
    Pause,
}

impl GuestAction {
    pub(crate) fn from_abi(v: u32) -> Self {
        // Envoy treats anything but 0 as a stop; so do we.
        if v == 0 { Self::Continue } else { Self::Pause }
    }
}

/// The ABI version a module declares through its marker export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiVersion {
    /// `proxy_abi_version_0_2_0`
    V0_2_0,
    /// `proxy_abi_version_0_2_1`
    V0_2_1,
}

impl AbiVersion {
    /// The marker export names we accept, newest first.
    pub(crate) const MARKERS: [(&'static str, AbiVersion); 2] = [
        ("proxy_abi_version_0_2_1", AbiVersion::V0_2_1),
        ("proxy_abi_version_0_2_0", AbiVersion::V0_2_0),
    ];
    /// Markers we recognise but do not host.
    pub(crate) const UNSUPPORTED: [&'static str; 1] = ["proxy_abi_version_0_1_0"];
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        })
    }
}

/// Log levels of `proxy_log` (`proxy_log_level_t`).
pub(crate) fn log_level(v: i32) -> tracing::Level {
    match v {
        0 => tracing::Level::TRACE,
        1 => tracing::Level::DEBUG,
        2 => tracing::Level::INFO,
        3 => tracing::Level::WARN,
        _ => tracing::Level::ERROR,
    }
}
