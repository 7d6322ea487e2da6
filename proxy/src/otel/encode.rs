//! Spans into OTLP protobuf bytes: an `ExportTraceServiceRequest`
//! (`opentelemetry/proto/collector/trace/v1`) holding one `ResourceSpans` (this proxy's
//! resource) with one `ScopeSpans` (`wasmesh-proxy`).
//!
//! A sampled span is written as protobuf while its request runs: [`span_start`] when it starts,
//! [`key_value`] for each attribute and [`event`] for each event as they are set, [`span_end`]
//! when it ends — no intermediate record, no attribute list, an address or a number written
//! where it is set. The finished span's bytes are framed as a `ScopeSpans.spans` entry
//! ([`frame_span`]) into the export queue; the export thread only writes the request's
//! envelope to send in front of a batch of them ([`Encoder::head`]).
//!
//! Field numbers are the ones of opentelemetry-proto 1.x (`trace.proto`, `common.proto`,
//! `resource.proto`); the tests decode the output with the official generated types.

use std::io::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};

use super::{AttrValue, Status};

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `Span.attributes`.
pub(super) const SPAN_ATTRIBUTE: u32 = 9;

/// `SpanFlags`: the trace flags (sampled) and "the parent's remoteness is known" (bit 8),
/// "the parent is remote" (bit 9).
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// Writes the envelope of export requests for one resource.
#[derive(Debug)]
pub struct Encoder {
    /// `Resource` message body (its attributes).
    resource: Vec<u8>,
    /// `InstrumentationScope` message body.
    scope: Vec<u8>,
}

impl Encoder {
    pub fn new(resource: &[(String, String)], scope_name: &str, scope_version: &str) -> Self {
        let mut r = Vec::new();
        for (k, v) in resource {
            key_value(&mut r, 1, k, &AttrValue::Str(v.clone().into()));
        }
        let mut s = Vec::new();
        string(&mut s, 1, scope_name);
        string(&mut s, 2, scope_version);
        Encoder {
            resource: r,
            scope: s,
        }
    }

    /// What goes before a batch of `spans_len` bytes of `ScopeSpans.spans` entries (as
    /// [`frame_span`] wrote them) to make the request: with `grpc_frame` the gRPC message
    /// prefix (uncompressed flag and big-endian length), then the envelope down to the
    /// `ScopeSpans` message whose last field the spans are. Written apart so that the batch
    /// goes out as it is, not copied behind it (≈ 180 KB per export of 512 spans).
    pub fn head(&self, spans_len: usize, grpc_frame: bool) -> Bytes {
        // ScopeSpans { scope = 1; spans = 2 }
        let scope_spans = field_len(self.scope.len()) + spans_len;
        // ResourceSpans { resource = 1; scope_spans = 2 }
        let resource_spans = field_len(self.resource.len()) + field_len(scope_spans);
        // ExportTraceServiceRequest { resource_spans = 1 }
        let request = field_len(resource_spans);
        let mut out = Vec::with_capacity(request - spans_len + 5);
        if grpc_frame {
            out.push(0);
            out.extend_from_slice(&(request as u32).to_be_bytes());
        }
        key(&mut out, 1, LEN);
        varint(&mut out, resource_spans as u64);
        message(&mut out, 1, &self.resource);
        key(&mut out, 2, LEN);
        varint(&mut out, scope_spans as u64);
        message(&mut out, 1, &self.scope);
        debug_assert_eq!(
            out.len() + spans_len,
            request + if grpc_frame { 5 } else { 0 }
        );
        Bytes::from(out)
    }

    /// The whole request for `spans` in one buffer: [`Encoder::head`] and the spans (what a
    /// collector decodes; the export sends the two apart).
    #[cfg(test)]
    pub fn request(&self, spans: &[u8], grpc_frame: bool) -> Bytes {
        let mut out = Vec::from(self.head(spans.len(), grpc_frame));
        out.extend_from_slice(spans);
        Bytes::from(out)
    }
}

/// A span's first fields, written when it starts: ids, the caller's `tracestate` as it wrote
/// it, the parent (a remote one, when the request carried it), kind, start time.
pub(super) fn span_start(
    out: &mut Vec<u8>,
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    trace_state: Option<&[u8]>,
    kind: &SpanKind,
    start: SystemTime,
) {
    bytes_field(out, 1, &trace_id.to_bytes());
    bytes_field(out, 2, &span_id.to_bytes());
    if let Some(ts) = trace_state {
        bytes_field(out, 3, ts);
    }
    if let Some(p) = parent {
        bytes_field(out, 4, &p.to_bytes());
    }
    key(out, 6, VARINT);
    varint(out, kind_value(kind));
    fixed64(out, 7, unix_nanos(start));
}

