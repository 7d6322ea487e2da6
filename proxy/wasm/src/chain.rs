//! Several plugins in order: a [`FilterChain`] sorts plugins by phase, then priority (higher
//! first), then name, and starts a [`ChainStream`] per request. Request steps run the filters
//! in order, response steps in reverse, as in Envoy. A local reply from a request step goes
//! back through the response callbacks of the filters that saw the request (the sender
//! included), as Envoy does; one from a response step replaces the response as is.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;

use crate::action::{BodyVerdict, LocalReply, Verdict};
use crate::plugin::Plugin;
use crate::properties::StreamInfo;
use crate::stream::HttpStream;

/// An ordered set of plugins. Cheap to clone; swap a new one in to reconfigure — streams
/// already started keep the chain (and plugin instances) they started with.
#[derive(Clone, Default, Debug)]
pub struct FilterChain {
    plugins: Arc<[Plugin]>,
}

impl FilterChain {
    /// Orders `plugins` by phase, priority (higher first) and name.
    pub fn new(mut plugins: Vec<Plugin>) -> Self {
        plugins.sort_by(|a, b| {
            let (pa, qa) = a.order();
            let (pb, qb) = b.order();
            pa.cmp(&pb)
                .then(qb.cmp(&qa))
                .then_with(|| a.name().cmp(b.name()))
        });
        FilterChain {
            plugins: plugins.into(),
        }
    }

    /// The plugins in execution order.
    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    /// Whether the chain has no plugin (the proxy can skip it entirely).
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Starts a request through every plugin.
    pub fn new_stream(&self, info: StreamInfo) -> ChainStream {
        let info = Arc::new(info);
        ChainStream {
            streams: self
                .plugins
                .iter()
                .map(|p| p.new_http_stream(info.clone()))
                .collect(),
            seen: 0,
        }
    }
}

/// One request through a [`FilterChain`]. Call the steps in stream order; each returns once
/// every filter has let the data through (or one answered or reset the stream).
pub struct ChainStream {
    streams: Vec<HttpStream>,
    /// How many filters saw the request headers.
    seen: usize,
}

impl ChainStream {
    /// The per-plugin streams, in order.
    pub fn streams(&mut self) -> &mut [HttpStream] {
        &mut self.streams
    }

    /// Records the upstream endpoint chosen (`upstream.*` properties).
    pub fn set_upstream(&mut self, addr: std::net::SocketAddr) {
        for s in &mut self.streams {
            s.set_upstream(addr);
        }
    }

    /// Request headers through every filter (routing should happen after this: filters may
    /// have set the headers a route matches).
    pub async fn on_request_headers(
        &mut self,
        parts: &mut http::request::Parts,
        end_of_stream: bool,
    ) -> Verdict {
        for i in 0..self.streams.len() {
            self.seen = i + 1;
            match self.streams[i]
                .on_request_headers(parts, end_of_stream)
                .await
            {
                Verdict::Continue => {}
                Verdict::LocalReply(r) => {
                    return Verdict::LocalReply(self.reply_through(i, r).await);
                }
                Verdict::Reset => return Verdict::Reset,
            }
        }
        Verdict::Continue
    }

    /// A request body chunk through every filter; returns what to send upstream now.
    pub async fn on_request_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyVerdict {
        let mut data = chunk;
        for i in 0..self.streams.len() {
            match self.streams[i].on_request_body(data, end_of_stream).await {
                BodyVerdict::Data(d) => data = d,
                BodyVerdict::LocalReply(r) => {
                    return BodyVerdict::LocalReply(self.reply_through(i, r).await);
                }
                BodyVerdict::Reset => return BodyVerdict::Reset,
            }
        }
        BodyVerdict::Data(data)
    }

