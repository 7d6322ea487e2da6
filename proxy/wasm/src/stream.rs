//! One request through one plugin: [`HttpStream`] drives the filter's stream context with
//! Envoy's semantics — the context is created at the first step; `Pause` from a headers
//! callback holds the stream (the step awaits the filter's `proxy_continue_stream`, a local
//! reply or a reset); `Pause` from a body callback keeps buffering and calls again with the
//! cumulative size; at end of stream a paused body waits like headers; a resume that arrives
//! while buffering flushes at the next step. Faults follow the fail strategy: FAIL_CLOSE turns
//! the step into a 503 local reply, FAIL_OPEN skips the filter from then on (what it held is
//! passed on). A stream whose instance was replaced because of *another* stream's fault
//! continues without the filter, unless it was paused waiting for it — then its own fail
//! strategy applies.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

use crate::abi::{Direction, GuestAction};
use crate::action::{BodyVerdict, LocalReply, Verdict};
use crate::config::FailStrategy;
use crate::context::{Mailbox, Salvage, StreamCtx, StreamEvent};
use crate::headers::Headers;
use crate::instance::{Fault, Instance};
use crate::metrics::HostEvent;
use crate::plugin::{PluginInner, Run};
use crate::properties::{RequestFacts, StreamInfo};

/// What a guest call made on behalf of a stream came to.
enum Step<R> {
    Ran(R),
    /// The filter is out of the picture for this stream (FAIL_OPEN, or its instance is gone).
    Skip,
    /// FAIL_CLOSE: answer with this.
    Reply(LocalReply),
}

/// How a paused (or just-run) step settled.
enum Settled {
    Continue,
    Reply(LocalReply),
    Reset,
}

/// One request/response through one plugin. Dropping it ends the filter's context
/// (`on_done`, `on_log`, `on_delete`).
pub struct HttpStream {
    plugin: Arc<PluginInner>,
    info: Arc<StreamInfo>,
    mailbox: Arc<Mailbox>,
    slot: usize,
    bound: Option<(u64, u32)>,
    bypass: bool,
    finished: bool,
    resumed: [bool; 2],
    upstream: Option<SocketAddr>,
    salvage: Option<Box<Salvage>>,
    pending: Option<Settled>,
}

fn idx(d: Direction) -> usize {
    match d {
        Direction::Request => 0,
        Direction::Response => 1,
    }
}

fn headers_slot(sc: &mut StreamCtx, d: Direction) -> &mut Option<Headers> {
    match d {
        Direction::Request => &mut sc.request_headers,
        Direction::Response => &mut sc.response_headers,
    }
}

fn trailers_slot(sc: &mut StreamCtx, d: Direction) -> &mut Option<Headers> {
    match d {
        Direction::Request => &mut sc.request_trailers,
        Direction::Response => &mut sc.response_trailers,
    }
}

fn body_buf(sc: &mut StreamCtx, d: Direction) -> &mut BytesMut {
    match d {
        Direction::Request => &mut sc.request_body,
        Direction::Response => &mut sc.response_body,
    }
}

fn lost_stream() -> Fault {
    Fault::Trap("stream context missing from its instance".into())
}

fn concat(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut m = BytesMut::with_capacity(a.len() + b.len());
    m.extend_from_slice(&a);
    m.extend_from_slice(&b);
    m.freeze()
}

impl HttpStream {
    pub(crate) fn new(plugin: Arc<PluginInner>, slot: usize, info: Arc<StreamInfo>) -> Self {
        HttpStream {
            plugin,
            info,
            mailbox: Arc::new(Mailbox::default()),
            slot,
            bound: None,
            bypass: false,
            finished: false,
            resumed: [false; 2],
            upstream: None,
            salvage: None,
            pending: None,
        }
    }

    /// The plugin's name.
    pub fn plugin_name(&self) -> &str {
        &self.plugin.meta.name
    }

    /// Whether the filter is out of this stream (it faulted under FAIL_OPEN, or its instance
    /// was replaced).
    pub fn is_bypassed(&self) -> bool {
        self.bypass
    }

    /// Records the upstream endpoint chosen (`upstream.address` / `upstream.port`).
    pub fn set_upstream(&mut self, addr: SocketAddr) {
        self.upstream = Some(addr);
    }

    fn fail(&mut self) -> Option<LocalReply> {
        self.bypass = true;
        let name = &self.plugin.meta.name;
        match self.plugin.meta.fail_strategy {
            FailStrategy::FailOpen => {
                self.plugin.host.metrics.event(name, HostEvent::FailOpen);
                None
            }
            FailStrategy::FailClose => {
                self.plugin.host.metrics.event(name, HostEvent::FailClosed);
                Some(LocalReply::fail_closed())
            }
        }
    }

