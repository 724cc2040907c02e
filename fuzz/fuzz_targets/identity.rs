//! Identity extraction and key encoding under arbitrary input.
//!
//! Two callers, each with arbitrary `x-user-id` / `x-tenant-id` / `x-tool` header values
//! (zero, one or several of each; any bytes a `HeaderValue` accepts) and optional
//! `Identity` / `ToolName` extensions with arbitrary strings, go through a
//! `RateLimitLayer` (memory store, `ManualClock`, every rule at 1/m) one after the other.
//! An oracle mirrors the documented normalisation (ARCHITECTURE.md, behaviour contract
//! item 2) and checks that:
//! - nothing panics, and the memory path answers on the first poll;
//! - a repeated identity header or an id over 256 bytes is a 400, everything else is
//!   200 for the first caller;
//! - the second caller is limited exactly when it shares a counter with the first: same
//!   normalised user (anonymous included), same tenant, or same configured tool.
//!
//! Then `Key::encode` on two arbitrary keys: equal encodings exactly for equal
//! (algorithm, rule, period, subject), and the subject part is escaped.
#![no_main]

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tollgate::{
    Algorithm, Identity, Key, ManualClock, MemoryStore, Rate, RateLimitConfig, RateLimitLayer,
    RuleKind, Subject, ToolName,
};
use tower_service::Service;

#[derive(Arbitrary, Debug)]
struct Caller {
    users: Vec<Vec<u8>>,
    tenants: Vec<Vec<u8>>,
    tools: Vec<Vec<u8>>,
    identity: Option<(Option<String>, Option<String>)>,
    tool: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct KeyInput {
    kind: u8,
    algorithm: u8,
    period: u16,
    count: u8,
    anonymous: bool,
    subject: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    algorithm: u8,
    a: Caller,
    b: Caller,
    key_a: KeyInput,
    key_b: KeyInput,
}

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
    Algorithm::TokenBucket,
];
const TOOLS: [&str; 3] = ["search", "a:b", "wörter"];

fn config(algorithm: usize) -> RateLimitConfig {
    static CONFIGS: OnceLock<Vec<RateLimitConfig>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        ALGORITHMS
            .iter()
            .map(|alg| {
                let mut toml = format!(
                    "by_user = \"1/m\"\nby_tenant = \"1/m\"\nalgorithm = \"{alg}\"\n\
                     [identity]\nuser_header = \"x-user-id\"\ntenant_header = \"x-tenant-id\"\n\
                     tool_header = \"x-tool\"\n[by_tool]\n"
                );
                for tool in TOOLS {
                    toml.push_str(&format!("{tool:?} = \"1/m\"\n"));
                }
                RateLimitConfig::from_toml_str(&toml).expect("the fuzz config is valid")
            })
            .collect()
    })[algorithm % 3]
        .clone()
}

/// Header values a client can actually send (at most three of each).
fn values(raw: &[Vec<u8>]) -> Vec<HeaderValue> {
    raw.iter()
        .filter_map(|v| HeaderValue::from_bytes(v).ok())
        .take(3)
        .collect()
}

struct Sent {
    request: Request<()>,
    /// `None`: a 400 is expected. Otherwise the counters it uses.
    expect: Option<Counters>,
}

#[derive(Debug, PartialEq)]
struct Counters {
    user: Option<Vec<u8>>,
    tenant: Option<Vec<u8>>,
    tool: Option<String>,
}

