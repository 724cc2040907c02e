//! What an application plugs into the layer: a predicate that exempts requests
//! ([`RateLimitLayer::exempt`](crate::RateLimitLayer::exempt)) and a hook that shapes
//! refusals ([`OnRefusal`]), both shown the request as a [`RequestView`]
//! (ARCHITECTURE.md, behaviour contract item 20).

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{Extensions, HeaderMap, Method, Request, Response, StatusCode, Uri};

use crate::answer::decision::Decision;
use crate::answer::problem;
use crate::config::HeaderStyle;
use crate::key::RuleKind;

/// A request's head as a predicate or a hook sees it: method, URI, headers and
/// extensions (the body is not there to read).
#[derive(Clone, Copy)]
pub struct RequestView<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> RequestView<'a> {
    pub(crate) fn of<B>(req: &'a Request<B>) -> Self {
        RequestView {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    /// The request's method.
    pub fn method(&self) -> &'a Method {
        self.method
    }
    /// The request's URI (under axum's `nest`, the part the nested router sees).
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }
    /// The request's headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }
    /// The request's extensions (`Identity`, `ConnectInfo`, what your layers inserted).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

impl fmt::Debug for RequestView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The path only: headers may hold identities.
        f.debug_struct("RequestView")
            .field("method", self.method)
            .field("path", &self.uri.path())
            .finish_non_exhaustive()
    }
}

/// The predicate of [`RateLimitLayer::exempt`](crate::RateLimitLayer::exempt).
pub(crate) type Exempt = Arc<dyn Fn(&RequestView<'_>) -> bool + Send + Sync>;

/// A refusal tollgate is about to answer, for an [`OnRefusal`] hook: a `429` (over a
/// limit, or a cost no limit can hold) or a `503` (the store failed and `fail_mode =
/// "closed"`).
pub struct Refused<'a> {
    pub(crate) request: RequestView<'a>,
    pub(crate) decision: Option<&'a Decision>,
    pub(crate) style: HeaderStyle,
    pub(crate) named: Option<(RuleKind, &'a str)>,
}

impl<'a> Refused<'a> {
    /// The refused request's head.
    pub fn request(&self) -> &RequestView<'a> {
        &self.request
    }

    /// What the rules decided (limit, remaining, when to come back, which rules refused);
    /// `None` for a `503`, when no store answered.
    pub fn decision(&self) -> Option<&'a Decision> {
        self.decision
    }

    /// `429 Too Many Requests`, or `503 Service Unavailable` when failing closed.
    pub fn status(&self) -> StatusCode {
        match self.decision {
            Some(_) => StatusCode::TOO_MANY_REQUESTS,
            None => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The problem code tollgate's own answer carries: `RATE_LIMIT`,
    /// `COST_EXCEEDS_LIMIT` (retrying cannot help) or `BACKEND_UNAVAILABLE`.
    pub fn code(&self) -> &'static str {
        match self.decision {
            Some(d) if d.exceeds_limit() => "COST_EXCEEDS_LIMIT",
            Some(_) => "RATE_LIMIT",
            None => "BACKEND_UNAVAILABLE",
        }
    }

    /// The tool or prompt of the call, when its rule is among those that refused it.
    pub fn tool(&self) -> Option<&'a str> {
        problem::refusing_target(self.decision?, self.named).map(|(_, name)| name)
    }

    /// The answer tollgate writes without a hook (problem+json, rate headers included), to
    /// return as it is or to change.
    pub fn default_response(&self) -> Response<Bytes> {
        match self.decision {
            Some(decision) => problem::too_many_requests(self.style, decision, self.named),
            None => problem::backend_unavailable(),
        }
    }
}

impl fmt::Debug for Refused<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refused")
            .field("status", &self.status())
            .field("code", &self.code())
            .field("decision", &self.decision)
            .field("request", &self.request)
            .finish()
    }
}

/// Builds the response for a refusal in place of tollgate's problem+json: set with
/// [`RateLimitLayer::on_refusal`](crate::RateLimitLayer::on_refusal). Any
/// `Fn(&Refused<'_>) -> Response<Bytes>` is one.
///
/// tollgate then adds the rate headers and `Retry-After` it would have sent (the
/// configured `headers` style; none for `COST_EXCEEDS_LIMIT`; `Retry-After: 1` on a `503`)
/// unless [`rate_headers`](OnRefusal::rate_headers) says not to. A hook that panics is
/// answered with tollgate's own response. A call [`McpLayer`](crate::McpLayer) read is
/// refused in the form `[mcp] refusal` names; the hook shapes it only with `refusal =
/// "http"`.
pub trait OnRefusal: Send + Sync + 'static {
    /// The response for `refusal`.
    fn on_refusal(&self, refusal: &Refused<'_>) -> Response<Bytes>;

    /// Whether tollgate adds its rate headers and `Retry-After` to the hook's response
    /// (default: yes).
    fn rate_headers(&self) -> bool {
        true
    }
}

impl<F> OnRefusal for F
where
    F: Fn(&Refused<'_>) -> Response<Bytes> + Send + Sync + 'static,
{
    fn on_refusal(&self, refusal: &Refused<'_>) -> Response<Bytes> {
        self(refusal)
    }
}