    /// Runs `f` with the instance and this stream's context (created on first use).
    fn call<R>(&mut self, f: impl FnOnce(&mut Instance, u32) -> Result<R, Fault>) -> Step<R> {
        let (info, mailbox, bound, upstream) = (
            self.info.clone(),
            self.mailbox.clone(),
            self.bound,
            self.upstream,
        );
        let run = self
            .plugin
            .run(self.slot, bound.map(|(g, _)| g), |inst, _| {
                let ctx = match bound {
                    Some((_, ctx)) => ctx,
                    None => inst.create_stream(info, mailbox)?,
                };
                if upstream.is_some()
                    && let Some(sc) = inst.stream(ctx)
                {
                    sc.upstream = upstream;
                }
                f(inst, ctx).map(|r| (r, ctx))
            });
        match run {
            Run::Done((r, ctx), generation) => {
                self.bound = Some((generation, ctx));
                Step::Ran(r)
            }
            Run::Orphaned => {
                self.bypass = true;
                self.absorb();
                Step::Skip
            }
            Run::Fault | Run::Unavailable => {
                self.absorb();
                match self.fail() {
                    Some(reply) => Step::Reply(reply),
                    None => Step::Skip,
                }
            }
        }
    }

    /// Reads the stream's context without running guest code.
    fn fetch<R>(&mut self, f: impl FnOnce(&mut StreamCtx) -> R) -> Option<R> {
        let (generation, ctx) = self.bound?;
        match self.plugin.run(self.slot, Some(generation), |inst, _| {
            Ok(inst.stream(ctx).map(f))
        }) {
            Run::Done(r, _) => r,
            _ => None,
        }
    }

    /// Takes the events that arrived without waiting for them.
    fn absorb(&mut self) {
        for ev in self.mailbox.take() {
            match ev {
                StreamEvent::Resume(d) => self.resumed[idx(d)] = true,
                StreamEvent::LocalReply(r) => {
                    if self.pending.is_none() {
                        self.pending = Some(Settled::Reply(r));
                    }
                }
                StreamEvent::Close => self.pending = Some(Settled::Reset),
                StreamEvent::Lost(s) => {
                    self.salvage = Some(s);
                    self.bypass = true;
                }
            }
        }
    }

    /// After a callback of direction `d`: settles local replies and resets, and while the
    /// filter paused, waits for it to resume.
    async fn settle(&mut self, d: Direction, mut paused: bool) -> Settled {
        loop {
            let was_bypassed = self.bypass;
            self.resumed[idx(d)] = false;
            self.absorb();
            if let Some(p) = self.pending.take() {
                return p;
            }
            if self.resumed[idx(d)] {
                self.resumed[idx(d)] = false;
                paused = false;
            }
            if self.bypass && !was_bypassed {
                // Lost its instance: only a paused stream depends on the filter to go on.
                if paused {
                    return match self.fail() {
                        Some(r) => Settled::Reply(r),
                        None => Settled::Continue,
                    };
                }
                return Settled::Continue;
            }
            if !paused {
                return Settled::Continue;
            }
            self.mailbox.wait().await;
        }
    }

    fn salvaged_headers(&mut self, d: Direction) -> Option<Headers> {
        let s = self.salvage.as_mut()?;
        match d {
            Direction::Request => s.request_headers.take(),
            Direction::Response => s.response_headers.take(),
        }
    }

    fn salvaged_trailers(&mut self, d: Direction) -> Option<Headers> {
        let s = self.salvage.as_mut()?;
        match d {
            Direction::Request => s.request_trailers.take(),
            Direction::Response => s.response_trailers.take(),
        }
    }

    fn salvaged_body(&mut self, d: Direction) -> Bytes {
        let Some(s) = self.salvage.as_mut() else {
            return Bytes::new();
        };
        match d {
            Direction::Request => std::mem::take(&mut s.request_body),
            Direction::Response => std::mem::take(&mut s.response_body),
        }
    }

    /// A pending reply/reset from an earlier callback (e.g. a callout answered meanwhile).
    fn pending_verdict(&mut self) -> Option<Verdict> {
        self.absorb();
        match self.pending.take()? {
            Settled::Reply(r) => Some(Verdict::LocalReply(r)),
            Settled::Reset => Some(Verdict::Reset),
            Settled::Continue => None,
        }
    }

