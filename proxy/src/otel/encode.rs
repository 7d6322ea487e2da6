//! Spans into OTLP protobuf bytes: an `ExportTraceServiceRequest`
//! (`opentelemetry/proto/collector/trace/v1`) holding one `ResourceSpans` (this proxy's
//! resource) with one `ScopeSpans` (`wasmesh-proxy`), written straight from the
//! [`SpanRecord`]s — no intermediate message structs, no per-attribute `String`s. The buffers
//! are kept between batches, so a batch costs no allocation once they have grown.
//!
//! Field numbers are the ones of opentelemetry-proto 1.x (`trace.proto`, `common.proto`,
//! `resource.proto`); the tests decode the output with the official generated types.

use std::io::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry::trace::SpanKind;

use super::{AttrValue, Event, SpanRecord, Status};

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `SpanFlags`: the trace flags (sampled) and "the parent's remoteness is known" (bit 8),
/// "the parent is remote" (bit 9).
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// Writes export requests for one resource; keeps its buffers between batches.
#[derive(Debug)]
pub struct Encoder {
    /// `Resource` message body (its attributes).
    resource: Vec<u8>,
    /// `InstrumentationScope` message body.
    scope: Vec<u8>,
    spans: Vec<u8>,
    span: Vec<u8>,
    nested: Vec<u8>,
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
            spans: Vec::new(),
            span: Vec::new(),
            nested: Vec::new(),
        }
    }

    /// The request's bytes; with `grpc_frame`, preceded by the gRPC message prefix
    /// (uncompressed flag and big-endian length).
    pub fn request(&mut self, spans: &[SpanRecord], grpc_frame: bool) -> Bytes {
        self.spans.clear();
        for s in spans {
            self.span.clear();
            span(&mut self.span, &mut self.nested, s);
            message(&mut self.spans, 2, &self.span);
        }
        // ScopeSpans { scope = 1; spans = 2 }
        let scope_spans = field_len(self.scope.len()) + self.spans.len();
        // ResourceSpans { resource = 1; scope_spans = 2 }
        let resource_spans = field_len(self.resource.len()) + field_len(scope_spans);
        // ExportTraceServiceRequest { resource_spans = 1 }
        let request = field_len(resource_spans);
        let mut out = Vec::with_capacity(request + 5);
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
        out.extend_from_slice(&self.spans);
        debug_assert_eq!(out.len(), request + if grpc_frame { 5 } else { 0 });
        Bytes::from(out)
    }
}

fn span(out: &mut Vec<u8>, nested: &mut Vec<u8>, s: &SpanRecord) {
    bytes_field(out, 1, &s.trace_id.to_bytes());
    bytes_field(out, 2, &s.span_id.to_bytes());
    if let Some(ts) = &s.trace_state {
        bytes_field(out, 3, ts.as_bytes());
    }
    if let Some(p) = s.parent_span {
        bytes_field(out, 4, &p.to_bytes());
    }
    string(out, 5, &s.name);
    key(out, 6, VARINT);
    varint(out, kind(&s.kind));
    fixed64(out, 7, unix_nanos(s.start));
    fixed64(out, 8, unix_nanos(s.end));
    for (k, v) in &s.attributes {
        key_value(out, 9, k, v);
    }
    for e in &s.events {
        nested.clear();
        event(nested, e);
        message(out, 11, nested);
    }
    if let Status::Error(description) = s.status {
        // Status { message = 2; code = 3 (STATUS_CODE_ERROR = 2) }
        nested.clear();
        string(nested, 2, description);
        key(nested, 3, VARINT);
        varint(nested, 2);
        message(out, 15, nested);
    }
    let remote = if s.parent_span.is_some() {
        FLAG_IS_REMOTE
    } else {
        0
    };
    key(out, 16, FIXED32);
    out.extend_from_slice(&(FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | remote).to_le_bytes());
}

fn event(out: &mut Vec<u8>, e: &Event) {
    fixed64(out, 1, unix_nanos(e.time));
    string(out, 2, e.name);
    for (k, v) in &e.attributes {
        key_value(out, 3, k, v);
    }
}

