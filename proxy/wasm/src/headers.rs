//! Header maps as a filter sees them: an `http::HeaderMap` plus the pseudo-headers
//! (`:method`, `:scheme`, `:authority`, `:path` on requests, `:status` on responses), and the
//! Proxy-Wasm wire format for whole maps (`u32 count | (u32 klen, u32 vlen)* | (key\0 value\0)*`).
//!
//! The proxy's `http::request::Parts` / `response::Parts` are moved into a [`Headers`] for the
//! callbacks and moved back afterwards ([`Headers::from_request`], [`Headers::write_request`]):
//! the header map itself is never copied. As in Envoy, an HTTP/1 `host` header is shown to the
//! filter as `:authority` (and written back as `host`).

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};

/// Why a mutation was not applied (the guest still gets `OK`: the SDK panics on anything else).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HeaderError {
    #[error("invalid header name {0:?}")]
    Name(String),
    #[error("invalid value for header {0:?}")]
    Value(String),
}

/// A header map with its pseudo-headers.
#[derive(Debug, Default, Clone)]
pub(crate) struct Headers {
    pub(crate) pseudo: Vec<(&'static str, Bytes)>,
    pub(crate) map: HeaderMap,
    had_host: bool,
    absolute_uri: bool,
    /// The request's `host` header, put back as is when no pseudo-header changed.
    host: Option<HeaderValue>,
    /// Whether a pseudo-header was set or removed (then `parts` is rebuilt from them).
    pseudo_changed: bool,
}

const REQUEST_PSEUDO: [&str; 4] = [":authority", ":path", ":method", ":scheme"];

fn pseudo_name(key: &[u8]) -> Option<&'static str> {
    [":authority", ":path", ":method", ":scheme", ":status"]
        .into_iter()
        .find(|p| p.as_bytes().eq_ignore_ascii_case(key))
}

impl Headers {
    /// Plain map (trailers, callout responses): no pseudo-headers.
    pub(crate) fn plain(map: HeaderMap) -> Self {
        Headers {
            map,
            ..Default::default()
        }
    }

    /// Moves the request's headers out of `parts` into a filter view.
    pub(crate) fn from_request(parts: &mut http::request::Parts, default_scheme: &str) -> Self {
        let mut map = std::mem::take(&mut parts.headers);
        let absolute_uri = parts.uri.authority().is_some();
        let host = map.remove(HOST);
        let had_host = host.is_some();
        let authority = match (parts.uri.authority(), &host) {
            (Some(a), _) => Bytes::copy_from_slice(a.as_str().as_bytes()),
            (None, Some(h)) => Bytes::copy_from_slice(h.as_bytes()),
            (None, None) => Bytes::new(),
        };
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let scheme = parts.uri.scheme_str().unwrap_or(default_scheme);
        let scheme = match scheme {
            "http" => Bytes::from_static(b"http"),
            "https" => Bytes::from_static(b"https"),
            other => Bytes::copy_from_slice(other.as_bytes()),
        };
        let method = match parts.method {
            Method::GET => Bytes::from_static(b"GET"),
            Method::POST => Bytes::from_static(b"POST"),
            Method::PUT => Bytes::from_static(b"PUT"),
            Method::DELETE => Bytes::from_static(b"DELETE"),
            Method::HEAD => Bytes::from_static(b"HEAD"),
            Method::PATCH => Bytes::from_static(b"PATCH"),
            Method::OPTIONS => Bytes::from_static(b"OPTIONS"),
            ref other => Bytes::copy_from_slice(other.as_str().as_bytes()),
        };
        let pseudo = vec![
            (REQUEST_PSEUDO[0], authority),
            (REQUEST_PSEUDO[1], Bytes::copy_from_slice(path.as_bytes())),
            (REQUEST_PSEUDO[2], method),
            (REQUEST_PSEUDO[3], scheme),
        ];
        Headers {
            pseudo,
            map,
            had_host,
            absolute_uri,
            host,
            pseudo_changed: false,
        }
    }

