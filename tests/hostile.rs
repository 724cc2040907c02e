//! Hostile input: identity and tool headers that are huge, non-UTF-8, full of separators
//! or control bytes, or repeated. None of them crashes the layer, none is echoed back,
//! and none lets one identity spend another's counter (ARCHITECTURE.md, behaviour
//! contract items 2, 3 and 9).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tollgate::{
    Algorithm, Identity, Key, ManualClock, MemoryStore, Rate, RateLimitConfig, RateLimitLayer,
    ResponseBody, RuleKind, Subject, ToolName,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Body = String;
type Resp = Response<ResponseBody<Body>>;

const HEADERS: &str = "[identity]\nuser_header = \"x-user-id\"\ntenant_header = \"x-tenant-id\"\ntool_header = \"x-tool\"\n";

fn layer(toml: &str) -> RateLimitLayer {
    let cfg = RateLimitConfig::from_toml_str(&format!("{toml}\n{HEADERS}")).unwrap();
    RateLimitLayer::with_store(cfg, MemoryStore::with_max_keys(10_000))
        .with_clock(ManualClock::new())
}

/// The layer over a service that answers 200 and counts its calls.
fn service(
    layer: RateLimitLayer,
) -> (
    impl Service<Request<Body>, Response = Resp, Error = Infallible, Future = impl Send> + Clone,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Body::from("ok"))) }
        }));
    (svc, calls)
}

/// Sends synchronously: the memory path completes on the first poll.
fn send<S>(svc: &S, req: Request<Body>) -> (StatusCode, Vec<u8>)
where
    S: Service<Request<Body>, Response = Resp, Error = Infallible> + Clone,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = svc.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    })
}

/// A header and its raw value.
type Pair<'a> = (&'static str, &'a [u8]);
type MakeRequest = Box<dyn Fn() -> Request<Body>>;

/// A request carrying each `(header, value)` pair (repeats allowed).
fn with_headers(pairs: &[Pair<'_>]) -> Request<Body> {
    let mut req = Request::new(Body::new());
    for (name, value) in pairs {
        let value = HeaderValue::from_bytes(value).expect("a value a client can send");
        req.headers_mut().append(*name, value);
    }
    req
}

fn with_identity(user: &str, tenant: Option<&str>) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::new(
        Some(user.to_owned()),
        tenant.map(str::to_owned),
    ));
    req
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// 64 KiB of a recognisable, header-safe pattern.
fn huge(seed: &str) -> Vec<u8> {
    seed.bytes().cycle().take(64 * 1024).collect()
}