/// `SpanKind` enum values.
fn kind(k: &SpanKind) -> u64 {
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

/// A `KeyValue { key = 1; value = 2 (AnyValue) }` as field `field`, lengths computed, the
/// value written in place (an address formatted on the stack).
fn key_value(out: &mut Vec<u8>, field: u32, k: &str, v: &AttrValue) {
    let mut ip = [0u8; 48];
    // AnyValue { string_value = 1; int_value = 3 }
    let canonical;
    let v = match v {
        // `::ffff:a.b.c.d` is written as the IPv4 address it is.
        AttrValue::Ip(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => {
            canonical = AttrValue::Ip(IpAddr::V6(*a).to_canonical());
            &canonical
        }
        v => v,
    };
    let (value_field, text, int): (u32, &[u8], i64) = match v {
        AttrValue::Str(s) => (1, s.as_bytes(), 0),
        AttrValue::Shared(s) => (1, s.as_bytes(), 0),
        AttrValue::Int(n) => (3, &[], *n),
        AttrValue::Ip(IpAddr::V4(a)) => {
            // Dotted decimal by hand: the formatting machinery cost more than the rest of
            // the attribute.
            let mut n = 0;
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    ip[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    ip[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    ip[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                ip[n] = b'0' + octet % 10;
                n += 1;
            }
            (1, &ip[..n], 0)
        }
        AttrValue::Ip(a) => {
            let mut w = std::io::Cursor::new(&mut ip[..]);
            // An address's text fits in 48 bytes (IPv6 with an embedded IPv4 is 45).
            let _ = write!(w, "{a}");
            let n = w.position() as usize;
            (1, &ip[..n], 0)
        }
    };
    let any = if value_field == 3 {
        1 + varint_len(int as u64)
    } else {
        field_len(text.len())
    };
    let kv = field_len(k.len()) + field_len(any);
    key(out, field, LEN);
    varint(out, kv as u64);
    string(out, 1, k);
    key(out, 2, LEN);
    varint(out, any as u64);
    if value_field == 3 {
        key(out, 3, VARINT);
        varint(out, int as u64);
    } else {
        bytes_field(out, 1, text);
    }
}

/// The size of a length-delimited field with a one-byte key and `n` bytes of content.
fn field_len(n: usize) -> usize {
    1 + varint_len(n as u64) + n
}

fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

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
    use std::borrow::Cow;
    use std::sync::Arc;
    use std::time::Duration;

    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind as ProtoKind;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use prost::Message as _;

    use super::*;

    fn record(parent: Option<u64>, status: Status) -> SpanRecord {
        let start = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        SpanRecord {
            trace_id: TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            span_id: SpanId::from(0x00f0_67aa_0ba9_02b7),
            parent_span: parent.map(SpanId::from),
            trace_state: Some(http::HeaderValue::from_static("vendor=abc")),
            kind: SpanKind::Client,
            start,
            end: start + Duration::from_micros(250),
            name: Cow::Borrowed("GET reviews"),
            attributes: vec![
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
            ],
            events: vec![Event {
                name: "wasm.request_headers",
                time: start + Duration::from_micros(10),
                attributes: vec![("wasmesh.filter.outcome", AttrValue::from("continue"))],
            }],
            status,
        }
    }

    fn string_of(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> Value {
        v.as_ref().and_then(|a| a.value.clone()).expect("a value")
    }

    #[test]
    fn the_official_types_decode_what_we_write() {
        let mut enc = Encoder::new(
            &[
                ("service.name".into(), "reviews".into()),
                ("k8s.pod.name".into(), "reviews-7f9-x".into()),
            ],
            "wasmesh-proxy",
            "0.1.0",
        );
        let spans = vec![
            record(Some(0x1122_3344_5566_7788), Status::Error("timeout")),
            record(None, Status::Unset),
        ];
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
            assert_eq!(s.attributes.len(), 7);
            assert_eq!(s.events.len(), 1);
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