    /// Moves the (possibly modified) view back into `parts`. Pseudo-headers that no longer parse
    /// leave the original value in place; the error says which.
    pub(crate) fn write_request(self, parts: &mut http::request::Parts) -> Result<(), HeaderError> {
        let Headers {
            pseudo,
            mut map,
            had_host,
            absolute_uri,
            host,
            pseudo_changed,
        } = self;
        if !pseudo_changed {
            if let Some(h) = host {
                map.insert(HOST, h);
            }
            parts.headers = map;
            return Ok(());
        }
        let get = |n: &str| pseudo.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
        let mut result = Ok(());
        if let Some(m) = get(":method") {
            match Method::from_bytes(&m) {
                Ok(m) => parts.method = m,
                Err(_) => result = Err(HeaderError::Value(":method".into())),
            }
        }
        let authority = get(":authority").unwrap_or_default();
        let path = get(":path").unwrap_or_else(|| Bytes::from_static(b"/"));
        let scheme = get(":scheme").unwrap_or_else(|| Bytes::from_static(b"http"));
        let uri = if absolute_uri {
            Uri::builder()
                .scheme(scheme.as_ref())
                .authority(authority.as_ref())
                .path_and_query(path.as_ref())
                .build()
        } else {
            Uri::builder().path_and_query(path.as_ref()).build()
        };
        match uri {
            Ok(u) => parts.uri = u,
            Err(_) => result = Err(HeaderError::Value(":path".into())),
        }
        if (had_host || !absolute_uri)
            && !authority.is_empty()
            && let Ok(v) = HeaderValue::from_maybe_shared(authority)
        {
            map.insert(HOST, v);
        }
        parts.headers = map;
        result
    }

    /// Moves the response's headers out of `parts` into a filter view.
    pub(crate) fn from_response(parts: &mut http::response::Parts) -> Self {
        let map = std::mem::take(&mut parts.headers);
        let status = Bytes::copy_from_slice(parts.status.as_str().as_bytes());
        Headers {
            pseudo: vec![(":status", status)],
            map,
            ..Default::default()
        }
    }

    /// Moves the view back into `parts`.
    pub(crate) fn write_response(
        self,
        parts: &mut http::response::Parts,
    ) -> Result<(), HeaderError> {
        if !self.pseudo_changed {
            parts.headers = self.map;
            return Ok(());
        }
        let mut result = Ok(());
        if let Some((_, s)) = self.pseudo.iter().find(|(k, _)| *k == ":status") {
            match StatusCode::from_bytes(s) {
                Ok(s) => parts.status = s,
                Err(_) => result = Err(HeaderError::Value(":status".into())),
            }
        }
        parts.headers = self.map;
        result
    }

    /// The `:status` of a response view, if it parses.
    pub(crate) fn status(&self) -> Option<u16> {
        let (_, s) = self.pseudo.iter().find(|(k, _)| *k == ":status")?;
        std::str::from_utf8(s).ok()?.parse().ok()
    }

