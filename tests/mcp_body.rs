//! Body integrity under `McpLayer`: whatever the body — valid JSON-RPC,
//! malformed, over the bound, split into arbitrary frames, with trailers, ending in an
//! error, arriving slowly — the inner service receives the same bytes, the same trailers
//! and the same error, and an over-bound body is handed on after at most the bound (plus
//! one frame) was read.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tollgate::{ManualClock, McpBody, McpLayer, MemoryStore, RateLimitConfig, RateLimitLayer};
use tower::{service_fn, ServiceBuilder, ServiceExt};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Broken(String);
impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Broken {}

#[derive(Clone, Debug)]
enum Step {
    Data(Bytes),
    /// Not ready yet (the waker is woken at once).
    Pending,
    Trailers(HeaderMap),
    Fail(Broken),
}

/// A body that plays a script of frames, counting the data bytes it has handed out.
struct Script {
    steps: VecDeque<Step>,
    given: Arc<AtomicUsize>,
}

impl Body for Script {
    type Data = Bytes;
    type Error = Broken;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
        match self.steps.pop_front() {
            None => Poll::Ready(None),
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Step::Data(d)) => {
                self.given.fetch_add(d.len(), Ordering::SeqCst);
                Poll::Ready(Some(Ok(Frame::data(d))))
            }
            Some(Step::Trailers(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Some(Step::Fail(e)) => Poll::Ready(Some(Err(e))),
        }
    }
}

/// What a body delivered: its bytes, its trailers, and the error it ended with.
#[derive(Debug, Default, PartialEq, Eq)]
struct Delivered {
    bytes: Vec<u8>,
    trailers: Option<HeaderMap>,
    error: Option<Broken>,
}

async fn drain<B>(mut body: B) -> Delivered
where
    B: Body<Data = Bytes, Error = Broken> + Unpin,
{
    let mut out = Delivered::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Err(e) => {
                out.error = Some(e);
                break;
            }
            Ok(frame) => match frame.into_data() {
                Ok(d) => out.bytes.extend_from_slice(&d),
                Err(frame) => out.trailers = frame.into_trailers().ok(),
            },
        }
    }
    out
}

/// What the script delivers when read directly.
fn expected(steps: &[Step]) -> Delivered {
    let mut out = Delivered::default();
    for step in steps {
        match step {
            Step::Data(d) => out.bytes.extend_from_slice(d),
            Step::Pending => {}
            Step::Trailers(t) => out.trailers = Some(t.clone()),
            Step::Fail(e) => {
                out.error = Some(e.clone());
                break;
            }
        }
    }
    out
}

fn body_text() -> impl Strategy<Value = Vec<u8>> {
    let call = ("[a-zA-Z _-]{0,12}", prop_oneof![Just("7".to_owned()), "\"[a-z]{0,6}\"", Just("null".to_owned())], 0usize..3000)
        .prop_map(|(name, id, pad)| {
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":{name:?},"arguments":{{"pad":"{}"}}}}}}"#,
                "p".repeat(pad)
            )
            .into_bytes()
        });
    prop_oneof![
        call.clone(),
        call.prop_map(|mut b| {
            b.truncate(b.len() / 2);
            b
        }),
        proptest::collection::vec(any::<u8>(), 0..2048),
        (any::<u8>(), 0usize..20_000).prop_map(|(b, n)| vec![b; n]),
        Just(Vec::new()),
    ]
}