#[test]
fn refused_identities_get_a_400_that_never_echoes_them() {
    let (svc, calls) = service(layer("by_user = \"5/m\"\nby_tenant = \"5/m\""));
    let long_user = huge("LongUser-91d2:{}%");
    let long_tenant = huge("LongTenant-77ab");
    let just_over = vec![b'u'; 257];
    let cases: Vec<(&str, Vec<Pair<'_>>, &str)> = vec![
        (
            "64 KiB user",
            vec![("x-user-id", &long_user)],
            "user id is longer",
        ),
        (
            "64 KiB tenant",
            vec![("x-user-id", b"bob"), ("x-tenant-id", &long_tenant)],
            "tenant id is longer",
        ),
        (
            "257-byte user",
            vec![("x-user-id", &just_over)],
            "user id is longer",
        ),
        (
            "two users",
            vec![("x-user-id", b"RepeatA-5c1"), ("x-user-id", b"RepeatB-5c2")],
            "user identity header appears more than once",
        ),
        (
            "the same user twice",
            vec![("x-user-id", b"Twice-0a9"), ("x-user-id", b"Twice-0a9")],
            "user identity header appears more than once",
        ),
        (
            "two tenants",
            vec![
                ("x-user-id", b"bob"),
                ("x-tenant-id", b"TenantA-e31"),
                ("x-tenant-id", b"TenantB-e32"),
            ],
            "tenant identity header appears more than once",
        ),
        (
            "two tools",
            vec![("x-tool", b"ToolA-f10"), ("x-tool", &long_user)],
            "tool header appears more than once",
        ),
        (
            "an empty repeat",
            vec![("x-user-id", b"Lonely-c4d"), ("x-user-id", b"")],
            "user identity header appears more than once",
        ),
    ];
    for (what, headers, detail) in &cases {
        let (status, body) = send(&svc, with_headers(headers));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        let text = String::from_utf8(body.clone()).expect("the body is JSON");
        assert!(
            text.contains("\"code\":\"INVALID_IDENTITY\""),
            "{what}: {text}"
        );
        assert!(text.contains(detail), "{what}: {text}");
        assert!(text.len() < 512, "{what}: a {}-byte body", text.len());
        for (_, value) in headers {
            // Every value, or a 9-byte piece of it, is absent from the body.
            let piece = &value[..value.len().min(9)];
            assert!(
                !contains(&body, piece),
                "{what}: body echoes {piece:?}: {text}"
            );
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a 400 never reaches the service"
    );

    // Exactly 256 bytes is still an identity.
    let at_limit = vec![b'u'; 256];
    let (status, _) = send(&svc, with_headers(&[("x-user-id", &at_limit)]));
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn long_ids_are_measured_after_trimming() {
    let (svc, _) = service(layer("by_user = \"1/m\""));
    let mut padded = vec![b' '; 4_000];
    padded.extend_from_slice(b"padded-user");
    padded.extend(vec![b'\t'; 4_000]);
    let (status, _) = send(&svc, with_headers(&[("x-user-id", &padded)]));
    assert_eq!(status, StatusCode::OK, "8 KB of padding around a short id");
    let (status, _) = send(&svc, with_headers(&[("x-user-id", b"padded-user")]));
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the padded id is the same user"
    );
}

#[test]
fn a_64k_tool_name_is_simply_not_a_configured_tool() {
    let (svc, calls) = service(layer("[by_tool]\nsearch = \"1/m\""));
    let long = huge("search");
    let mut long_unicode = "\u{a0}Search".to_owned();
    long_unicode.push_str(&"é".repeat(32 * 1024));
    for (what, req) in [
        ("header", with_headers(&[("x-tool", &long)])),
        ("extension", {
            let mut r = Request::new(Body::new());
            r.extensions_mut()
                .insert(ToolName::new(String::from_utf8(long.clone()).unwrap()));
            r
        }),
        ("unicode extension", {
            let mut r = Request::new(Body::new());
            r.extensions_mut()
                .insert(ToolName::new(long_unicode.clone()));
            r
        }),
        (
            "non-UTF-8 header",
            with_headers(&[("x-tool", b"search\xff")]),
        ),
    ] {
        for _ in 0..3 {
            let (status, _) = send(&svc, req_clone(&req));
            assert_eq!(status, StatusCode::OK, "{what}: no rule applies");
        }
    }
    // The configured tool is still limited, whatever its spelling.
    let (status, _) = send(&svc, with_headers(&[("x-tool", b"  SEARCH ")]));
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(&svc, with_headers(&[("x-tool", b"Search")]));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("for tool 'search'"));
    assert_eq!(calls.load(Ordering::SeqCst), 13);
}

/// Requests are not `Clone`; these carry only headers and extensions we set.
fn req_clone(req: &Request<Body>) -> Request<Body> {
    let mut out = Request::new(Body::new());
    *out.headers_mut() = req.headers().clone();
    if let Some(tool) = req.extensions().get::<ToolName>() {
        out.extensions_mut().insert(tool.clone());
    }
    if let Some(id) = req.extensions().get::<Identity>() {
        out.extensions_mut().insert(id.clone());
    }
    out
}

