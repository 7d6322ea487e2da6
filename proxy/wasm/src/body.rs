//! [`FilteredBody`]: wraps an `http_body::Body` (a hyper `Incoming`, say) so that its frames
//! go through a [`ChainStream`]'s body and trailers steps on their way — request bodies on
//! their way upstream, response bodies on their way downstream. Data is delivered to the
//! filters as it arrives (each chunk with `end_of_stream = false`, then an empty chunk with
//! `end_of_stream = true`, as Envoy does for HTTP/1 bodies); what the filters release is
//! yielded; what they hold is yielded later. The inner body is not polled while a step is in
//! progress, so a pausing filter applies back-pressure instead of buffering without bound.
//!
//! A local reply or reset decided mid-body can't change what was already sent: the body ends
//! with a [`FilteredBodyError`] carrying it, and the proxy decides (send the reply if the
//! response hasn't started, else reset).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::HeaderMap;
use http_body::{Body, Frame};

use crate::abi::Direction;
use crate::action::{BodyVerdict, LocalReply};
use crate::chain::ChainStream;

/// Why a filtered body ended early.
#[derive(Debug, thiserror::Error)]
pub enum FilteredBodyError<E> {
    /// A filter answered locally.
    #[error("a filter answered locally with {}", .0.status)]
    LocalReply(LocalReply),
    /// A filter reset the stream.
    #[error("a filter reset the stream")]
    Reset,
    /// The inner body failed.
    #[error("body: {0}")]
    Inner(E),
}

type Step = BoxFuture<'static, (BodyVerdict, Option<HeaderMap>)>;

/// A body that passes through a chain's body steps.
pub struct FilteredBody<B> {
    inner: B,
    chain: Arc<tokio::sync::Mutex<ChainStream>>,
    direction: Direction,
    step: Option<Step>,
    trailers: Option<HeaderMap>,
    inner_done: bool,
    finished: bool,
}

impl<B> FilteredBody<B> {
    /// Wraps `inner`. `headers_end_of_stream`: the headers step was told no body follows (then
    /// the body passes through untouched, as no filter expects a body callback).
    pub fn new(
        inner: B,
        chain: Arc<tokio::sync::Mutex<ChainStream>>,
        direction: Direction,
        headers_end_of_stream: bool,
    ) -> Self {
        FilteredBody {
            inner,
            chain,
            direction,
            step: None,
            trailers: None,
            inner_done: false,
            finished: headers_end_of_stream,
        }
    }

    /// Delivers `chunk` (not the end), then — with `then_end` — the empty end-of-stream chunk,
    /// in one step: a body whose length is known may not be polled again after its last byte.
    fn start(&mut self, chunk: Bytes, then_end: bool) {
        let chain = self.chain.clone();
        let dir = self.direction;
        self.step = Some(Box::pin(async move {
            let mut c = chain.lock_owned().await;
            let mut out = bytes::BytesMut::new();
            let steps = if then_end {
                vec![(chunk, false), (Bytes::new(), true)]
            } else {
                vec![(chunk, true)]
            };
            for (data, eos) in steps {
                if data.is_empty() && !eos {
                    continue;
                }
                let v = match dir {
                    Direction::Request => c.on_request_body(data, eos).await,
                    Direction::Response => c.on_response_body(data, eos).await,
                };
                match v {
                    BodyVerdict::Data(d) => out.extend_from_slice(&d),
                    other => return (other, None),
                }
            }
            (BodyVerdict::Data(out.freeze()), None)
        }));
    }

    fn start_data(&mut self, chunk: Bytes) {
        let chain = self.chain.clone();
        let dir = self.direction;
        self.step = Some(Box::pin(async move {
            let mut c = chain.lock_owned().await;
            let v = match dir {
                Direction::Request => c.on_request_body(chunk, false).await,
                Direction::Response => c.on_response_body(chunk, false).await,
            };
            (v, None)
        }));
    }

    fn start_trailers(&mut self, mut trailers: HeaderMap) {
        let chain = self.chain.clone();
        let dir = self.direction;
        self.step = Some(Box::pin(async move {
            let mut c = chain.lock_owned().await;
            let v = match dir {
                Direction::Request => c.on_request_trailers(&mut trailers).await,
                Direction::Response => c.on_response_trailers(&mut trailers).await,
            };
            (v, Some(trailers))
        }));
    }
}

impl<B> Body for FilteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = FilteredBodyError<B::Error>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(step) = this.step.as_mut() {
                let (verdict, trailers) = ready!(step.as_mut().poll(cx));
                this.step = None;
                if trailers.is_some() {
                    this.trailers = trailers;
                }
                match verdict {
                    BodyVerdict::Data(d) if !d.is_empty() => {
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    }
                    BodyVerdict::Data(_) => continue,
                    BodyVerdict::LocalReply(r) => {
                        this.finished = true;
                        return Poll::Ready(Some(Err(FilteredBodyError::LocalReply(r))));
                    }
                    BodyVerdict::Reset => {
                        this.finished = true;
                        return Poll::Ready(Some(Err(FilteredBodyError::Reset)));
                    }
                }
            }
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if this.inner_done {
                return Poll::Ready(None);
            }
            if this.finished {
                // Pass-through (no body expected by the filters).
                return Pin::new(&mut this.inner)
                    .poll_frame(cx)
                    .map_err(FilteredBodyError::Inner);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.inner_done = true;
                    this.start(Bytes::new(), false);
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if this.inner.is_end_stream() => {
                        this.inner_done = true;
                        this.start(data, true);
                    }
                    Ok(data) => this.start_data(data),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.inner_done = true;
                            this.start_trailers(t);
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(FilteredBodyError::Inner(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner_done && self.step.is_none() && self.trailers.is_none()
    }
}
