//! `McpBody`: the request body the inner service receives after [`McpLayer`] looked at
//! it: the bytes read so far, then whatever the original body still holds (or the error
//! or trailers it ended with). The same bytes, in the same order, whatever happened.
//!
//! [`McpLayer`]: crate::McpLayer

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::jsonrpc::{McpCall, Parsed};

pin_project! {
    /// A request body passed on by [`McpLayer`](crate::McpLayer): byte for byte the body
    /// the client sent, with its trailers and, if reading it failed, the same error.
    pub struct McpBody<B: Body> {
        // Read before the inner service was called, replayed first.
        prefix: Option<Bytes>,
        // The JSON-RPC call found in `prefix` (the whole body), for the rate limiter.
        call: Option<Parsed>,
        error: Option<B::Error>,
        trailers: Option<HeaderMap>,
        // The original body has ended: `rest` is never polled again.
        ended: bool,
        #[pin]
        rest: B,
    }
}

impl<B: Body> McpBody<B> {
    /// The body untouched (not a JSON `POST`, or not read).
    pub(crate) fn passthrough(body: B) -> Self {
        McpBody {
            prefix: None,
            call: None,
            error: None,
            trailers: None,
            ended: false,
            rest: body,
        }
    }

    /// `prefix` was read from `rest`, which continues after it.
    pub(crate) fn continuing(prefix: Bytes, rest: B) -> Self {
        McpBody {
            prefix: (!prefix.is_empty()).then_some(prefix),
            ..McpBody::passthrough(rest)
        }
    }

    /// `rest` was read to its end: `prefix`, then its trailers or its error, if any;
    /// `call` is what `prefix` holds.
    pub(crate) fn ended(
        prefix: Bytes,
        end: Option<Result<HeaderMap, B::Error>>,
        rest: B,
        call: Option<Parsed>,
    ) -> Self {
        let (trailers, error) = match end {
            None => (None, None),
            Some(Ok(trailers)) => (Some(trailers), None),
            Some(Err(error)) => (None, Some(error)),
        };
        McpBody {
            prefix: (!prefix.is_empty()).then_some(prefix),
            call,
            error,
            trailers,
            ended: true,
            rest,
        }
    }
}

impl<B: Body> McpBody<B> {
    /// The JSON-RPC call of a body read whole, while it has not been polled yet.
    pub(crate) fn mcp_call(&self) -> Option<McpCall<'_>> {
        let body = self.prefix.as_ref()?;
        self.call.as_ref().map(|call| call.view(body))
    }
}

impl<B: Body> fmt::Debug for McpBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("McpBody")
            .field("replaying", &self.prefix.as_ref().map_or(0, Bytes::len))
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<B> Body for McpBody<B>
where
    B: Body,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if *this.ended {
            return Poll::Ready(None);
        }
        match this.rest.poll_frame(cx) {
            Poll::Ready(None) => {
                *this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(
                frame.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining()))),
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.error.is_none()
            && self.trailers.is_none()
            && (self.ended || self.rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        if self.ended {
            return SizeHint::with_exact(read);
        }
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}