    async fn headers_step(&mut self, d: Direction, view: Headers, eos: bool) -> (Headers, Verdict) {
        if self.bypass {
            return (view, Verdict::Continue);
        }
        if let Some(v) = self.pending_verdict() {
            return (view, v);
        }
        let n = view.len();
        let status = view.status();
        let mut carry = Some(view);
        let step = self.call(|inst, ctx| {
            let sc = inst.stream(ctx).ok_or_else(lost_stream)?;
            *headers_slot(sc, d) = carry.take();
            if d == Direction::Response {
                sc.response_code = status;
            }
            let action = match d {
                Direction::Request => inst.on_request_headers(ctx, n, eos)?,
                Direction::Response => inst.on_response_headers(ctx, n, eos)?,
            };
            let sc = inst.stream(ctx).ok_or_else(lost_stream)?;
            if d == Direction::Request {
                sc.request = sc.request_headers.as_ref().map(RequestFacts::from_headers);
            }
            let back = if action == GuestAction::Continue || !sc.mailbox.is_empty() {
                headers_slot(sc, d).take()
            } else {
                None
            };
            Ok((action, back))
        });
        let verdict = match step {
            Step::Ran((action, back)) => {
                if back.is_some() {
                    carry = back;
                }
                match self.settle(d, action == GuestAction::Pause).await {
                    Settled::Continue => Verdict::Continue,
                    Settled::Reply(r) => Verdict::LocalReply(r),
                    Settled::Reset => Verdict::Reset,
                }
            }
            Step::Skip => Verdict::Continue,
            Step::Reply(r) => Verdict::LocalReply(r),
        };
        let view = carry
            .or_else(|| self.salvaged_headers(d))
            .or_else(|| self.fetch(|sc| headers_slot(sc, d).take()).flatten())
            .unwrap_or_default();
        (view, verdict)
    }

    /// Request headers (with `:method`, `:path`, `:authority`, `:scheme` taken from `parts`).
    /// Changes the filter makes are written back into `parts`.
    pub async fn on_request_headers(
        &mut self,
        parts: &mut http::request::Parts,
        end_of_stream: bool,
    ) -> Verdict {
        let view = Headers::from_request(parts, self.info.scheme);
        let (view, verdict) = self
            .headers_step(Direction::Request, view, end_of_stream)
            .await;
        if let Err(e) = view.write_request(parts) {
            tracing::warn!(plugin = %self.plugin.meta.name, "request headers: {e}: kept the original");
        }
        verdict
    }

    /// Response headers (with `:status`). Changes are written back into `parts`.
    pub async fn on_response_headers(
        &mut self,
        parts: &mut http::response::Parts,
        end_of_stream: bool,
    ) -> Verdict {
        let view = Headers::from_response(parts);
        let (view, verdict) = self
            .headers_step(Direction::Response, view, end_of_stream)
            .await;
        if let Err(e) = view.write_response(parts) {
            tracing::warn!(plugin = %self.plugin.meta.name, "response headers: {e}: kept the original");
        }
        verdict
    }

    /// A request body chunk; returns what to forward now.
    pub async fn on_request_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyVerdict {
        self.body_step(Direction::Request, chunk, end_of_stream)
            .await
    }

    /// A response body chunk; returns what to forward now.
    pub async fn on_response_body(&mut self, chunk: Bytes, end_of_stream: bool) -> BodyVerdict {
        self.body_step(Direction::Response, chunk, end_of_stream)
            .await
    }

    async fn body_step(&mut self, d: Direction, chunk: Bytes, eos: bool) -> BodyVerdict {
        if self.bypass {
            return BodyVerdict::Data(concat(self.salvaged_body(d), chunk));
        }
        if let Some(v) = self.pending_verdict() {
            return match v {
                Verdict::LocalReply(r) => BodyVerdict::LocalReply(r),
                _ => BodyVerdict::Reset,
            };
        }
        if chunk.is_empty() && !eos {
            return BodyVerdict::Data(chunk);
        }
        let flush_first = std::mem::take(&mut self.resumed[idx(d)]);
        let max = self.plugin.host.config.max_buffered_body;
        let step = self.call(|inst, ctx| {
            let sc = inst.stream(ctx).ok_or_else(lost_stream)?;
            let buf = body_buf(sc, d);
            let flushed = if flush_first {
                buf.split().freeze()
            } else {
                Bytes::new()
            };
            if buf.len() + chunk.len() > max {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk);
            let size = buf.len();
            let action = match d {
                Direction::Request => inst.on_request_body(ctx, size, eos)?,
                Direction::Response => inst.on_response_body(ctx, size, eos)?,
            };
            let sc = inst.stream(ctx).ok_or_else(lost_stream)?;
            let out = if action == GuestAction::Continue {
                body_buf(sc, d).split().freeze()
            } else {
                Bytes::new()
            };
            Ok(Some((action, concat(flushed, out))))
        });
        match step {
            Step::Ran(None) => BodyVerdict::LocalReply(too_large(d)),
            Step::Ran(Some((action, out))) => {
                let wait = action == GuestAction::Pause && eos;
                match self.settle(d, wait).await {
                    Settled::Reply(r) => BodyVerdict::LocalReply(r),
                    Settled::Reset => BodyVerdict::Reset,
                    Settled::Continue if self.bypass => {
                        BodyVerdict::Data(concat(out, self.salvaged_body(d)))
                    }
                    Settled::Continue if wait || self.resumed[idx(d)] => {
                        self.resumed[idx(d)] = false;
                        let rest = self
                            .fetch(|sc| body_buf(sc, d).split().freeze())
                            .unwrap_or_default();
                        BodyVerdict::Data(concat(out, rest))
                    }
                    Settled::Continue => BodyVerdict::Data(out),
                }
            }
            Step::Skip => BodyVerdict::Data(concat(self.salvaged_body(d), chunk)),
            Step::Reply(r) => BodyVerdict::LocalReply(r),
        }
    }