#[test]
fn lookalike_identities_never_share_a_counter() {
    // Every limit is 1: an identity's first request passes only if no other identity
    // spent its counter, and its second is refused only if its own counter counted.
    let (svc, _) = service(layer("by_user = \"1/m\"\nby_tenant = \"1/m\""));
    let header_users: &[&[u8]] = &[
        b"a:b",
        b"a%3Ab",
        b"a%3ab",
        b"a",
        b"A",
        b"a b",
        b"a\tb",
        b"{a}",
        b"{a",
        b"a}",
        b"a%",
        b"%",
        b"%25",
        b"-",
        b"=",
        b"=a",
        b"anonymous",
        b"rl:fw:u:60:=a",
        b"a\xff",
        b"a\xc3\xbf",
        b"\x80",
        b"\xff\xfe",
        b"a\x7e",
    ];
    // Through the `Identity` extension: control bytes a header cannot carry.
    let extension_users: &[&str] = &[
        "a\0",
        "a\nb",
        "a\r\nb",
        "a\u{1b}[31m",
        "a\u{7f}",
        "a\u{0}b",
        "ÿ",
        "a\u{200b}",
    ];
    // Tenants that spell users and each other; each comes with a fresh user.
    let tenants: &[&str] = &["b", "a", "a:b", "a%3Ab", "{b}", "b\0", "anonymous"];

    let mut requests: Vec<(String, MakeRequest)> = Vec::new();
    for u in header_users {
        let u = u.to_vec();
        requests.push((
            format!("header user {u:?}"),
            Box::new(move || with_headers(&[("x-user-id", &u)])),
        ));
    }
    for u in extension_users {
        let u = (*u).to_owned();
        requests.push((
            format!("extension user {u:?}"),
            Box::new(move || with_identity(&u, None)),
        ));
    }
    for (i, t) in tenants.iter().enumerate() {
        let (t, u) = ((*t).to_owned(), format!("tenant-user-{i}"));
        requests.push((
            format!("tenant {t:?}"),
            Box::new(move || with_identity(&u, Some(&t))),
        ));
    }
    // `a` within tenant `b` is neither user `a:b` nor user `a` (user `a` is already spent
    // above, so here the tenant's counter must be fresh and the user's spent).
    for (what, make) in &requests {
        let (status, _) = send(&svc, make());
        assert_eq!(
            status,
            StatusCode::OK,
            "{what}: someone else spent its counter"
        );
    }
    for (what, make) in &requests {
        let (status, _) = send(&svc, make());
        assert_eq!(
            status,
            StatusCode::TOO_MANY_REQUESTS,
            "{what}: its own counter did not count"
        );
    }
    // User `a` + tenant `b2` is refused (user `a` is spent); it spends nothing, so
    // tenant `b2` is still fresh for another user.
    let (status, _) = send(&svc, with_identity("a", Some("b2")));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _) = send(&svc, with_identity("fresh", Some("b2")));
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn a_header_and_an_extension_naming_the_same_user_share_a_counter() {
    // The control for the test above: distinct counters are not an accident of paths.
    let (svc, _) = service(layer("by_user = \"1/m\""));
    let (status, _) = send(&svc, with_headers(&[("x-user-id", b"  same:user{1}%  ")]));
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&svc, with_identity("same:user{1}%", None));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn paths_and_bodies_are_never_read_for_identity() {
    let (svc, _) = service(layer("by_user = \"1/m\"\n[by_tool]\nsearch = \"1/m\""));
    let request = |uri: &str, body: &str| {
        let mut req = Request::new(Body::from(body));
        *req.uri_mut() = uri.parse().unwrap();
        req
    };
    let (status, _) = send(
        &svc,
        request("/tools/search?user=alice", "{\"user\":\"alice\"}"),
    );
    assert_eq!(status, StatusCode::OK);
    // Both requests were the anonymous caller with no tool: the second is the anonymous
    // bucket's second request, not alice's first or the tool's.
    let (status, body) = send(&svc, request("/tools/search?user=bob", "x-user-id: bob"));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("\"violated\":[\"user\"]"), "{body}");
}

/// Review finding: a refused user header in permissive mode also dropped the request's
/// tenant and tool, so those calls counted against neither.
#[test]
fn permissive_mode_still_counts_the_fields_that_are_fine() {
    let (svc, _) = service(layer(
        "by_tenant = \"3/m\"\nmode = \"permissive\"\n[by_tool]\nsearch = \"2/m\"",
    ));
    let repeated_user = || {
        with_headers(&[
            ("x-user-id", b"alice"),
            ("x-user-id", b"bob"),
            ("x-tenant-id", b"acme"),
            ("x-tool", b"search"),
        ])
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let decision = |req| {
        rt.block_on(async {
            let resp = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            *resp.extensions().get::<tollgate::Decision>().unwrap()
        })
    };
    let d = decision(repeated_user());
    assert_eq!(d.rules().count(), 2, "tenant and tool still apply");
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(tollgate::RuleKind::Tool), Some(1))
    );
    let d = decision(repeated_user());
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(tollgate::RuleKind::Tool), Some(0))
    );
    let d = decision(repeated_user());
    assert!(!d.is_allowed(), "the tool's limit is reached, and counted");
}