    pub(crate) fn pseudo_value(&self, name: &str) -> Option<&Bytes> {
        self.pseudo.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// First value of `key` (case-insensitive), as Envoy answers `proxy_get_header_map_value`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if key.first() == Some(&b':') {
            let name = pseudo_name(key)?;
            return self.pseudo_value(name).map(|v| v.as_ref());
        }
        let name = HeaderName::from_bytes(key).ok()?;
        self.map.get(name).map(|v| v.as_bytes())
    }

    /// All values of `key` joined with `,` (the Envoy attribute `request.headers.<name>`).
    pub(crate) fn get_joined(&self, key: &[u8]) -> Option<Vec<u8>> {
        if key.first() == Some(&b':') {
            return self.get(key).map(<[u8]>::to_vec);
        }
        let name = HeaderName::from_bytes(key).ok()?;
        let mut values = self.map.get_all(name).iter();
        let mut out = values.next()?.as_bytes().to_vec();
        for v in values {
            out.push(b',');
            out.extend_from_slice(v.as_bytes());
        }
        Some(out)
    }

    pub(crate) fn add(&mut self, key: &[u8], value: &[u8]) -> Result<(), HeaderError> {
        if key.first() == Some(&b':') {
            return self.set_pseudo(key, value);
        }
        let (n, v) = parse_pair(key, value)?;
        self.map.append(n, v);
        Ok(())
    }

    pub(crate) fn replace(&mut self, key: &[u8], value: &[u8]) -> Result<(), HeaderError> {
        if key.first() == Some(&b':') {
            return self.set_pseudo(key, value);
        }
        let (n, v) = parse_pair(key, value)?;
        self.map.insert(n, v);
        Ok(())
    }

    pub(crate) fn remove(&mut self, key: &[u8]) {
        if key.first() == Some(&b':') {
            if let Some(name) = pseudo_name(key) {
                self.pseudo.retain(|(k, _)| *k != name);
                self.pseudo_changed = true;
            }
            return;
        }
        if let Ok(n) = HeaderName::from_bytes(key) {
            self.map.remove(n);
        }
    }

    fn set_pseudo(&mut self, key: &[u8], value: &[u8]) -> Result<(), HeaderError> {
        let name = pseudo_name(key).ok_or_else(|| HeaderError::Name(lossy(key)))?;
        let value = Bytes::copy_from_slice(value);
        self.pseudo_changed = true;
        match self.pseudo.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) => *v = value,
            None => self.pseudo.push((name, value)),
        }
        Ok(())
    }

    /// Replaces the whole map (`proxy_set_header_map_pairs`). Pseudo-headers that the new map
    /// leaves out are removed, as in Envoy. Invalid entries are skipped; the first is reported.
    pub(crate) fn set_all(&mut self, pairs: Vec<(&[u8], &[u8])>) -> Result<(), HeaderError> {
        self.pseudo.clear();
        self.map.clear();
        self.pseudo_changed = true;
        let mut result = Ok(());
        for (k, v) in pairs {
            if let Err(e) = self.add(k, v) {
                result = result.and(Err(e));
            }
        }
        result
    }

    pub(crate) fn len(&self) -> usize {
        self.pseudo.len() + self.map.len()
    }

    /// Size of the serialized map.
    pub(crate) fn serialized_len(&self) -> usize {
        let mut n = 4;
        for (k, v) in &self.pseudo {
            n += 8 + k.len() + v.len() + 2;
        }
        for (k, v) in &self.map {
            n += 8 + k.as_str().len() + v.len() + 2;
        }
        n
    }

    /// Writes the serialized map into `out` (exactly [`Headers::serialized_len`] bytes).
    pub(crate) fn serialize_into(&self, out: &mut [u8]) {
        let mut w = Writer {
            out,
            sizes: 4,
            data: 4 + 8 * self.len(),
        };
        w.put_u32_at(0, self.len() as u32);
        for (k, v) in &self.pseudo {
            w.entry(k.as_bytes(), v);
        }
        for (k, v) in &self.map {
            w.entry(k.as_str().as_bytes(), v.as_bytes());
        }
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn parse_pair(key: &[u8], value: &[u8]) -> Result<(HeaderName, HeaderValue), HeaderError> {
    let n = HeaderName::from_bytes(key).map_err(|_| HeaderError::Name(lossy(key)))?;
    let v = HeaderValue::from_bytes(value).map_err(|_| HeaderError::Value(lossy(key)))?;
    Ok((n, v))
}

struct Writer<'a> {
    out: &'a mut [u8],
    sizes: usize,
    data: usize,
}

impl Writer<'_> {
    fn put_u32_at(&mut self, at: usize, v: u32) {
        self.out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn entry(&mut self, k: &[u8], v: &[u8]) {
        self.put_u32_at(self.sizes, k.len() as u32);
        self.put_u32_at(self.sizes + 4, v.len() as u32);
        self.sizes += 8;
        let d = self.data;
        self.out[d..d + k.len()].copy_from_slice(k);
        self.out[d + k.len()] = 0;
        let d = d + k.len() + 1;
        self.out[d..d + v.len()].copy_from_slice(v);
        self.out[d + v.len()] = 0;
        self.data = d + v.len() + 1;
    }
}

/// Serializes pairs.
#[cfg(test)]
pub(crate) fn serialize_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> Vec<u8> {
    let n = pairs.clone().into_iter().count();
    let len: usize = 4 + pairs
        .clone()
        .into_iter()
        .map(|(k, v)| 10 + k.len() + v.len())
        .sum::<usize>();
    let mut out = vec![0u8; len];
    let mut w = Writer {
        out: &mut out,
        sizes: 4,
        data: 4 + 8 * n,
    };
    w.put_u32_at(0, n as u32);
    for (k, v) in pairs {
        w.entry(k, v);
    }
    out
}

