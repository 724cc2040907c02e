//! `McpLayer`: reads a JSON `POST` body up to a bound, finds the MCP call in it, and
//! passes the same bytes on.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use arc_swap::Guard;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::future::ResponseFuture;
use super::service::RateLimit;
use crate::answer::body::ResponseBody;
use crate::config::{McpConfig, Mode, RateLimitConfig};
use crate::policy::Policy;
use crate::request::jsonrpc::{self, McpCall};
use crate::request::mcp_body::McpBody;

/// Most bytes reserved before they arrive, whatever `Content-Length` says.
const INITIAL_CAPACITY: usize = 64 * 1024;
/// Finds the tool or prompt of an MCP call in its JSON-RPC body, for clients that do not
/// send the `Mcp-Method` / `Mcp-Name` headers (protocol revisions before 2026-07-28).
/// Put it **directly outside** [`RateLimitLayer`](crate::RateLimitLayer), which decides
/// with what it found: its service is only a `Service` over [`RateLimit`].
///
/// For a `POST` whose content type is JSON, it reads the body up to `[mcp] max_body`
/// (default 1 MiB) and parses it as one JSON-RPC message: `tools/call` gives the tool,
/// `prompts/get` the prompt (both from `params.name`), and the request's `id` lets a
/// refusal be answered in MCP form. When it has read the body, a `Mcp-Method` or
/// `Mcp-Name` header that disagrees with it is refused (400) before anything is counted.
///
/// The request body must be `Unpin` (hyper's and axum's bodies are).
///
/// The inner service always receives exactly the bytes the client sent (and its trailers):
/// a body over the bound is passed on unparsed and whole (what was read, then the rest of
/// the stream); a malformed body, a JSON-RPC batch or any other method is passed on with
/// no tool rule. It never answers a request itself.
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use http_body_util::{BodyExt, Full};
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use tollgate::{ManualClock, McpBody, McpLayer, RateLimitConfig, RateLimitLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cfg = RateLimitConfig::from_toml_str(r#"
///     [by_tool]
///     search = "1/m"
///     [mcp]
/// "#).unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(McpLayer::new(&cfg))
///     .layer(RateLimitLayer::new(cfg).with_clock(ManualClock::new()))
///     .service(service_fn(|req: Request<McpBody<Full<Bytes>>>| async move {
///         // The server sees the body as sent.
///         let body = req.into_body().collect().await.unwrap().to_bytes();
///         Ok::<_, Infallible>(Response::new(String::from_utf8(body.to_vec()).unwrap()))
///     }));
/// let call = |id: u32| {
///     let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"search"}}}}"#);
///     Request::post("/mcp")
///         .header("content-type", "application/json")
///         .body(Full::new(Bytes::from(body)))
///         .unwrap()
/// };
///
/// let first = svc.clone().oneshot(call(1)).await.unwrap();
/// assert_eq!(first.status(), StatusCode::OK);
/// assert_eq!(first.headers()["x-ratelimit-remaining"], "0");
///
/// // The second search within the minute: a tool result the agent can read.
/// let second = svc.clone().oneshot(call(2)).await.unwrap();
/// assert_eq!(second.status(), StatusCode::OK);
/// assert_eq!(second.headers()["retry-after"], "60");
/// let body = second.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(
///     body,
///     r#"{"jsonrpc":"2.0","id":2,"result":{"content":[{"type":"text","text":"Rate limit exceeded for tool 'search'. Retry after 60 seconds."}],"isError":true}}"#
/// );
/// # });
/// ```
///
/// Another layer between the two does not compile (the body's call could not reach the
/// rate limiter):
///
/// ```compile_fail
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use std::convert::Infallible;
/// use tollgate::{McpBody, McpLayer, RateLimitConfig, RateLimitLayer};
/// use tower::{service_fn, util::MapRequestLayer, ServiceBuilder, ServiceExt};
///
/// let cfg = RateLimitConfig::from_toml_str("[mcp]").unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(McpLayer::new(&cfg))
///     .layer(MapRequestLayer::new(|req: Request<McpBody<Full<Bytes>>>| req))
///     .layer(RateLimitLayer::new(cfg))
///     .service(service_fn(|_req: Request<McpBody<Full<Bytes>>>| async {
///         Ok::<_, Infallible>(Response::new(String::new()))
///     }));
/// let _ = svc.oneshot(Request::new(Full::new(Bytes::new())));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct McpLayer {
    max_body: usize,
}

impl McpLayer {
    /// A layer reading bodies up to `cfg`'s `[mcp] max_body` (1 MiB without `[mcp]`).
    pub fn new(cfg: &RateLimitConfig) -> Self {
        McpLayer {
            max_body: cfg
                .mcp()
                .map_or_else(|| McpConfig::default().max_body(), |m| m.max_body()),
        }
    }

    /// The most body bytes read before a body is passed on unparsed.
    pub fn max_body(&self) -> usize {
        self.max_body
    }
}

impl<S> Layer<S> for McpLayer {
    type Service = McpService<S>;

    fn layer(&self, inner: S) -> McpService<S> {
        McpService {
            inner,
            max_body: self.max_body,
        }
    }
}

/// The service of [`McpLayer`].
#[derive(Clone)]
pub struct McpService<S> {
    inner: S,
    max_body: usize,
}

impl<S: fmt::Debug> fmt::Debug for McpService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("McpService")
            .field("inner", &self.inner)
            .field("max_body", &self.max_body)
            .finish()
    }
}

