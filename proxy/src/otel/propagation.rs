//! Trace context on the wire: W3C `traceparent`/`tracestate` (read and written), B3 (read in
//! its single-header and multi-header forms, and rewritten when the request carried it, so an
//! app that only speaks B3 continues the trace too).

use bytes::Bytes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::trace::{SpanId, TraceFlags, TraceId};

// The context headers' names: as `HeaderName`s to write them, as text to find them
// ([`Found::scan`]).
const TRACEPARENT_NAME: &str = "traceparent";
const TRACESTATE_NAME: &str = "tracestate";
const B3_NAME: &str = "b3";
const B3_TRACE_ID_NAME: &str = "x-b3-traceid";
const B3_SPAN_ID_NAME: &str = "x-b3-spanid";
const B3_SAMPLED_NAME: &str = "x-b3-sampled";
const B3_FLAGS_NAME: &str = "x-b3-flags";

pub static TRACEPARENT: HeaderName = HeaderName::from_static(TRACEPARENT_NAME);
pub static TRACESTATE: HeaderName = HeaderName::from_static(TRACESTATE_NAME);
static B3: HeaderName = HeaderName::from_static(B3_NAME);
static B3_TRACE_ID: HeaderName = HeaderName::from_static(B3_TRACE_ID_NAME);
static B3_SPAN_ID: HeaderName = HeaderName::from_static(B3_SPAN_ID_NAME);
static B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static(B3_SAMPLED_NAME);
static B3_FLAGS: HeaderName = HeaderName::from_static(B3_FLAGS_NAME);

/// Which form the incoming context had (the outgoing one is written in the same form, plus W3C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The caller's span, as the request says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller sampled it (W3C flag 01, B3 `1` or `d`); None: the caller left it to us
    /// (B3 without a sampling decision).
    pub sampled: Option<bool>,
    pub format: Format,
}

/// The caller's context alone (the tests' shorthand for [`extract_with_state`]).
#[cfg(test)]
fn extract(headers: &HeaderMap) -> Option<Parent> {
    extract_with_state(headers).parent
}

/// What a request says of the trace it belongs to.
#[derive(Debug, PartialEq, Eq)]
pub struct Incoming<'a> {
    /// The caller's span, if the request names one.
    pub parent: Option<Parent>,
    /// The caller's `tracestate` (the first one), kept only beside a valid `traceparent`.
    pub tracestate: Option<&'a HeaderValue>,
    /// The request carries a `tracestate` that belongs to no valid `traceparent`: W3C says it
    /// is invalid and must be discarded, so it is neither recorded nor forwarded.
    pub stray_tracestate: bool,
}

/// Reads the caller's context — `traceparent` first, else B3; malformed headers are ignored (a
/// new trace starts), as the W3C spec says — and the request's `tracestate`, from one pass
/// over the headers.
pub fn extract_with_state(headers: &HeaderMap) -> Incoming<'_> {
    let found = Found::scan(headers);
    let parent = found.parent();
    let w3c = parent.as_ref().is_some_and(|p| p.format == Format::W3c);
    Incoming {
        parent,
        tracestate: found.tracestate.filter(|_| w3c),
        stray_tracestate: found.tracestate.is_some() && !w3c,
    }
}

/// The context headers of a request (the first value of each), found in one pass over its
/// headers. A lookup per name hashed the name and probed the map, 150–180 instructions each:
/// three on a request without context (every request an app sends through the client side),
/// four when its span was sampled — more than comparing the names a request carries, a
/// length check for most of them (docs/benchmarks.md, "Session 17").
#[derive(Default)]
struct Found<'a> {
    traceparent: Option<&'a HeaderValue>,
    tracestate: Option<&'a HeaderValue>,
    b3: Option<&'a HeaderValue>,
    b3_trace_id: Option<&'a HeaderValue>,
    b3_span_id: Option<&'a HeaderValue>,
    b3_sampled: Option<&'a HeaderValue>,
    b3_flags: Option<&'a HeaderValue>,
}