fn script() -> impl Strategy<Value = (Vec<Step>, bool)> {
    (
        body_text(),
        proptest::collection::vec(1usize..700, 0..40),
        proptest::collection::vec(any::<bool>(), 40),
        prop_oneof![Just(0u8), Just(1), Just(2)],
        any::<bool>(),
    )
        .prop_map(|(text, cuts, pauses, ending, declare)| {
            let text = Bytes::from(text);
            let mut steps = Vec::new();
            let mut at = 0;
            for (i, cut) in cuts.iter().enumerate() {
                if at >= text.len() {
                    break;
                }
                let end = (at + cut).min(text.len());
                if pauses[i] {
                    steps.push(Step::Pending);
                }
                steps.push(Step::Data(text.slice(at..end)));
                // Empty frames happen too.
                if pauses[(i + 1) % pauses.len()] && i % 5 == 0 {
                    steps.push(Step::Data(Bytes::new()));
                }
                at = end;
            }
            if at < text.len() {
                steps.push(Step::Data(text.slice(at..)));
            }
            match ending {
                1 => {
                    let mut t = HeaderMap::new();
                    t.insert("x-checksum", HeaderValue::from_static("abc"));
                    steps.push(Step::Trailers(t));
                }
                2 => {
                    let at = steps.len() / 2;
                    steps.insert(at, Step::Fail(Broken("connection reset".into())));
                }
                _ => {}
            }
            (steps, declare)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_inner_service_receives_the_body_as_sent(
        (steps, declare) in script(),
        max_body in prop_oneof![Just(64usize), Just(1024), Just(1 << 20)],
    ) {
        let want = expected(&steps);
        let cfg = RateLimitConfig::builder()
            .by_user("1000000/s")
            .tool("search", "1000000/s")
            .mcp_max_body(max_body)
            .build()
            .unwrap();
        let got: Arc<Mutex<Option<(Delivered, usize)>>> = Arc::default();
        let given = Arc::new(AtomicUsize::new(0));
        let record = got.clone();
        let given_at_call = given.clone();
        let svc = ServiceBuilder::new()
            .layer(McpLayer::new(&cfg))
            .layer(RateLimitLayer::with_store(cfg, MemoryStore::new()).with_clock(ManualClock::new()))
            .service(service_fn(move |req: Request<McpBody<Script>>| {
                let record = record.clone();
                // Bytes the client's body had handed out when the server was called.
                let read_before = given_at_call.load(Ordering::SeqCst);
                async move {
                    let delivered = drain(req.into_body()).await;
                    *record.lock().unwrap() = Some((delivered, read_before));
                    Ok::<_, Infallible>(Response::new(String::new()))
                }
            }));
        let mut req = Request::post("/mcp").header("content-type", "application/json");
        if declare && want.error.is_none() {
            req = req.header("content-length", want.bytes.len());
        }
        let req = req
            .body(Script { steps: steps.iter().cloned().collect(), given: given.clone() })
            .unwrap();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { svc.oneshot(req).await.unwrap() });
        let (delivered, read_before) = got.lock().unwrap().take().expect("the server was called");
        prop_assert_eq!(&delivered, &want);
        let largest_frame = steps
            .iter()
            .map(|s| match s { Step::Data(d) => d.len(), _ => 0 })
            .max()
            .unwrap_or(0);
        prop_assert!(
            read_before <= max_body + largest_frame,
            "{} bytes read before the server was called (bound {})", read_before, max_body
        );
    }
}

/// With `mode = "disabled"` nothing is counted, so no body is read before the server gets it.
#[tokio::test]
async fn a_disabled_limiter_reads_no_body() {
    let cfg = RateLimitConfig::builder()
        .mode(tollgate::Mode::Disabled)
        .build()
        .unwrap();
    let given = Arc::new(AtomicUsize::new(0));
    let at_call = Arc::new(AtomicUsize::new(usize::MAX));
    let (g, a) = (given.clone(), at_call.clone());
    let svc = ServiceBuilder::new()
        .layer(McpLayer::new(&cfg))
        .layer(RateLimitLayer::new(cfg))
        .service(service_fn(move |req: Request<McpBody<Script>>| {
            a.store(g.load(Ordering::SeqCst), Ordering::SeqCst);
            async move {
                drain(req.into_body()).await;
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        }));
    let text = Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#);
    let req = Request::post("/mcp")
        .header("content-type", "application/json")
        .body(Script {
            steps: VecDeque::from([Step::Data(text)]),
            given,
        })
        .unwrap();
    svc.oneshot(req).await.unwrap();
    assert_eq!(at_call.load(Ordering::SeqCst), 0);
}

/// A declared length over the bound is not read at all: the server gets the stream as is.
#[tokio::test]
async fn a_declared_length_over_the_bound_is_not_read() {
    let cfg = RateLimitConfig::builder()
        .mcp_max_body(100)
        .build()
        .unwrap();
    let given = Arc::new(AtomicUsize::new(0));
    let at_call = Arc::new(AtomicUsize::new(usize::MAX));
    let received = Arc::new(AtomicUsize::new(0));
    let (g, a, r) = (given.clone(), at_call.clone(), received.clone());
    let svc = ServiceBuilder::new()
        .layer(McpLayer::new(&cfg))
        .layer(RateLimitLayer::new(cfg))
        .service(service_fn(move |req: Request<McpBody<Script>>| {
            a.store(g.load(Ordering::SeqCst), Ordering::SeqCst);
            let r = r.clone();
            async move {
                let d = drain(req.into_body()).await;
                r.store(d.bytes.len(), Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        }));
    let text = Bytes::from(vec![b'{'; 500]);
    let req = Request::post("/mcp")
        .header("content-type", "application/json")
        .header("content-length", "500")
        .body(Script {
            steps: VecDeque::from([Step::Data(text)]),
            given,
        })
        .unwrap();
    svc.oneshot(req).await.unwrap();
    assert_eq!(received.load(Ordering::SeqCst), 500);
    assert_eq!(at_call.load(Ordering::SeqCst), 0);
}
