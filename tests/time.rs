//! Time (ARCHITECTURE.md, behaviour contract items 6 and 11, under clock jumps): the
//! clock stepping backwards or forwards, for every algorithm, never panics, never yields a
//! negative or absurd header, and never unblocks a blocked user earlier than the jump
//! explains.
//!
//! "Real time" below is what would pass on a wall clock that never jumps; the
//! `ManualClock` moves with it (`advance`) and also jumps (`advance`, `rewind`, `set`)
//! without real time passing.

use std::convert::Infallible;
use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, Request, Response, StatusCode};
use proptest::prelude::*;
use tollgate::{
    Algorithm, Decision, Identity, ManualClock, MemoryStore, RateLimitConfig, RateLimitLayer,
    ResponseBody,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Body = String;
type Resp = Response<ResponseBody<Body>>;

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
    Algorithm::TokenBucket,
];
const SEC: u64 = 1_000_000;

struct Harness<S> {
    svc: S,
    clock: ManualClock,
    layer: RateLimitLayer,
    period: u64,
    count: u64,
    /// The latest the clock has ever read (µs since the epoch).
    high_water: u64,
}

fn harness(
    algorithm: Algorithm,
    rate: &str,
) -> Harness<impl Service<Request<Body>, Response = Resp, Error = Infallible> + Clone> {
    let cfg = RateLimitConfig::from_toml_str(&format!(
        "by_user = \"{rate}\"\nalgorithm = \"{algorithm}\"\nheaders = \"both\""
    ))
    .unwrap();
    let count = cfg.by_user().unwrap().count();
    let mut period = cfg.by_user().unwrap().period().as_micros() as u64;
    if algorithm == Algorithm::TokenBucket {
        // The bucket fills one token every ceil(period / count) µs: full again at most
        // count such intervals ahead, a few µs past the period when it does not divide.
        period = period.div_ceil(count) * count;
    }
    let clock = ManualClock::new();
    let layer = RateLimitLayer::with_store(cfg, MemoryStore::with_max_keys(1_000))
        .with_clock(clock.clone());
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::from("ok")))
        }));
    let high_water = micros(&clock);
    Harness {
        svc,
        clock,
        layer,
        period,
        count,
        high_water,
    }
}