/// Only directly over [`RateLimit`]: the call found in the body is handed to the rate
/// limiter as an argument, not through a request extension (which would cost an
/// allocation per request), and a layer put between the two is a compile error rather
/// than a silently ignored body.
impl<S, B, ResB> Service<Request<B>> for McpService<RateLimit<S>>
where
    S: Service<Request<McpBody<B>>, Response = Response<ResB>> + Clone,
    B: Body + Unpin,
    B::Data: Buf,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = McpFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let declared = declared_length(req.headers());
        // One policy for reading the body and counting the request, across a reload.
        let policy = self.inner.policy();
        let readable = policy.mode != Mode::Disabled
            && req.method() == Method::POST
            && is_json(req.headers())
            && declared.map_or(true, |n| n <= self.max_body as u64);
        if !readable {
            let fut = self
                .inner
                .call_with(req.map(McpBody::passthrough), mcp_call::<B>, policy);
            return McpFuture {
                state: State::Calling { fut },
            };
        }
        // The instance polled ready goes with the request; this one is a fresh clone.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        let expected = declared.map_or(0, |n| n as usize);
        McpFuture {
            state: State::Reading {
                svc: Some(svc),
                policy: Some(Guard::into_inner(policy)),
                parts: Some(parts),
                body: Some(body),
                read: Read::new(self.max_body, expected),
            },
        }
    }
}

/// The call [`McpService`] found in a request's body, for the rate limiter.
fn mcp_call<B: Body>(req: &Request<McpBody<B>>) -> Option<McpCall<'_>> {
    req.body().mcp_call()
}

/// `Content-Length`, when sent once and valid.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// `application/json` or any `…/…+json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let essence = value
        .as_bytes()
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() > 5
            && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
            && essence.contains(&b'/'))
}

/// The bytes read so far: the first data frame kept as it came (no copy), a second one
/// moves both into one buffer sized from `Content-Length` when known.
struct Read {
    max: usize,
    expected: usize,
    first: Option<Bytes>,
    buf: Option<BytesMut>,
    len: usize,
}

impl Read {
    fn new(max: usize, expected: usize) -> Self {
        Read {
            max,
            expected,
            first: None,
            buf: None,
            len: 0,
        }
    }

    /// Adds a frame's data; `false` once more than `max` bytes have been read.
    fn push(&mut self, mut data: impl Buf) -> bool {
        let n = data.remaining();
        if n == 0 {
            return true;
        }
        self.len += n;
        match (&mut self.buf, self.first.take()) {
            (Some(buf), _) => buf.put(data),
            (None, None) => self.first = Some(data.copy_to_bytes(n)),
            (None, Some(first)) => {
                // Sized from the declared length, but at most 64 KiB up front: a client that
                // declares a large body and sends two bytes must not hold a large buffer.
                let capacity = self
                    .expected
                    .max(self.len)
                    .min(self.max.saturating_add(1))
                    .min(INITIAL_CAPACITY);
                let mut buf = BytesMut::with_capacity(capacity.max(self.len));
                buf.put(first);
                buf.put(data);
                self.buf = Some(buf);
            }
        }
        self.len <= self.max
    }

    fn take(&mut self) -> Bytes {
        match (self.buf.take(), self.first.take()) {
            (Some(buf), _) => buf.freeze(),
            (None, Some(first)) => first,
            (None, None) => Bytes::new(),
        }
    }
}

pin_project! {
    /// The future of [`McpService`]: reading the body (JSON `POST`s only), then the rate
    /// limiter's [`ResponseFuture`].
    pub struct McpFuture<S, B>
    where
        S: Service<Request<McpBody<B>>>,
        B: Body,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<McpBody<B>>>,
        B: Body,
    {
        Reading {
            svc: Option<RateLimit<S>>,
            policy: Option<Arc<Policy>>,
            parts: Option<http::request::Parts>,
            body: Option<B>,
            read: Read,
        },
        Calling {
            #[pin]
            fut: ResponseFuture<S, McpBody<B>>,
        },
    }
}

impl<S, B> fmt::Debug for McpFuture<S, B>
where
    S: Service<Request<McpBody<B>>>,
    B: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("McpFuture")
    }
}

impl<S, B, ResB> Future for McpFuture<S, B>
where
    S: Service<Request<McpBody<B>>, Response = Response<ResB>> + Clone,
    B: Body + Unpin,
    B::Data: Buf,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Reading {
                    svc,
                    policy,
                    parts,
                    body,
                    read,
                } => {
                    let end = loop {
                        let reading = body.as_mut().expect("polled after completion");
                        let frame = ready!(Pin::new(reading).poll_frame(cx));
                        match frame {
                            None => break Outcome::Ended(None),
                            Some(Err(error)) => break Outcome::Ended(Some(Err(error))),
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => {
                                    if !read.push(data) {
                                        break Outcome::OverBound;
                                    }
                                }
                                Err(frame) => {
                                    if let Ok(trailers) = frame.into_trailers() {
                                        break Outcome::Ended(Some(Ok(trailers)));
                                    }
                                }
                            },
                        }
                    };
                    let parts = parts.take().expect("polled after completion");
                    let mut svc = svc.take().expect("polled after completion");
                    let rest = body.take().expect("polled after completion");
                    let bytes = read.take();
                    let body = match end {
                        Outcome::OverBound => McpBody::continuing(bytes, rest),
                        Outcome::Ended(end) => {
                            let call = match end {
                                None | Some(Ok(_)) => jsonrpc::parse(&bytes),
                                Some(Err(_)) => None,
                            };
                            McpBody::ended(bytes, end, rest, call)
                        }
                    };
                    let policy = Guard::from_inner(policy.take().expect("polled after completion"));
                    let fut =
                        svc.call_with(Request::from_parts(parts, body), mcp_call::<B>, policy);
                    state.set(State::Calling { fut });
                }
                StateProj::Calling { fut } => return fut.poll(cx),
            }
        }
    }
}

enum Outcome<E> {
    OverBound,
    Ended(Option<Result<HeaderMap, E>>),
}