/// A span's last fields, written when it ends: its name (`name`, or `name route`), end time,
/// status, flags.
pub(super) fn span_end(
    out: &mut Vec<u8>,
    name: &str,
    route: Option<&str>,
    end: SystemTime,
    status: Status,
    remote_parent: bool,
) {
    match route {
        None => string(out, 5, name),
        Some(r) => {
            key(out, 5, LEN);
            varint(out, (name.len() + 1 + r.len()) as u64);
            out.extend_from_slice(name.as_bytes());
            out.push(b' ');
            out.extend_from_slice(r.as_bytes());
        }
    }
    fixed64(out, 8, unix_nanos(end));
    if let Status::Error(description) = status {
        // Status { message = 2; code = 3 (STATUS_CODE_ERROR = 2) }
        nested(out, 15, |m| {
            string(m, 2, description);
            key(m, 3, VARINT);
            varint(m, 2);
        });
    }
    let remote = if remote_parent { FLAG_IS_REMOTE } else { 0 };
    key(out, 16, FIXED32);
    out.extend_from_slice(&(FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | remote).to_le_bytes());
}

/// A `Span.events` entry.
pub(super) fn event(
    out: &mut Vec<u8>,
    name: &str,
    time: SystemTime,
    attributes: &[(&'static str, AttrValue)],
) {
    nested(out, 11, |m| {
        fixed64(m, 1, unix_nanos(time));
        string(m, 2, name);
        for (k, v) in attributes {
            key_value(m, 3, k, v);
        }
    });
}

/// A finished span's bytes as a `ScopeSpans.spans` entry.
pub(super) fn frame_span(out: &mut Vec<u8>, span: &[u8]) {
    message(out, 2, span);
}

/// A string attribute whose value is the concatenation of `parts` (written in place: no
/// `String` is built).
pub(super) fn key_value_concat<P: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    field: u32,
    k: &str,
    parts: &[P],
) {
    let text: usize = parts.iter().map(|p| p.as_ref().len()).sum();
    // AnyValue { string_value = 1 }
    let any = field_len(text);
    let kv = field_len(k.len()) + field_len(any);
    if one_byte_lengths(field, kv) {
        short_key_value_head(out, field, k, kv, any, [(1 << 3) | LEN, text as u8]);
    } else {
        key_value_head(out, field, k, any);
        key(out, 1, LEN);
        varint(out, text as u64);
    }
    for p in parts {
        out.extend_from_slice(p.as_ref());
    }
}

/// Whether a `KeyValue` of `kv` bytes as field `field` has a one-byte key and one-byte
/// lengths (and so do its key and `AnyValue`, being shorter): most attributes.
#[inline(always)]
fn one_byte_lengths(field: u32, kv: usize) -> bool {
    field < 16 && kv < 0x80
}

/// [`key_value_head`] (for an `AnyValue` of `any` bytes) when [`one_byte_lengths`] holds,
/// followed by `value_head`, the `AnyValue`'s first bytes: fixed-size copies, which the
/// compiler writes inline, where a byte at a time checked the capacity each time
/// (docs/benchmarks.md, "Session 18").
#[inline(always)]
fn short_key_value_head<const N: usize>(
    out: &mut Vec<u8>,
    field: u32,
    k: &str,
    kv: usize,
    any: usize,
    value_head: [u8; N],
) {
    out.extend_from_slice(&[
        (field << 3) as u8 | LEN,
        kv as u8,
        (1 << 3) | LEN,
        k.len() as u8,
    ]);
    out.extend_from_slice(k.as_bytes());
    out.extend_from_slice(&[(2 << 3) | LEN, any as u8]);
    out.extend_from_slice(&value_head);
}

/// A `KeyValue`'s framing and key, up to its `AnyValue` body of `any` bytes, which the
/// caller writes next.
#[inline(always)]
fn key_value_head(out: &mut Vec<u8>, field: u32, k: &str, any: usize) {
    key(out, field, LEN);
    varint(out, (field_len(k.len()) + field_len(any)) as u64);
    string(out, 1, k);
    key(out, 2, LEN);
    varint(out, any as u64);
}

/// `SpanKind` enum values.
fn kind_value(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A length-delimited field whose body `body` writes in place: one byte is kept for the
/// length, and the body moved only in the rare case it is 128 bytes or more.
fn nested(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let at = out.len();
    out.push(0);
    body(out);
    let n = out.len() - at - 1;
    if n < 0x80 {
        out[at] = n as u8;
    } else {
        let mut len = Vec::with_capacity(10);
        varint(&mut len, n as u64);
        out.splice(at..=at, len);
    }
}

/// A `KeyValue { key = 1; value = 2 (AnyValue) }` as field `field`, lengths computed, the
/// value written in place (an address formatted on the stack).
pub(super) fn key_value(out: &mut Vec<u8>, field: u32, k: &str, v: &AttrValue) {
    let text: &[u8] = match v {
        AttrValue::Int(n) => {
            // AnyValue { int_value = 3 }
            let any = 1 + varint_len(*n as u64);
            let kv = field_len(k.len()) + field_len(any);
            if one_byte_lengths(field, kv) {
                short_key_value_head(out, field, k, kv, any, [3 << 3 | VARINT]);
            } else {
                key_value_head(out, field, k, any);
                key(out, 3, VARINT);
            }
            varint(out, *n as u64);
            return;
        }
        AttrValue::Str(s) => s.as_bytes(),
        AttrValue::Shared(s) => s.as_bytes(),
        AttrValue::Ip(a) => {
            let mut ip = [0u8; 48];
            // `::ffff:a.b.c.d` is written as the IPv4 address it is.
            let text = ip_text(&mut ip, a.to_canonical());
            key_value_concat(out, field, k, &[text]);
            return;
        }
    };
    key_value_concat(out, field, k, &[text]);
}

/// An address's text, written into `buf`.
fn ip_text(buf: &mut [u8; 48], a: IpAddr) -> &[u8] {
    match a {
        IpAddr::V4(a) => {
            // Dotted decimal by hand: the formatting machinery cost more than the rest of
            // the attribute.
            let mut n = 0;
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            &buf[..n]
        }
        IpAddr::V6(_) => {
            let mut w = std::io::Cursor::new(&mut buf[..]);
            // An address's text fits in 48 bytes (IPv6 with an embedded IPv4 is 45).
            let _ = write!(w, "{a}");
            let n = w.position() as usize;
            &buf[..n]
        }
    }
}

/// The size of a length-delimited field with a one-byte key and `n` bytes of content.
#[inline(always)]
fn field_len(n: usize) -> usize {
    1 + varint_len(n as u64) + n
}

#[inline(always)]
fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline(always)]
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline(always)]
fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