#[test]
fn permissive_mode_counts_a_repeated_header_as_anonymous_never_as_either_value() {
    let (svc, calls) = service(layer("by_user = \"2/m\"\nmode = \"permissive\""));
    let remaining = |req| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let resp = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_owned()
        })
    };
    let repeated = || with_headers(&[("x-user-id", b"alice"), ("x-user-id", b"bob")]);
    assert_eq!(remaining(repeated()), "1", "anonymous, first request");
    assert_eq!(remaining(with_headers(&[("x-user-id", b"bob")])), "1");
    assert_eq!(remaining(with_headers(&[("x-user-id", b"alice")])), "1");
    assert_eq!(
        remaining(Request::new(Body::new())),
        "0",
        "anonymous, second"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[test]
fn every_tool_of_a_large_config_has_its_own_counter() {
    // More tools than a u16 index holds: the 65 537th tool must not count against the
    // first one (nor answer in its name). Refusing such a config at start-up is fine too.
    let n = usize::from(u16::MAX) + 2;
    let mut builder = RateLimitConfig::builder().tool_header("x-tool");
    for i in 0..n {
        builder = builder.tool(format!("t{i:05}"), Rate::per_minute(1));
    }
    let cfg = match builder.build() {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(e.to_string().starts_with("by_tool"), "{e}");
            return;
        }
    };
    let layer = RateLimitLayer::with_store(cfg, MemoryStore::new()).with_clock(ManualClock::new());
    let (svc, _) = service(layer);
    let last = format!("t{:05}", n - 1);
    let (status, _) = send(&svc, with_headers(&[("x-tool", last.as_bytes())]));
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(&svc, with_headers(&[("x-tool", last.as_bytes())]));
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains(&format!("for tool '{last}'")), "{body}");
    let (status, _) = send(&svc, with_headers(&[("x-tool", b"t00000")]));
    assert_eq!(status, StatusCode::OK, "t00000 is spent by another tool");
}

// ---- properties ----

fn kind(i: u8) -> RuleKind {
    [RuleKind::User, RuleKind::Tenant, RuleKind::Tool][usize::from(i % 3)]
}

fn algorithm(i: u8) -> Algorithm {
    [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ][usize::from(i % 3)]
}

/// Bytes a client can put in a header value: tab, visible ASCII, space, obs-text.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        Just(b'\t'),
        0x20u8..0x7f,
        0x80u8..=0xff,
        prop::sample::select(b":{}%=- aA".to_vec()),
    ];
    prop::collection::vec(byte, 0..12)
}

/// One caller, through headers (opaque bytes) or through the `Identity` extension.
#[derive(Clone, Debug)]
enum Caller {
    Header(Vec<u8>),
    Extension(String),
}

impl Caller {
    fn request(&self) -> Request<Body> {
        match self {
            Caller::Header(v) => with_headers(&[("x-user-id", v)]),
            Caller::Extension(u) => with_identity(u, None),
        }
    }

    /// The counter behaviour contract item 2 (ARCHITECTURE.md) says it uses: trimmed
    /// bytes; empty → anonymous (`None`).
    fn counter(&self) -> Option<Vec<u8>> {
        let trimmed = match self {
            Caller::Header(v) => v.trim_ascii().to_vec(),
            Caller::Extension(u) => u.trim().as_bytes().to_vec(),
        };
        (!trimmed.is_empty()).then_some(trimmed)
    }
}

fn caller() -> impl Strategy<Value = Caller> {
    prop_oneof![
        header_bytes().prop_map(Caller::Header),
        any::<String>().prop_map(Caller::Extension),
        prop::sample::select(vec!["a", "a:b", "a%3Ab", " a ", "", "anonymous"])
            .prop_map(|s| Caller::Extension(s.to_owned())),
        prop::sample::select(vec![&b"a"[..], b"a:b", b"a%3Ab", b" a ", b"\xff", b""])
            .prop_map(|s| Caller::Header(s.to_vec())),
    ]
}

