//! The Redis store's connections: separate sockets, and a silently dead socket (no reset,
//! no answer, as after a NAT or load-balancer drop) is replaced after one timeout instead
//! of costing every later request a timeout.

#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::{fresh_prefix, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::{
    Algorithm, Key, Rate, RedisStore, RuleKind, Store, StoreFuture, StoreRequest, Subject,
};

/// A loopback TCP proxy to Redis. Connections accepted before `blackhole()` stop
/// forwarding (bytes are swallowed, nothing is closed); later ones work.
struct Proxy {
    port: u16,
    accepted: Arc<AtomicUsize>,
    dead_below: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(redis_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let dead_below = Arc::new(AtomicUsize::new(0));
        let (acc, dead) = (accepted.clone(), dead_below.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = acc.fetch_add(1, Ordering::SeqCst);
                let server = TcpStream::connect(("127.0.0.1", redis_port)).await.unwrap();
                let dead = dead.clone();
                tokio::spawn(pipe(client, server, id, dead));
            }
        });
        Proxy {
            port,
            accepted,
            dead_below,
            task,
        }
    }

    fn blackhole(&self) {
        self.dead_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, id: usize, dead: Arc<AtomicUsize>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let d2 = dead.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if id >= dead.load(Ordering::SeqCst) && sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = sr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if id >= d2.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(up, down);
}

fn redis_port(server: &RedisServer) -> u16 {
    server
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn check(store: &RedisStore, user: &str) -> Result<bool, tollgate::StoreError> {
    let keys = [Key::new(
        RuleKind::User,
        Subject::Named(user.as_bytes()),
        Rate::per_minute(1_000),
        Algorithm::FixedWindow,
    )];
    let answer = match store.check(&StoreRequest::new(&keys, 0)) {
        StoreFuture::Ready(r) => r,
        StoreFuture::Pending(f) => f.await,
    };
    answer.map(|o| o.iter().all(|o| o.is_allowed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_separate_sockets() {
    let Some(server) = RedisServer::private("requests_spread_over_separate_sockets") else {
        return;
    };
    // Coalescing off: round-robin over the four shared sockets. On (the default): two,
    // one per coalescing lane.
    for (max_batch, sockets) in [(1, 4), (128, 2)] {
        let proxy = Proxy::start(redis_port(&server)).await;
        let store = RedisStore::builder(format!("redis://127.0.0.1:{}/0", proxy.port))
            .key_prefix(fresh_prefix())
            .pool_size(16)
            .max_batch(max_batch)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        for i in 0..40 {
            assert!(check(&store, &format!("u{i}")).await.unwrap());
        }
        assert_eq!(
            proxy.accepted.load(Ordering::SeqCst),
            sockets,
            "max_batch {max_batch}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_socket_is_replaced_after_one_timeout() {
    let Some(server) = RedisServer::private("a_silently_dead_socket_is_replaced_after_one_timeout")
    else {
        return;
    };
    let proxy = Proxy::start(redis_port(&server)).await;
    let store = RedisStore::builder(format!("redis://127.0.0.1:{}/0", proxy.port))
        .key_prefix(fresh_prefix())
        .pool_size(1)
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    assert!(check(&store, "before").await.unwrap());
    proxy.blackhole();
    let hung = check(&store, "hung").await.unwrap_err();
    assert_eq!(hung.kind(), tollgate::StoreErrorKind::Timeout);
    // The next request opens a new socket (through the proxy, which now forwards new
    // connections) instead of waiting on the dead one.
    for i in 0..5 {
        assert!(
            check(&store, &format!("after{i}")).await.unwrap(),
            "request {i} after the timeout"
        );
    }
    assert_eq!(
        proxy.accepted.load(Ordering::SeqCst),
        2,
        "one replacement socket"
    );
}