#[inline(always)]
fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[inline(always)]
fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes_field(out, field, s.as_bytes());
}

fn message(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    bytes_field(out, field, body);
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ProtoKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use prost::Message as _;

    use super::*;

    /// A span's bytes as the request path writes them.
    fn span_bytes(parent: Option<u64>, status: Status) -> Vec<u8> {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let mut b = Vec::new();
        span_start(
            &mut b,
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            SpanId::from(0x00f0_67aa_0ba9_02b7),
            parent.map(SpanId::from),
            Some(b"vendor=abc"),
            &SpanKind::Client,
            start,
        );
        let attributes = [
            ("http.request.method", AttrValue::from("GET")),
            ("url.path", AttrValue::from("/a/b?".repeat(40))),
            ("server.port", AttrValue::Int(8080)),
            ("http.request.resend_count", AttrValue::Int(-3)),
            (
                "wasmesh.endpoint.pod",
                AttrValue::Shared(Arc::from("reviews-7f9-x")),
            ),
            (
                "network.peer.address",
                AttrValue::Ip("10.244.1.7".parse().expect("ip")),
            ),
            (
                "client.address",
                AttrValue::Ip("fd00::1:2".parse().expect("ip")),
            ),
        ];
        for (k, v) in &attributes {
            key_value(&mut b, SPAN_ATTRIBUTE, k, v);
        }
        key_value_concat(
            &mut b,
            SPAN_ATTRIBUTE,
            "server.address",
            &["reviews", ".", "shop", ".svc"],
        );
        event(
            &mut b,
            "wasm.request_headers",
            start + Duration::from_micros(10),
            &[("wasmesh.filter.outcome", AttrValue::from("continue"))],
        );
        // An event of 128 bytes or more: its length takes two bytes.
        event(
            &mut b,
            "long",
            start + Duration::from_micros(20),
            &[("k", AttrValue::from("v".repeat(200)))],
        );
        span_end(
            &mut b,
            "GET",
            Some("reviews"),
            start + Duration::from_micros(250),
            status,
            parent.is_some(),
        );
        b
    }

    fn string_of(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> Value {
        v.as_ref().and_then(|a| a.value.clone()).expect("a value")
    }

    #[test]
    fn the_official_types_decode_what_we_write() {
        let enc = Encoder::new(
            &[
                ("service.name".into(), "reviews".into()),
                ("k8s.pod.name".into(), "reviews-7f9-x".into()),
            ],
            "wasmesh-proxy",
            "0.1.0",
        );
        let mut spans = Vec::new();
        frame_span(
            &mut spans,
            &span_bytes(Some(0x1122_3344_5566_7788), Status::Error("timeout")),
        );
        frame_span(&mut spans, &span_bytes(None, Status::Unset));
        for grpc in [false, true] {
            let bytes = enc.request(&spans, grpc);
            let body = if grpc {
                assert_eq!(bytes[0], 0, "uncompressed");
                let n = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
                assert_eq!(n, bytes.len() - 5);
                &bytes[5..]
            } else {
                &bytes[..]
            };
            let req = ExportTraceServiceRequest::decode(body).expect("decodes");
            assert_eq!(req.resource_spans.len(), 1);
            let rs = &req.resource_spans[0];
            let res = rs.resource.as_ref().expect("resource");
            assert_eq!(res.attributes[0].key, "service.name");
            assert_eq!(
                string_of(&res.attributes[0].value),
                Value::StringValue("reviews".into())
            );
            let ss = &rs.scope_spans[0];
            let scope = ss.scope.as_ref().expect("scope");
            assert_eq!(
                (scope.name.as_str(), scope.version.as_str()),
                ("wasmesh-proxy", "0.1.0")
            );
            assert_eq!(ss.spans.len(), 2);
            let s = &ss.spans[0];
            assert_eq!(hex(&s.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(hex(&s.span_id), "00f067aa0ba902b7");
            assert_eq!(hex(&s.parent_span_id), "1122334455667788");
            assert_eq!(s.trace_state, "vendor=abc");
            assert_eq!(s.name, "GET reviews");
            assert_eq!(s.kind, ProtoKind::Client as i32);
            assert_eq!(s.start_time_unix_nano, 1_700_000_000_123_456_789);
            assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 250_000);
            assert_eq!(s.flags, 0x301);
            let attr = |k: &str| {
                string_of(
                    &s.attributes
                        .iter()
                        .find(|kv| kv.key == k)
                        .unwrap_or_else(|| panic!("attribute {k}"))
                        .value,
                )
            };
            assert_eq!(
                attr("http.request.method"),
                Value::StringValue("GET".into())
            );
            assert_eq!(attr("url.path"), Value::StringValue("/a/b?".repeat(40)));
            assert_eq!(attr("server.port"), Value::IntValue(8080));
            assert_eq!(attr("http.request.resend_count"), Value::IntValue(-3));
            assert_eq!(
                attr("wasmesh.endpoint.pod"),
                Value::StringValue("reviews-7f9-x".into())
            );
            assert_eq!(
                attr("network.peer.address"),
                Value::StringValue("10.244.1.7".into())
            );
            assert_eq!(
                attr("client.address"),
                Value::StringValue("fd00::1:2".into())
            );
            assert_eq!(
                attr("server.address"),
                Value::StringValue("reviews.shop.svc".into())
            );
            assert_eq!(s.attributes.len(), 8);
            assert_eq!(s.events.len(), 2);
            assert_eq!(
                string_of(&s.events[1].attributes[0].value),
                Value::StringValue("v".repeat(200))
            );
            assert_eq!(s.events[0].name, "wasm.request_headers");
            assert_eq!(s.events[0].time_unix_nano - s.start_time_unix_nano, 10_000);
            assert_eq!(s.events[0].attributes[0].key, "wasmesh.filter.outcome");
            let status = s.status.as_ref().expect("status");
            assert_eq!(status.code, StatusCode::Error as i32);
            assert_eq!(status.message, "timeout");
            // The root span: no parent, remoteness known and false, status unset.
            let root = &ss.spans[1];
            assert!(root.parent_span_id.is_empty());
            assert_eq!(root.flags, 0x101);
            assert!(root.status.is_none());
        }
        // An empty batch is a valid request too.
        let empty = enc.request(&[], false);
        let req = ExportTraceServiceRequest::decode(&empty[..]).expect("decodes");
        assert!(req.resource_spans[0].scope_spans[0].spans.is_empty());
    }

    #[test]
    fn addresses_are_written_as_their_text() {
        for a in [
            "0.0.0.0",
            "10.244.1.7",
            "255.255.255.255",
            "192.168.100.9",
            "::1",
            "fd00::1:2",
        ] {
            let mut out = Vec::new();
            key_value(&mut out, 1, "k", &AttrValue::Ip(a.parse().expect("ip")));
            let kv = opentelemetry_proto::tonic::common::v1::KeyValue::decode(&out[2..])
                .expect("decodes");
            assert_eq!(string_of(&kv.value), Value::StringValue(a.into()));
        }
        // An IPv4 peer seen through a dual-stack socket is written as IPv4.
        let mut out = Vec::new();
        key_value(
            &mut out,
            1,
            "k",
            &AttrValue::Ip("::ffff:10.244.0.2".parse().expect("ip")),
        );
        let kv =
            opentelemetry_proto::tonic::common::v1::KeyValue::decode(&out[2..]).expect("decodes");
        assert_eq!(
            string_of(&kv.value),
            Value::StringValue("10.244.0.2".into())
        );
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