    /// Request trailers through every filter; returns body bytes to send before them.
    pub async fn on_request_trailers(&mut self, trailers: &mut HeaderMap) -> BodyVerdict {
        let mut out = bytes::BytesMut::new();
        for i in 0..self.streams.len() {
            if !out.is_empty() {
                // What earlier filters released goes through this one first.
                match self.streams[i]
                    .on_request_body(out.split().freeze(), false)
                    .await
                {
                    BodyVerdict::Data(d) => out.extend_from_slice(&d),
                    BodyVerdict::LocalReply(r) => {
                        return BodyVerdict::LocalReply(self.reply_through(i, r).await);
                    }
                    BodyVerdict::Reset => return BodyVerdict::Reset,
                }
            }
            match self.streams[i].on_request_trailers(trailers).await {
                BodyVerdict::Data(d) => out.extend_from_slice(&d),
                BodyVerdict::LocalReply(r) => {
                    return BodyVerdict::LocalReply(self.reply_through(i, r).await);
                }
                BodyVerdict::Reset => return BodyVerdict::Reset,
            }
        }
        BodyVerdict::Data(out.freeze())
    }

    /// Response headers through every filter, last to first.
    pub async fn on_response_headers(
        &mut self,
        parts: &mut http::response::Parts,
        end_of_stream: bool,
    ) -> Verdict {
        for i in (0..self.streams.len()).rev() {
            match self.streams[i]
                .on_response_headers(parts, end_of_stream)
                .await
            {
                Verdict::Continue => {}
                other => return other,
            }
        }
        Verdict::Continue
    }

    /// A response body chunk through every filter, last to first.
    pub async fn on_response_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyVerdict {
        let mut data = chunk;
        for i in (0..self.streams.len()).rev() {
            match self.streams[i].on_response_body(data, end_of_stream).await {
                BodyVerdict::Data(d) => data = d,
                other => return other,
            }
        }
        BodyVerdict::Data(data)
    }

    /// Response trailers through every filter, last to first.
    pub async fn on_response_trailers(&mut self, trailers: &mut HeaderMap) -> BodyVerdict {
        let mut out = bytes::BytesMut::new();
        for i in (0..self.streams.len()).rev() {
            if !out.is_empty() {
                match self.streams[i]
                    .on_response_body(out.split().freeze(), false)
                    .await
                {
                    BodyVerdict::Data(d) => out.extend_from_slice(&d),
                    other => return other,
                }
            }
            match self.streams[i].on_response_trailers(trailers).await {
                BodyVerdict::Data(d) => out.extend_from_slice(&d),
                other => return other,
            }
        }
        BodyVerdict::Data(out.freeze())
    }

    /// Runs a local reply sent by filter `from` through the response callbacks of filters
    /// `from..=0`, and returns the reply as they left it.
    async fn reply_through(&mut self, from: usize, reply: LocalReply) -> LocalReply {
        let LocalReply {
            status,
            mut headers,
            body,
            details,
        } = reply;
        headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(body.len()),
        );
        if !body.is_empty() && !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
        }
        let mut res = http::Response::new(());
        *res.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        *res.headers_mut() = headers;
        let (mut parts, ()) = res.into_parts();
        let upto = from.min(self.seen.saturating_sub(1));
        for i in (0..=upto).rev() {
            if let Verdict::LocalReply(r) = self.streams[i]
                .on_response_headers(&mut parts, body.is_empty())
                .await
            {
                return r;
            }
        }
        let mut body = body;
        if !body.is_empty() {
            for i in (0..=upto).rev() {
                match self.streams[i].on_response_body(body.clone(), true).await {
                    BodyVerdict::Data(d) => body = d,
                    BodyVerdict::LocalReply(r) => return r,
                    BodyVerdict::Reset => break,
                }
            }
        }
        LocalReply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            details,
        }
    }

    /// Ends every filter's context (`on_done`, `on_log`, `on_delete`); also done on drop.
    pub fn finish(&mut self) {
        for s in &mut self.streams {
            s.finish();
        }
    }
}
