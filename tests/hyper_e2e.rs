//! The plain-hyper example (`examples/hyper_server.rs`), tried as a new user would: the
//! real binary on a free loopback port, called over real sockets from two client
//! addresses. Linux routes all of 127.0.0.0/8 over `lo`, so a client socket bound to
//! 127.0.0.2 is a second client address to the server.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::example::{example_binary, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn hyper_server_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_binary("hyper_server"))
}

/// The status and `x-ratelimit-remaining` of `GET /` sent from `client` (port 0: a fresh
/// ephemeral port, so every call is a new connection with a new peer `SocketAddr`).
async fn get_from(client: Ipv4Addr, server: SocketAddr) -> (u16, Option<u64>) {
    let call = async {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket
            .bind(SocketAddr::new(IpAddr::V4(client), 0))
            .expect("bind the client address");
        let mut stream = socket.connect(server).await.expect("connect");
        let head = format!("GET / HTTP/1.1\r\nhost: {server}\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        String::from_utf8(raw).expect("UTF-8 response")
    };
    let text = tokio::time::timeout(IO_TIMEOUT, call)
        .await
        .expect("an answer in time");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let remaining = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("x-ratelimit-remaining"))
        .map(|(_, v)| v.trim().parse().expect("a number"));
    (status, remaining)
}

/// True when this machine lets a socket bind 127.0.0.2 (Linux; not macOS by default).
fn second_loopback_address_works() -> bool {
    std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).is_ok()
}

/// The default config (`by_user = "5/m"`, `anonymous = "by_ip"`): the server inserts each
/// connection's peer `SocketAddr`, so every client address has its own five calls, over
/// as many connections as it likes; the sixth is a 429, and another address is
/// unaffected. Then SIGTERM stops the server cleanly.
#[tokio::test]
async fn each_client_address_has_its_own_counter() {
    let mut server = Running::start(
        hyper_server_binary(),
        "tollgate hyper_server",
        &["--listen", "127.0.0.1:0"],
    );
    let (one, two) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    for left in (0..5).rev() {
        assert_eq!(get_from(one, server.addr).await, (200, Some(left)));
    }
    let refused = get_from(one, server.addr).await;
    assert_eq!(refused, (429, Some(0)), "the sixth call from {one}");

    // Linux routes all of 127/8 to lo, so there the second address must be tried: without
    // it the test could not tell per-address counters from one shared bucket.
    let second = second_loopback_address_works();
    assert!(
        second || !cfg!(target_os = "linux"),
        "127.0.0.2 cannot be bound"
    );
    if second {
        // Not the shared anonymous bucket: 127.0.0.2 starts from five.
        for left in (0..5).rev() {
            assert_eq!(get_from(two, server.addr).await, (200, Some(left)));
        }
        assert_eq!(get_from(two, server.addr).await, (429, Some(0)));
    } else {
        eprintln!("cannot bind 127.0.0.2 here: the second client address is not tried");
    }
    assert_eq!(
        get_from(one, server.addr).await.0,
        429,
        "{one} stays limited"
    );

    // Killed by the signal it would not exit 0: it caught SIGTERM and shut down.
    #[cfg(unix)]
    {
        let status = server.terminate();
        assert!(status.success(), "exit status after SIGTERM: {status}");
    }
}