/// Config text near the real grammar: keys, tables, quoted keys and values drawn from
/// what configs hold, plus arbitrary characters.
fn config_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "by_user",
            "by_tenant",
            "algorithm",
            "mode",
            "fail_mode",
            "headers",
            "[by_tool]",
            "[identity]",
            "[backend]",
            "[\"\"]",
            "user_header",
            "max_keys",
            "key_prefix",
            "kind",
            "url",
            "\"redis\"",
            "\"30/m\"",
            "\"0/m\"",
            "\"10/ 30 s\"",
            "=",
            "\n",
            " ",
            "\"",
            "'",
            "[",
            "]",
            ".",
            "\"\\n\"",
            "1e400",
            "-1",
            "99999999999999999999",
        ])
        .prop_map(str::to_owned),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    /// `RateLimitConfig::from_toml_str` (the `config` fuzz target's property): never
    /// panics; an error lists one line per problem, each naming its field.
    #[test]
    fn config_parsing_never_panics_and_names_every_problem(text in config_text()) {
        match RateLimitConfig::from_toml_str(&text) {
            Ok(cfg) => {
                for (name, _) in cfg.by_tool() {
                    prop_assert_eq!(name, name.trim().to_lowercase());
                }
            }
            Err(e) => {
                prop_assert!(e.problems().count() > 0);
                for (field, message) in e.problems() {
                    prop_assert!(!field.is_empty() && !message.is_empty(), "{:?}", e);
                }
                prop_assert_eq!(e.to_string().lines().count(), e.problems().count(), "{:?}", e);
            }
        }
    }

    /// Key encoding is injective over arbitrary bytes, rules, algorithms, periods and
    /// counts (the count is part of a key, so two layers giving one rule different counts
    /// never share a counter), and the subject part never carries a separator (so it is
    /// exactly the key's cluster hash tag).
    #[test]
    fn key_encoding_is_injective(
        a in prop::collection::vec(any::<u8>(), 0..32),
        b in prop::collection::vec(any::<u8>(), 0..32),
        anon in (any::<bool>(), any::<bool>()),
        kinds in (any::<u8>(), any::<u8>()),
        algs in (any::<u8>(), any::<u8>()),
        periods in (1u64..=3, 1u64..=3),
        counts in (1u64..=3, 1u64..=3),
    ) {
        let make = |bytes: &[u8], anon: bool, k: u8, alg: u8, period: u64, count: u64| {
            let subject = if anon { Subject::Anonymous } else { Subject::Named(bytes) };
            let rate = Rate::new(count, Duration::from_secs(period * 60)).unwrap();
            Key::new(kind(k), subject, rate, algorithm(alg)).encode("rl")
        };
        let ea = make(&a, anon.0, kinds.0, algs.0, periods.0, counts.0);
        let eb = make(&b, anon.1, kinds.1, algs.1, periods.1, counts.1);
        let same = (anon.0 || anon.1 || a == b) && anon.0 == anon.1
            && kind(kinds.0) == kind(kinds.1)
            && algorithm(algs.0) == algorithm(algs.1)
            && periods.0 == periods.1
            && counts.0 == counts.1;
        prop_assert_eq!(ea == eb, same, "{} vs {}", ea, eb);
        for e in [&ea, &eb] {
            // The subject is the Redis Cluster hash tag: one `{…}` holding no separator.
            let tag = e.splitn(6, ':').nth(5).unwrap();
            let subject = tag.strip_prefix('{').and_then(|t| t.strip_suffix('}'));
            prop_assert!(subject.is_some(), "{}", e);
            let subject = subject.unwrap();
            prop_assert!(
                subject.bytes().all(|c| c.is_ascii_alphanumeric() || b"._~-%=".contains(&c)),
                "{}", e
            );
        }
    }

    /// Through the layer: the second of two arbitrary callers is limited exactly when
    /// the normalisation of ARCHITECTURE.md, behaviour contract item 2, makes it the same
    /// identity as the first.
    #[test]
    fn distinct_identities_never_share_a_counter(a in caller(), b in caller()) {
        let (svc, _) = service(layer("by_user = \"1/m\""));
        let (first, _) = send(&svc, a.request());
        prop_assert_eq!(first, StatusCode::OK);
        let (second, _) = send(&svc, b.request());
        let expected = if a.counter() == b.counter() {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::OK
        };
        prop_assert_eq!(second, expected, "{:?} then {:?}", a, b);
    }
}