fn build(c: &Caller) -> Sent {
    let mut request = Request::new(());
    let (users, tenants, tools) = (values(&c.users), values(&c.tenants), values(&c.tools));
    for (name, vals) in [
        ("x-user-id", &users),
        ("x-tenant-id", &tenants),
        ("x-tool", &tools),
    ] {
        for v in vals {
            request.headers_mut().append(name, v.clone());
        }
    }
    let single = |vals: &[HeaderValue]| -> Result<Option<Vec<u8>>, ()> {
        match vals {
            [] => Ok(None),
            [v] => Ok(Some(v.as_bytes().trim_ascii().to_vec())),
            _ => Err(()),
        }
    };
    let mut bad = false;
    let (user, tenant) = match &c.identity {
        Some((user, tenant)) => {
            request
                .extensions_mut()
                .insert(Identity::new(user.clone(), tenant.clone()));
            (
                user.as_deref().map(|u| u.trim().as_bytes().to_vec()),
                tenant.as_deref().map(|t| t.trim().as_bytes().to_vec()),
            )
        }
        None => {
            let user = single(&users).unwrap_or_else(|()| {
                bad = true;
                None
            });
            let tenant = single(&tenants).unwrap_or_else(|()| {
                bad = true;
                None
            });
            (user, tenant)
        }
    };
    let tool = match &c.tool {
        Some(t) => {
            request.extensions_mut().insert(ToolName::new(t.clone()));
            Some(t.trim().as_bytes().to_vec())
        }
        None => single(&tools).unwrap_or_else(|()| {
            bad = true;
            None
        }),
    };
    let user = user.filter(|u| !u.is_empty());
    let tenant = tenant.filter(|t| !t.is_empty());
    bad |= user.as_ref().is_some_and(|u| u.len() > 256);
    bad |= tenant.as_ref().is_some_and(|t| t.len() > 256);
    let tool = tool
        .and_then(|t| String::from_utf8(t).ok())
        .map(|t| t.trim().to_lowercase())
        .filter(|t| TOOLS.contains(&t.as_str()));
    Sent {
        request,
        expect: (!bad).then_some(Counters { user, tenant, tool }),
    }
}

#[derive(Clone)]
struct Ok200;

impl Service<Request<()>> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

fn status<S>(svc: &mut S, request: Request<()>) -> StatusCode
where
    S: Service<Request<()>, Response = Response<tollgate::ResponseBody<()>>, Error = Infallible>,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(request));
    match fut.poll(&mut cx) {
        Poll::Ready(Ok(resp)) => resp.status(),
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => panic!("the memory path must answer on the first poll"),
    }
}

/// What a key must be identified by: (rule, algorithm, period, count, subject; `None` =
/// anonymous). The count is part of a key: two layers giving one rule different counts
/// never share a counter.
type KeyIdentity<'a> = (u8, u8, u32, u64, Option<&'a [u8]>);

fn key(k: &KeyInput) -> (Key<'_>, KeyIdentity<'_>) {
    let kinds = [RuleKind::User, RuleKind::Tenant, RuleKind::Tool];
    let kind = k.kind % 3;
    let algorithm = k.algorithm % 3;
    let period = u32::from(k.period) + 1;
    let rate = Rate::new(
        u64::from(k.count) + 1,
        Duration::from_secs(u64::from(period)),
    )
    .expect("a valid rate");
    let subject = if k.anonymous {
        Subject::Anonymous
    } else {
        Subject::Named(&k.subject)
    };
    let identity = (
        kind,
        algorithm,
        period,
        u64::from(k.count) + 1,
        (!k.anonymous).then_some(&k.subject[..]),
    );
    (
        Key::new(
            kinds[usize::from(kind)],
            subject,
            rate,
            ALGORITHMS[usize::from(algorithm)],
        ),
        identity,
    )
}

fuzz_target!(|input: Input| {
    let algorithm = usize::from(input.algorithm);
    let layer = RateLimitLayer::with_store(config(algorithm), MemoryStore::with_max_keys(64))
        .with_clock(ManualClock::new());
    let mut svc = tower_layer::Layer::layer(&layer, Ok200);

    let a = build(&input.a);
    let b = build(&input.b);
    let got_a = status(&mut svc, a.request);
    let expected_a = match a.expect {
        None => StatusCode::BAD_REQUEST,
        Some(_) => StatusCode::OK,
    };
    assert_eq!(got_a, expected_a, "first caller {:?}", input.a);
    let got_b = status(&mut svc, b.request);
    let expected_b = match (&a.expect, &b.expect) {
        (_, None) => StatusCode::BAD_REQUEST,
        (None, Some(_)) => StatusCode::OK,
        (Some(a), Some(b)) => {
            let shares = a.user == b.user
                || (a.tenant.is_some() && a.tenant == b.tenant)
                || (a.tool.is_some() && a.tool == b.tool);
            if shares {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::OK
            }
        }
    };
    assert_eq!(
        got_b, expected_b,
        "second caller {:?} after {:?}: {:?} then {:?}",
        input.b, input.a, a.expect, b.expect
    );

    let (ka, ia) = key(&input.key_a);
    let (kb, ib) = key(&input.key_b);
    let (ea, eb) = (ka.encode("rl"), kb.encode("rl"));
    assert_eq!(ea == eb, ia == ib, "{ea} vs {eb}");
    for e in [&ea, &eb] {
        let subject = e.splitn(6, ':').nth(5).expect("six parts");
        assert!(
            subject
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._~-%=".contains(&c)),
            "{e}"
        );
    }
});