fn micros(clock: &ManualClock) -> u64 {
    clock.now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn num(h: &HeaderMap, name: &str) -> u64 {
    let v = h
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap();
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: {v:?} is not a non-negative integer"))
}

/// What one request saw.
struct Seen {
    allowed: bool,
    retry_after: u64,
}

impl<S> Harness<S>
where
    S: Service<Request<Body>, Response = Resp, Error = Infallible> + Clone,
{
    fn moved(&mut self) {
        self.high_water = self.high_water.max(micros(&self.clock));
    }

    /// One request for `alice`, with every header invariant checked.
    async fn request(&mut self) -> Seen {
        self.moved();
        let mut req = Request::new(Body::new());
        req.extensions_mut().insert(Identity::user("alice"));
        let resp = self.svc.clone().oneshot(req).await.unwrap();
        let now = micros(&self.clock);
        let behind = self.high_water - now;
        let h = resp.headers();
        let status = resp.status();
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
        assert_eq!(
            self.layer.stats().store_errors,
            0,
            "the store failed (or panicked) at {now}"
        );
        let decision = *resp.extensions().get::<Decision>().expect("a decision");
        assert_eq!(decision.is_allowed(), status == StatusCode::OK);
        assert_eq!(num(h, "x-ratelimit-limit"), self.count);
        assert!(num(h, "x-ratelimit-remaining") < self.count);
        // Reset: never before now, never beyond a period past the latest time seen.
        // (Compared in seconds: the clock may sit near the end of u64 µs.)
        let reset = num(h, "x-ratelimit-reset");
        assert!(
            reset >= now.div_ceil(SEC),
            "reset {reset}s before now {now}µs"
        );
        let limit = (self.high_water.saturating_add(self.period)).div_ceil(SEC);
        assert!(
            reset <= limit,
            "reset {reset}s: more than a period past the high-water mark {}µs",
            self.high_water
        );
        assert!(decision.reset_after().as_micros() <= u128::from(behind + self.period));
        let ietf = h["ratelimit"].to_str().unwrap();
        let t: u64 = ietf.rsplit("t=").next().unwrap().parse().unwrap();
        assert!(t <= (behind + self.period).div_ceil(SEC), "{ietf}");
        if status == StatusCode::OK {
            assert!(h.get("retry-after").is_none());
            return Seen {
                allowed: true,
                retry_after: 0,
            };
        }
        let retry = num(h, "retry-after");
        assert!(retry >= 1, "Retry-After {retry}");
        assert!(
            retry <= (behind + self.period + 1_000).div_ceil(SEC),
            "Retry-After {retry}s with a {}s period and the clock {behind}µs behind",
            self.period / SEC
        );
        let exact = decision.retry_after().unwrap().as_micros() as u64;
        assert!(
            exact > 0 && exact.div_ceil(SEC) == retry,
            "{exact}µs vs {retry}s"
        );
        Seen {
            allowed: false,
            retry_after: exact,
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_blocked_user_stays_blocked_when_the_clock_steps_back() {
    for alg in ALGORITHMS {
        block_on(async {
            let mut h = harness(alg, "3/10s");
            for _ in 0..3 {
                assert!(h.request().await.allowed, "{alg}");
            }
            let blocked = h.request().await;
            assert!(!blocked.allowed, "{alg}");
            for back in [Duration::from_secs(1), Duration::from_secs(3_600)] {
                h.clock.rewind(back);
                let seen = h.request().await;
                assert!(!seen.allowed, "{alg}: unblocked by a {back:?} step back");
                assert!(
                    seen.retry_after >= blocked.retry_after + back.as_micros() as u64,
                    "{alg}: the wait shrank"
                );
                h.clock.advance(back);
            }
            // Back where it was, the original wait still applies to the microsecond.
            h.clock
                .advance(Duration::from_micros(blocked.retry_after - 1));
            assert!(!h.request().await.allowed, "{alg}: one µs early");
            h.clock.advance(Duration::from_micros(1));
            assert!(h.request().await.allowed, "{alg}: on time");
        });
    }
}

#[test]
fn a_forward_jump_unblocks_no_earlier_than_its_length() {
    for alg in ALGORITHMS {
        block_on(async {
            let mut h = harness(alg, "2/m");
            assert!(h.request().await.allowed);
            assert!(h.request().await.allowed);
            let blocked = h.request().await;
            assert!(!blocked.allowed, "{alg}");
            h.clock
                .advance(Duration::from_micros(blocked.retry_after - SEC));
            h.moved();
            assert!(!h.request().await.allowed, "{alg}: a jump 1 s short");
            h.clock.advance(Duration::from_secs(1));
            h.moved();
            assert!(
                h.request().await.allowed,
                "{alg}: the jump covered the wait"
            );
        });
    }
}

#[test]
fn state_written_in_the_future_is_kept_when_the_clock_comes_back() {
    // A jump forward, requests there, then the clock corrected back: the requests made
    // "in the future" still count, for the whole period after the jump.
    for alg in ALGORITHMS {
        block_on(async {
            let mut h = harness(alg, "2/m");
            h.clock.advance(Duration::from_secs(86_400));
            h.moved();
            assert!(h.request().await.allowed);
            assert!(h.request().await.allowed);
            h.clock.rewind(Duration::from_secs(86_400));
            let seen = h.request().await;
            assert!(!seen.allowed, "{alg}: the correction erased the counter");
            assert!(seen.retry_after > 86_400 * SEC, "{alg}");
        });
    }
}

#[test]
fn the_clock_at_the_epoch_and_far_ahead_never_breaks_a_request() {
    for alg in ALGORITHMS {
        block_on(async {
            let mut h = harness(alg, "2/s");
            for at in [
                Duration::ZERO,
                Duration::from_secs(1),
                ManualClock::START,
                Duration::from_secs(253_402_300_799), // 9999-12-31T23:59:59Z
                Duration::from_secs(1 << 40),         // ~36 800 years ahead
                ManualClock::START,
                Duration::ZERO,
            ] {
                h.clock.set(at);
                h.moved();
                for _ in 0..3 {
                    h.request().await;
                }
            }
        });
    }
}

#[test]
fn the_clock_at_the_end_of_u64_never_breaks_a_request() {
    for alg in ALGORITHMS {
        block_on(async {
            let mut h = harness(alg, "2/s");
            // Duration::MAX saturates to u64::MAX µs in the clock.
            h.clock.set(Duration::MAX);
            h.moved();
            for _ in 0..3 {
                h.request().await;
            }
        });
    }
}

// ---- properties ----

#[derive(Clone, Debug)]
enum Op {
    /// Real time passes (ms); the clock moves with it.
    Pass(u64),
    /// The clock jumps forward (ms); no real time passes.
    Forward(u64),
    /// The clock steps back (ms).
    Back(u64),
    /// The clock is set to START + offset (s, may be negative).
    Set(i64),
    /// `n` requests in a row.
    Request(u8),
}

fn op(period_ms: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..period_ms * 2).prop_map(Op::Pass),
        1 => (0..period_ms * 3).prop_map(Op::Forward),
        1 => (0u64..7_200_000).prop_map(Op::Back),
        1 => (0..period_ms * 3).prop_map(Op::Back),
        1 => (-86_400i64..86_400).prop_map(Op::Set),
        6 => (1u8..5).prop_map(Op::Request),
    ]
}

/// Runs `ops`; checks header invariants on every response (in `request`), and that a
/// user blocked with a wait of R is next allowed only once real time plus forward jumps
/// since the block reach R.
fn run(alg: Algorithm, rate: &str, ops: &[Op]) {
    block_on(async {
        let mut h = harness(alg, rate);
        let mut real: u64 = 0;
        let mut forward: u64 = 0;
        // (real time, forward jumps so far, wait) of every 429 since the last 200.
        let mut blocks: Vec<(u64, u64, u64)> = Vec::new();
        for op in ops {
            match *op {
                Op::Pass(ms) => {
                    h.clock.advance(Duration::from_millis(ms));
                    real += ms * 1_000;
                }
                Op::Forward(ms) => {
                    h.clock.advance(Duration::from_millis(ms));
                    forward += ms * 1_000;
                }
                Op::Back(ms) => h.clock.rewind(Duration::from_millis(ms)),
                Op::Set(offset) => {
                    let before = micros(&h.clock);
                    let to = ManualClock::START.as_secs().saturating_add_signed(offset);
                    h.clock.set(Duration::from_secs(to));
                    forward += (to * SEC).saturating_sub(before);
                }
                Op::Request(n) => {
                    for _ in 0..n {
                        let seen = h.request().await;
                        if seen.allowed {
                            for (at, fwd, wait) in blocks.drain(..) {
                                let explained = (real - at) + (forward - fwd);
                                assert!(
                                    explained >= wait,
                                    "{alg} {rate}: blocked for {wait}µs, allowed after \
                                     {}µs of real time and {}µs of forward jumps: {ops:?}",
                                    real - at,
                                    forward - fwd
                                );
                            }
                        } else {
                            blocks.push((real, forward, seen.retry_after));
                        }
                    }
                }
            }
            h.moved();
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn fixed_window_survives_clock_jumps(
        rate in prop::sample::select(vec![("3/s", 1_000u64), ("5/10s", 10_000), ("2/m", 60_000)])
            .prop_flat_map(|r| (Just(r), prop::collection::vec(op(r.1), 1..40)))
    ) {
        run(Algorithm::FixedWindow, rate.0.0, &rate.1);
    }

    #[test]
    fn sliding_window_survives_clock_jumps(
        rate in prop::sample::select(vec![("3/s", 1_000u64), ("5/10s", 10_000), ("2/m", 60_000)])
            .prop_flat_map(|r| (Just(r), prop::collection::vec(op(r.1), 1..40)))
    ) {
        run(Algorithm::SlidingWindow, rate.0.0, &rate.1);
    }

    #[test]
    fn token_bucket_survives_clock_jumps(
        rate in prop::sample::select(vec![("3/s", 1_000u64), ("5/10s", 10_000), ("2/m", 60_000)])
            .prop_flat_map(|r| (Just(r), prop::collection::vec(op(r.1), 1..40)))
    ) {
        run(Algorithm::TokenBucket, rate.0.0, &rate.1);
    }
}