/// Error parsing a serialized map coming from the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed header map from the filter ({0})")]
pub(crate) struct MapParseError(&'static str);

/// A header name and value borrowed from a serialized map.
pub(crate) type Pair<'a> = (&'a [u8], &'a [u8]);

/// Parses the wire format. An empty buffer (or a single NUL byte) is the empty map.
pub(crate) fn parse_pairs(buf: &[u8]) -> Result<Vec<Pair<'_>>, MapParseError> {
    if buf.len() <= 1 {
        return Ok(Vec::new());
    }
    let u32_at = |at: usize| -> Result<usize, MapParseError> {
        buf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or(MapParseError("truncated sizes"))
    };
    let n = u32_at(0)?;
    if n > buf.len() / 8 {
        return Err(MapParseError("count larger than the buffer"));
    }
    let mut data = 4 + 8 * n;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let kl = u32_at(4 + 8 * i)?;
        let vl = u32_at(8 + 8 * i)?;
        let k = buf
            .get(data..data + kl)
            .ok_or(MapParseError("truncated key"))?;
        data += kl + 1;
        let v = buf
            .get(data..data + vl)
            .ok_or(MapParseError("truncated value"))?;
        data += vl + 1;
        if data > buf.len() {
            return Err(MapParseError("missing terminator"));
        }
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_matches_the_spec_example() {
        let got = serialize_pairs([(&b"a"[..], &b"1"[..]), (b"b", b"22")]);
        let want: Vec<u8> = vec![
            2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b', 0,
            b'2', b'2', 0,
        ];
        assert_eq!(got, want);
        assert_eq!(
            parse_pairs(&got).unwrap(),
            vec![(&b"a"[..], &b"1"[..]), (b"b", b"22")]
        );
    }

    #[test]
    fn malformed_maps_are_errors_not_panics() {
        assert!(parse_pairs(&[5, 0, 0, 0, 1]).is_err());
        assert!(parse_pairs(&[1, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0, 0, b'a', 0]).is_err());
        assert_eq!(parse_pairs(&[0]).unwrap(), vec![]);
        assert_eq!(parse_pairs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn request_view_round_trips_and_maps_host_to_authority() {
        let req = http::Request::builder()
            .method("POST")
            .uri("/a?b=1")
            .header("host", "svc.test")
            .header("x-one", "1")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        let mut h = Headers::from_request(&mut parts, "http");
        assert_eq!(h.get(b":authority"), Some(&b"svc.test"[..]));
        assert_eq!(h.get(b":path"), Some(&b"/a?b=1"[..]));
        assert_eq!(
            h.get(b"host"),
            None,
            "host is shown as :authority, as in Envoy"
        );
        assert_eq!(h.get(b"X-One"), Some(&b"1"[..]));
        let mut buf = vec![0; h.serialized_len()];
        h.serialize_into(&mut buf);
        assert_eq!(parse_pairs(&buf).unwrap().len(), 5);

        h.replace(b":path", b"/rewritten").unwrap();
        h.add(b"x-added", b"yes").unwrap();
        h.write_request(&mut parts).unwrap();
        assert_eq!(parts.uri, "/rewritten");
        assert_eq!(parts.headers["host"], "svc.test");
        assert_eq!(parts.headers["x-added"], "yes");
    }

    #[test]
    fn first_value_for_get_all_values_joined_for_properties() {
        let mut h = Headers::plain(HeaderMap::new());
        h.add(b"x-dup", b"first").unwrap();
        h.add(b"x-dup", b"second").unwrap();
        assert_eq!(h.get(b"x-dup"), Some(&b"first"[..]));
        assert_eq!(h.get_joined(b"x-dup").unwrap(), b"first,second");
        h.replace(b"x-dup", b"only").unwrap();
        assert_eq!(h.get_joined(b"x-dup").unwrap(), b"only");
        assert_eq!(
            h.add(b"bad name", b"v"),
            Err(HeaderError::Name("bad name".into()))
        );
    }
}