    /// Request trailers (changes written back); returns body bytes the filter still held,
    /// to forward before the trailers.
    pub async fn on_request_trailers(&mut self, trailers: &mut HeaderMap) -> BodyVerdict {
        self.trailers_step(Direction::Request, trailers).await
    }

    /// Response trailers; like [`HttpStream::on_request_trailers`].
    pub async fn on_response_trailers(&mut self, trailers: &mut HeaderMap) -> BodyVerdict {
        self.trailers_step(Direction::Response, trailers).await
    }

    async fn trailers_step(&mut self, d: Direction, trailers: &mut HeaderMap) -> BodyVerdict {
        if self.bypass {
            return BodyVerdict::Data(self.salvaged_body(d));
        }
        let view = Headers::plain(std::mem::take(trailers));
        let n = view.len();
        let mut carry = Some(view);
        let step = self.call(|inst, ctx| {
            let sc = inst.stream(ctx).ok_or_else(lost_stream)?;
            *trailers_slot(sc, d) = carry.take();
            let action = match d {
                Direction::Request => inst.on_request_trailers(ctx, n)?,
                Direction::Response => inst.on_response_trailers(ctx, n)?,
            };
            let sc = inst.stream(ctx).ok_or_else(lost_stream)?;
            if action == GuestAction::Continue || !sc.mailbox.is_empty() {
                let t = trailers_slot(sc, d).take();
                Ok((action, t, Some(body_buf(sc, d).split().freeze())))
            } else {
                Ok((action, None, None))
            }
        });
        let verdict = match step {
            Step::Ran((action, t, body)) => {
                carry = t;
                match self.settle(d, action == GuestAction::Pause).await {
                    Settled::Continue => {
                        let body = match body {
                            Some(b) => b,
                            None => self
                                .fetch(|sc| body_buf(sc, d).split().freeze())
                                .unwrap_or_default(),
                        };
                        BodyVerdict::Data(concat(body, self.salvaged_body(d)))
                    }
                    Settled::Reply(r) => BodyVerdict::LocalReply(r),
                    Settled::Reset => BodyVerdict::Reset,
                }
            }
            Step::Skip => BodyVerdict::Data(self.salvaged_body(d)),
            Step::Reply(r) => BodyVerdict::LocalReply(r),
        };
        let view = carry
            .or_else(|| self.salvaged_trailers(d))
            .or_else(|| self.fetch(|sc| trailers_slot(sc, d).take()).flatten())
            .unwrap_or_default();
        *trailers = view.map;
        verdict
    }

    /// Ends the filter's context: `on_done`, `on_log`, `on_delete` (also done on drop) —
    /// when the thread next goes idle if it is a proxy worker, else now (see `idle`).
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let Some((generation, ctx)) = self.bound else {
            return;
        };
        crate::idle::defer(crate::idle::Ending {
            plugin: self.plugin.clone(),
            slot: self.slot,
            generation,
            ctx,
        });
    }
}

impl Drop for HttpStream {
    fn drop(&mut self) {
        self.finish();
    }
}

fn too_large(d: Direction) -> LocalReply {
    match d {
        Direction::Request => LocalReply {
            status: 413,
            body: Bytes::from_static(b"Payload Too Large"),
            details: "request_payload_too_large".into(),
            ..Default::default()
        },
        Direction::Response => LocalReply {
            status: 500,
            body: Bytes::from_static(b"Internal Server Error"),
            details: "response_payload_too_large".into(),
            ..Default::default()
        },
    }
}