impl<'a> Found<'a> {
    fn scan(headers: &'a HeaderMap) -> Found<'a> {
        let mut f = Found::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                TRACEPARENT_NAME => &mut f.traceparent,
                TRACESTATE_NAME => &mut f.tracestate,
                B3_NAME => &mut f.b3,
                B3_TRACE_ID_NAME => &mut f.b3_trace_id,
                B3_SPAN_ID_NAME => &mut f.b3_span_id,
                B3_SAMPLED_NAME => &mut f.b3_sampled,
                B3_FLAGS_NAME => &mut f.b3_flags,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        f
    }

    fn parent(&self) -> Option<Parent> {
        if let Some(p) = self
            .traceparent
            .and_then(|v| parse_traceparent_bytes(v.as_bytes()))
        {
            return Some(p);
        }
        if let Some(p) = self
            .b3
            .and_then(|v| v.to_str().ok())
            .and_then(parse_b3_single)
        {
            return Some(p);
        }
        let trace_id = self.b3_trace_id?.to_str().ok()?;
        let span_id = self.b3_span_id?.to_str().ok()?;
        let sampled = if self.b3_flags.is_some_and(|v| v.as_bytes() == b"1") {
            Some(true)
        } else {
            match self.b3_sampled.map(|v| v.as_bytes()) {
                Some(b"1") | Some(b"true") => Some(true),
                Some(b"0") | Some(b"false") => Some(false),
                _ => None,
            }
        };
        Some(Parent {
            trace_id: b3_trace_id(trace_id)?,
            span_id: hex_span_id(span_id)?,
            sampled,
            format: Format::B3Multi,
        })
    }
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; a later version may append fields.
pub fn parse_traceparent(s: &str) -> Option<Parent> {
    parse_traceparent_bytes(s.as_bytes())
}

/// [`parse_traceparent`] on the header's bytes, in one pass (every sampled request on the
/// inbound side reads one).
fn parse_traceparent_bytes(b: &[u8]) -> Option<Parent> {
    let b = b.trim_ascii();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = lower_hex(&b[..2])?;
    if version == 0xff {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more, after a `-`.
    if b.len() > 55 && (version == 0 || b[55] != b'-') {
        return None;
    }
    let trace_id = u128::from(hex16(&b[3..19])?) << 64 | u128::from(hex16(&b[19..35])?);
    let span_id = hex16(&b[36..52])?;
    let flags = lower_hex(&b[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id: TraceId::from(trace_id),
        span_id: SpanId::from(span_id),
        sampled: Some(flags & 1 == 1),
        format: Format::W3c,
    })
}

/// The value of each byte as a lower-case hex digit; 0xff for any other byte.
static HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 16 {
        t[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Lower-case hex digits (at most 32) as a number; None on anything else. Without a branch
/// per digit: in random ids digits and letters alternate unpredictably, and a `match` on
/// each byte cost a mispredicted branch every few digits (most of an unsampled request's
/// tracing time on the inbound side, in `cargo bench -p wasmesh-proxy --bench spans`).
fn lower_hex(s: &[u8]) -> Option<u128> {
    let mut n = 0u128;
    let mut bad = 0u8;
    for &c in s {
        let d = HEX_VALUE[usize::from(c)];
        bad |= d;
        n = n << 4 | u128::from(d & 0x0f);
    }
    (bad < 0x10).then_some(n)
}

/// Sixteen lower-case hex digits (a span id, half a trace id) as a number: [`hex8`] twice.
fn hex16(s: &[u8]) -> Option<u64> {
    let (hi, lo) = s.split_at_checked(8)?;
    let hi = hex8(hi.try_into().ok()?)?;
    let lo = hex8(lo.try_into().ok()?)?;
    Some(u64::from(hi) << 32 | u64::from(lo))
}

/// Eight lower-case hex digits as a number, the first the most significant; None if any
/// byte is another. All eight at once in a `u64` (SWAR): per digit, the table loop of
/// [`lower_hex`] cost about 13 instructions and a `u128` shift, and its unrolled code cost
/// instruction-cache misses on every sampled request the inbound side reads
/// (docs/benchmarks.md, "Session 19").
fn hex8(b: [u8; 8]) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let v = u64::from_le_bytes(b);
    // With every byte below 0x80, adding 0x80 - n to each sets its high bit exactly when it
    // is n or more, and carries into no other byte.
    let at_least = |n: u8| v.wrapping_add(ONES * u64::from(0x80 - n)) & HIGH;
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if v & HIGH != 0 || digit | letter != HIGH {
        return None;
    }
    // Each byte its digit's value; then pairs of bytes into one, twice, byte 0 the highest.
    let nibbles = (v & (ONES * 0x0f)) + (letter >> 7) * 9;
    let bytes = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    let halves = ((bytes << 8) | (bytes >> 16)) & 0x0000_ffff_0000_ffff;
    Some((((halves << 16) | (halves >> 32)) & 0xffff_ffff) as u32)
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`; a lone sampling state (`0`)
/// carries no context.
fn parse_b3_single(s: &str) -> Option<Parent> {
    let mut parts = s.trim().split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some("1") | Some("d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Single,
    })
}

/// B3 trace ids are 16 or 32 hex digits; a 64-bit one is the low half of ours.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    if !(s.len() == 16 || s.len() == 32) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = TraceId::from_hex(&s.to_ascii_lowercase()).ok()?;
    (id != TraceId::INVALID).then_some(id)
}

fn hex_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = SpanId::from_hex(&s.to_ascii_lowercase()).ok()?;
    (id != SpanId::INVALID).then_some(id)
}

/// Lower-case hex of `bytes` into `out` (twice as long), four bytes at a time ([`hex4`]).
pub(crate) fn hex_into(out: &mut [u8], bytes: &[u8]) {
    let (chunks, tail) = bytes.as_chunks::<4>();
    let (out_chunks, out_tail) = out.split_at_mut(chunks.len() * 8);
    for (o, b) in out_chunks.chunks_exact_mut(8).zip(chunks) {
        o.copy_from_slice(&hex4(u32::from_be_bytes(*b)));
    }
    for (o, b) in out_tail.chunks_exact_mut(2).zip(tail) {
        o.copy_from_slice(&hex4(u32::from(*b))[6..]);
    }
}

/// The eight hex digits of `x`, most significant first, computed in a `u64` (SWAR): its
/// nibbles spread one per byte, then each byte made its digit. A 512-byte table of digit pairs
/// cost a load per byte, and data-cache misses on most requests: random ids touch most of
/// its lines, which the rest of a request's work had evicted (docs/benchmarks.md,
/// "Session 19").
fn hex4(x: u32) -> [u8; 8] {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut n = u64::from(x);
    n = (n | n << 16) & 0x0000_ffff_0000_ffff;
    n = (n | n << 8) & 0x00ff_00ff_00ff_00ff;
    n = (n | n << 4) & 0x0f0f_0f0f_0f0f_0f0f;
    // 1 in each byte whose nibble is 10 or more (adding 6 reaches 16): a letter.
    let letters = ((n + ONES * 6) >> 4) & ONES;
    (n + ONES * u64::from(b'0') + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
}

/// Writes the context the next hop continues: `traceparent` with `span_id` as its parent
/// (a valid `tracestate` passes through untouched; a stray one is the caller's to remove, see
/// [`Incoming::stray_tracestate`]), and B3 in the form the request came with.
pub fn inject(
    headers: &mut HeaderMap,
    trace_id: TraceId,
    span_id: SpanId,
    flags: TraceFlags,
    incoming: Option<Format>,
) {
    let sampled = flags.is_sampled();
    // `00-` 32 hex `-` 16 hex `-` 2 hex: formatted on the stack, one copy into the value.
    let mut tp = [0u8; 55];
    tp[..3].copy_from_slice(b"00-");
    hex_into(&mut tp[3..35], &trace_id.to_bytes());
    tp[35] = b'-';
    hex_into(&mut tp[36..52], &span_id.to_bytes());
    tp[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    // Owned by its `Bytes`: the outbound side keeps the request head for retries and copies
    // it per try, and a copy of this is a reference count, where a value copied out of a
    // slice is moved to a shared allocation on its first copy.
    if let Ok(mut v) = HeaderValue::from_maybe_shared(Bytes::from_owner(tp)) {
        // Unique per request: over HTTP/2 it must not enter the HPACK dynamic table, where
        // each new value would evict entries the next requests' headers could have used.
        v.set_sensitive(true);
        headers.insert(TRACEPARENT.clone(), v);
    }
    match incoming {
        Some(Format::B3Single) => {
            let v = format!("{trace_id}-{span_id}-{}", if sampled { "1" } else { "0" });
            if let Ok(mut v) = HeaderValue::from_str(&v) {
                v.set_sensitive(true);
                headers.insert(B3.clone(), v);
            }
        }
        Some(Format::B3Multi) => {
            // The caller's span becomes the parent; the span id is ours.
            let parent = headers.get(&B3_SPAN_ID).cloned();
            for (name, value) in [
                (&B3_TRACE_ID, trace_id.to_string()),
                (&B3_SPAN_ID, span_id.to_string()),
                (&B3_SAMPLED, if sampled { "1" } else { "0" }.to_string()),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(name.clone(), v);
                }
            }
            headers.remove(&B3_FLAGS);
            match parent {
                Some(p) => {
                    headers.insert(B3_PARENT_SPAN_ID.clone(), p);
                }
                None => {
                    headers.remove(&B3_PARENT_SPAN_ID);
                }
            }
        }
        Some(Format::W3c) | None => {}
    }
}

/// Lets this request's `traceparent` enter the HTTP/2 peer's HPACK dynamic table. Every
/// value is new, so [`inject`] marks it never-indexed: indexed, each would evict entries the
/// next requests' headers reuse. But h2 encodes a never-indexed header by the index of its
/// *name* when the table holds another value of it, so a connection's first request, whose
/// value does enter the table, saves the next ones the name's Huffman coding, and the peer
/// its decoding and parsing (docs/benchmarks.md, "Session 19").
pub fn index_name(headers: &mut HeaderMap) {
    if let Some(v) = headers.get_mut(&TRACEPARENT) {
        v.set_sensitive(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn one_pass_finds_the_first_value_of_each_context_header_among_others() {
        let mut h = map(&[
            ("user-agent", "curl/8"),
            ("tracestate", "vendor=abc"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]);
        // Two `traceparent`s (a proxy that appended one): the first is the caller's.
        let first = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.append(&TRACEPARENT, HeaderValue::from_static(first));
        h.append(
            &TRACEPARENT,
            HeaderValue::from_static("00-11111111111111111111111111111111-2222222222222222-00"),
        );
        h.append(&TRACESTATE, HeaderValue::from_static("other=1"));
        let incoming = extract_with_state(&h);
        let state = incoming.tracestate;
        let p = incoming.parent.expect("w3c");
        assert_eq!(p.format, Format::W3c);
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(p.sampled, Some(true));
        assert_eq!(state.map(HeaderValue::as_bytes), Some(&b"vendor=abc"[..]));
        assert!(!incoming.stray_tracestate);
        // Without `traceparent`, the B3 headers among the others are found, and the
        // `tracestate` belongs to no W3C parent: it is stray.
        h.remove(&TRACEPARENT);
        let incoming = extract_with_state(&h);
        let p = incoming.parent.expect("b3 multi");
        assert_eq!(p.format, Format::B3Multi);
        assert_eq!(p.span_id.to_string(), "e457b5a2e4d86bd1");
        assert_eq!(p.sampled, None);
        assert_eq!(incoming.tracestate, None);
        assert!(incoming.stray_tracestate);
        // Nothing: no context, no state.
        assert_eq!(
            extract_with_state(&map(&[("accept", "*/*")])),
            Incoming {
                parent: None,
                tracestate: None,
                stray_tracestate: false
            }
        );
    }

    #[test]
    fn hex_is_written_in_lower_case_for_every_byte_value() {
        // Every byte value at each of a chunk's four places, and in a tail shorter than one.
        for rotate in 0..4 {
            let mut bytes: Vec<u8> = (0..=255).collect();
            bytes.rotate_left(rotate);
            bytes.push(0xa9);
            let mut out = vec![0u8; 2 * bytes.len()];
            hex_into(&mut out, &bytes);
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(String::from_utf8(out).expect("ascii"), expected);
        }
        let mut out = [0u8; 32];
        hex_into(
            &mut out,
            &0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128.to_be_bytes(),
        );
        assert_eq!(&out, b"4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn traceparent_is_read_and_malformed_ones_are_ignored() {
        let p = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            p.trace_id,
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("hex")
        );
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(p.sampled, Some(true));
        let p = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
            .expect("valid");
        assert_eq!(p.sampled, Some(false));
        // Flags other than sampled are ignored; surrounding blanks too.
        let p = parse_traceparent(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03 ")
            .expect("valid");
        assert_eq!(p.sampled, Some(true));
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        // A future version with an extra field is read by its first four.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01xyz",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lower_hex_takes_exactly_the_lower_case_digits() {
        for c in 0..=255u8 {
            let want = match c {
                b'0'..=b'9' => Some(u128::from(c - b'0')),
                b'a'..=b'f' => Some(u128::from(c - b'a' + 10)),
                _ => None,
            };
            assert_eq!(lower_hex(&[c]), want, "byte {c}");
            // A bad byte anywhere spoils the whole number.
            assert_eq!(
                lower_hex(&[b'a', c, b'0']).is_some(),
                want.is_some(),
                "byte {c}"
            );
        }
        assert_eq!(
            lower_hex(b"4bf92f3577b34da6a3ce929d0e0e4736"),
            Some(0x4bf92f3577b34da6a3ce929d0e0e4736)
        );
        assert_eq!(lower_hex(b""), Some(0));
    }

    #[test]
    fn eight_hex_digits_at_once_read_as_the_table_reads_them() {
        // Every byte value at every position, among valid digits.
        for at in 0..8 {
            for c in 0..=255u8 {
                let mut b = *b"9af03be4";
                b[at] = c;
                let want = lower_hex(&b).map(|n| n as u32);
                assert_eq!(hex8(b), want, "byte {c:#x} at {at}");
            }
        }
        // Random strings of digits, and of digits with one neighbour byte of the ranges
        // (`/`, `:`, `` ` ``, `g`, upper case) put in.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b: [u8; 8] =
                std::array::from_fn(|j| b"0123456789abcdef"[(x >> (4 * j)) as usize & 15]);
            if i % 2 == 1 {
                b[(x >> 40) as usize % 8] = b"/:`gAF@G"[(x >> 48) as usize % 8];
            }
            assert_eq!(hex8(b), lower_hex(&b).map(|n| n as u32), "{:?}", b);
        }
        assert_eq!(hex16(b"00f067aa0ba902b7"), Some(0x00f0_67aa_0ba9_02b7));
        assert_eq!(hex16(b"00f067aa0ba902b"), None);
    }

    #[test]
    fn b3_single_and_multi_are_read() {
        let h = map(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let p = extract(&h).expect("b3");
        assert_eq!(p.format, Format::B3Single);
        assert_eq!(p.sampled, Some(true));
        assert_eq!(p.span_id.to_string(), "e457b5a2e4d86bd1");
        let h = map(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]);
        let p = extract(&h).expect("b3 multi");
        assert_eq!(p.format, Format::B3Multi);
        assert_eq!(p.sampled, Some(false));
        // A 64-bit trace id is the low half.
        assert_eq!(p.trace_id.to_string(), "0000000000000000463ac35c9f6413ad");
        // traceparent wins over B3.
        let h = map(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ]);
        assert_eq!(extract(&h).expect("w3c").format, Format::W3c);
        assert_eq!(extract(&map(&[("b3", "0")])), None);
    }

    #[test]
    fn inject_writes_traceparent_keeps_tracestate_and_rewrites_b3() {
        let mut h = map(&[
            ("tracestate", "congo=t61rcWkgMzE"),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let t = TraceId::from_hex("0000000000000000463ac35c9f6413ad").expect("hex");
        let s = SpanId::from_hex("00f067aa0ba902b7").expect("hex");
        inject(&mut h, t, s, TraceFlags::SAMPLED, Some(Format::B3Multi));
        assert_eq!(
            h["traceparent"],
            "00-0000000000000000463ac35c9f6413ad-00f067aa0ba902b7-01"
        );
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(h["x-b3-spanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-sampled"], "1");
        let mut h = HeaderMap::new();
        inject(&mut h, t, s, TraceFlags::NOT_SAMPLED, None);
        assert_eq!(
            h["traceparent"],
            "00-0000000000000000463ac35c9f6413ad-00f067aa0ba902b7-00"
        );
        assert!(!h.contains_key("x-b3-traceid"));
    }
}