#[test]
fn hostile_config_keys_are_named_one_problem_per_line() {
    for (toml, problems) in [
        ("[\"\"]\n", 1),
        ("\"\" = 1\n", 1),
        ("\"by_user\\nmode\" = 1\n", 1),
        ("\"a b\" = 1\n[identity]\n\"\\u0000\" = 2\n", 2),
    ] {
        let err = RateLimitConfig::from_toml_str(toml).unwrap_err();
        assert_eq!(err.problems().count(), problems, "{toml:?}");
        for (field, _) in err.problems() {
            assert!(
                !field.is_empty(),
                "{toml:?}: a problem without a field: {err}"
            );
        }
        assert_eq!(
            err.to_string().lines().count(),
            problems,
            "{toml:?}: one line per problem: {err:?}"
        );
    }
}

/// `anonymous = "by_ip"` under hostile forwarding headers: huge, non-UTF-8, thousands of
/// entries, separators and look-alikes of another client's address. None crashes the
/// layer; an untrusted peer is always counted as itself; behind a trusted proxy, no
/// header reaches the victim's bucket unless it names the victim as the client.
#[test]
fn hostile_forwarding_headers_never_borrow_another_clients_bucket() {
    let cfg = RateLimitConfig::from_toml_str(
        "by_user = \"1/h\"\nanonymous = \"by_ip\"\n[identity]\ntrusted_proxies = [\"10.0.0.0/8\"]",
    )
    .unwrap();
    let (svc, _) =
        service(RateLimitLayer::with_store(cfg, MemoryStore::new()).with_clock(ManualClock::new()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let status = |peer: [u8; 4], pairs: &[Pair<'_>]| {
        let mut req = with_headers(pairs);
        req.extensions_mut()
            .insert(std::net::SocketAddr::from((peer, 5000)));
        rt.block_on(svc.clone().oneshot(req)).unwrap().status()
    };
    // The victim's bucket: one call an hour, not used yet.
    let victim = [198, 51, 100, 1];
    let many: Vec<u8> = "198.51.100.1, ".repeat(20_000).into_bytes();
    let huge: Vec<u8> = [b"198.51.100.1".as_slice(), &[b' '; 60_000]].concat();
    let hostile: Vec<Vec<u8>> = vec![
        b"198.51.100.1".to_vec(),
        many.clone(),
        huge.clone(),
        b"198.51.100.1:{x}".to_vec(),
        b"198.51.100.1;for=198.51.100.1".to_vec(),
        b"\xff198.51.100.1".to_vec(),
        b"198.51.100.1%00".to_vec(),
        b",,,,".to_vec(),
        b"[198.51.100.1]".to_vec(),
    ];
    let attacker = [203, 0, 113, 5];
    for (i, value) in hostile.iter().enumerate() {
        for name in ["x-forwarded-for", "forwarded"] {
            let got = status(attacker, &[(name, value)]);
            let want = if i == 0 && name == "x-forwarded-for" {
                StatusCode::OK
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            assert_eq!(got, want, "untrusted peer, {name} #{i}");
        }
    }
    // Behind the trusted proxy, garbage counts as the proxy, never as the victim.
    let proxy = [10, 0, 0, 1];
    for value in &hostile[3..] {
        status(proxy, &[("x-forwarded-for", value)]);
        // (`…;for=198.51.100.1` is a Forwarded element naming the victim: skipped.)
        if !value.windows(4).any(|w| w == b"for=") {
            status(proxy, &[("forwarded", value)]);
        }
    }
    // More entries than are walked, all proxies but the last: the nearest proxy is the
    // client (bounded work, strict), not the far end.
    let proxies = [b"198.51.100.1".as_slice(), &b", 10.0.0.9".repeat(100)].concat();
    status(proxy, &[("x-forwarded-for", &proxies)]);
    assert_eq!(
        status(victim, &[]),
        StatusCode::OK,
        "the victim's call is its own"
    );
    assert_eq!(status(victim, &[]), StatusCode::TOO_MANY_REQUESTS);
}
