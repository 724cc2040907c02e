//! A real Redis Cluster for one test: six private `redis-server` processes (three masters,
//! three replicas) on free loopback ports, joined by `redis-cli --cluster create`, so a
//! test may kill a master and watch a replica take its slots. No containers.
//!
//! Without `redis-server` (or `redis-cli`), tests print why and skip, unless
//! `TOLLGATE_REQUIRE_REDIS=1`, which makes that a failure. Only nodes this harness
//! started (its own child processes) are ever killed.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use redis::cluster_async::ClusterConnection;

use super::redis::{
    command_calls, free_port_with_bus, fresh_dir, run_bounded, server_command, unavailable_unless,
    wait_ready,
};

/// What would let a skipped cluster test run (TOLLGATE_REDIS_URL is one server, no cluster).
const FIX: &str = "install redis-server and redis-cli";
/// Masters, and replicas per master.
const MASTERS: usize = 3;
/// Slots in a Redis Cluster.
const SLOTS: u32 = 16384;
/// How long `start` waits for the cluster to agree and the replicas to sync.
const FORM_TIMEOUT: Duration = Duration::from_secs(20);

/// Why one attempt to start a cluster failed.
enum StartError {
    /// Another attempt cannot help (no binary, no temp dir).
    Fatal(String),
    /// Another attempt, on fresh ports, may succeed.
    Retry(String),
}
use StartError::{Fatal, Retry};

/// One node: its port and, while it runs, its process.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A Redis Cluster of 3 masters and 3 replicas for one test. Drop kills every node and
/// removes its directory.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field(
                "ports",
                &self.nodes.iter().map(|n| n.port).collect::<Vec<_>>(),
            )
            .field("dir", &self.dir)
            .finish()
    }
}

/// One line of `CLUSTER NODES`, as far as the harness needs it.
#[derive(Debug)]
struct NodeLine {
    port: u16,
    master: bool,
    failed: bool,
    slots: Vec<RangeInclusive<u16>>,
}

/// Parses `CLUSTER NODES` (importing/migrating entries, `[..]`, are left out).
fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?;
            let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                    None => s.parse().ok().map(|n| n..=n),
                })
                .collect();
            Some(NodeLine {
                port,
                master: flags.split(',').any(|f| f == "master"),
                failed: flags.split(',').any(|f| f == "fail" || f == "fail?"),
                slots,
            })
        })
        .collect()
}

/// Sends `cmd` to the node on `port` (1 s to connect, 2 s to answer); `None` on any error.
fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    cmd.query(&mut conn).ok()
}

/// `CLUSTER INFO` of the node on `port`.
fn cluster_info(port: u16) -> Option<String> {
    query(port, redis::cmd("CLUSTER").arg("INFO"))
}

/// `CLUSTER NODES` of the node on `port`, parsed.
fn cluster_nodes(port: u16) -> Option<Vec<NodeLine>> {
    query::<String>(port, redis::cmd("CLUSTER").arg("NODES")).map(|t| parse_nodes(&t))
}

/// Whether the node on `port` says `cluster_state:ok` with every slot served.
fn state_ok(port: u16) -> bool {
    cluster_info(port).is_some_and(|info| {
        info.lines().any(|l| l.trim() == "cluster_state:ok")
            && info
                .lines()
                .any(|l| l.trim() == format!("cluster_slots_ok:{SLOTS}"))
    })
}

/// Whether `lines` give every slot to a master that is not failed and is not `except`.
fn all_slots_served(lines: &[NodeLine], except: Option<u16>) -> bool {
    let mut ranges: Vec<RangeInclusive<u16>> = lines
        .iter()
        .filter(|n| n.master && !n.failed && Some(n.port) != except)
        .flat_map(|n| n.slots.iter().cloned())
        .collect();
    ranges.sort_by_key(|r| *r.start());
    let mut next: u32 = 0;
    for r in ranges {
        if u32::from(*r.start()) != next {
            return false;
        }
        next = u32::from(*r.end()) + 1;
    }
    next == SLOTS
}

/// Whether the node on `port` is a master, or a replica whose link to its master is up.
fn replication_settled(port: u16) -> bool {
    query::<String>(port, redis::cmd("INFO").arg("replication")).is_some_and(|info| {
        info.lines().any(|l| l.trim() == "role:master")
            || info.lines().any(|l| l.trim() == "master_link_status:up")
    })
}

/// Starts one cluster node on `port`, its files in `dir`.
fn spawn_node(port: u16, dir: &std::path::Path) -> std::io::Result<Child> {
    let conf = dir.join(format!("nodes-{port}.conf"));
    server_command(dir)
        .args(["--cluster-enabled", "yes", "--cluster-config-file"])
        .arg(&conf)
        .args(["--cluster-node-timeout", "1000", "--port"])
        .arg(port.to_string())
        // A replica's first sync otherwise waits 5 s for more replicas to share the
        // diskless transfer; there is never another one.
        .args(["--repl-diskless-sync-delay", "0"])
        .spawn()
}

impl RedisCluster {
    /// Six nodes joined into a cluster of 3 masters, each with one replica, every slot
    /// served and every replica synced; `None` (after printing why) when that cannot be
    /// done, a panic instead when `TOLLGATE_REQUIRE_REDIS=1`.
    ///
    /// ```ignore
    /// let Some(cluster) = common::redis_cluster::RedisCluster::start("my_test") else { return };
    /// ```
    pub fn start(test: &str) -> Option<RedisCluster> {
        if let Err(e) = Command::new("redis-cli").arg("--version").output() {
            return unavailable_unless(test, &format!("redis-cli could not be run: {e}"), FIX);
        }
        let mut last = String::new();
        for _ in 0..3 {
            match RedisCluster::try_start() {
                Ok(cluster) => return Some(cluster),
                Err(Fatal(why)) => return unavailable_unless(test, &why, FIX),
                Err(Retry(why)) => last = why,
            }
        }
        unavailable_unless(test, &last, FIX)
    }

    /// One attempt: `Retry` when fresh ports may do better (a port taken meanwhile).
    fn try_start() -> Result<RedisCluster, StartError> {
        let dir = fresh_dir("tollgate-cluster")
            .map_err(|e| Fatal(format!("no temp dir for the cluster: {e}")))?;
        // Built first, so that Drop cleans up whatever an early return leaves.
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..MASTERS * 2 {
            let port = free_port_with_bus().ok_or_else(|| Retry("no free port pair".to_owned()))?;
            let child = spawn_node(port, &cluster.dir)
                .map_err(|e| Fatal(format!("redis-server could not be started: {e}")))?;
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for node in &mut cluster.nodes {
            let child = node.child.as_mut().expect("just started");
            if !wait_ready(child, node.port) {
                return Err(Retry(format!(
                    "cluster node did not answer on port {}",
                    node.port
                )));
            }
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(
            cluster
                .nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port)),
        );
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = run_bounded(&mut create, FORM_TIMEOUT).map_err(Retry)?;
        if !out.status.success() {
            return Err(Retry(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let deadline = Instant::now() + FORM_TIMEOUT;
        while Instant::now() < deadline {
            if cluster.formed() {
                return Ok(cluster);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Retry(format!(
            "the cluster did not settle within {FORM_TIMEOUT:?}"
        )))
    }

    /// Whether every node says the cluster is ok, sees 3 healthy masters serving every
    /// slot, and (if a replica) has synced with its master.
    fn formed(&self) -> bool {
        self.nodes.iter().all(|n| {
            state_ok(n.port)
                && cluster_nodes(n.port).is_some_and(|lines| {
                    lines.iter().filter(|l| l.master && !l.failed).count() == MASTERS
                        && all_slots_served(&lines, None)
                })
                && replication_settled(n.port)
        })
    }

    /// Ports of the nodes still running (not killed by [`RedisCluster::kill_node`]).
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `redis://127.0.0.1:P/` for every running node: seeds for a cluster client.
    pub fn seed_urls(&self) -> Vec<String> {
        self.live_ports()
            .into_iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// `CLUSTER NODES` as the first running node that answers sees it.
    fn view(&self) -> Vec<NodeLine> {
        self.live_ports()
            .into_iter()
            .find_map(cluster_nodes)
            .expect("a running cluster node answers CLUSTER NODES")
    }

    /// Ports of the current masters (not failed), sorted, as the cluster reports them.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .view()
            .into_iter()
            .filter(|n| n.master && !n.failed)
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Every slot range with the port of the (not failed) master serving it, by start.
    pub fn slot_ranges(&self) -> Vec<(RangeInclusive<u16>, u16)> {
        let mut ranges: Vec<(RangeInclusive<u16>, u16)> = self
            .view()
            .into_iter()
            .filter(|n| n.master && !n.failed)
            .flat_map(|n| n.slots.into_iter().map(move |r| (r, n.port)))
            .collect();
        ranges.sort_by_key(|(r, _)| *r.start());
        ranges
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, so hash tags count as Redis counts them).
    pub fn slot_of(&self, key: &str) -> u16 {
        self.live_ports()
            .into_iter()
            .find_map(|p| query(p, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)))
            .expect("a running cluster node answers CLUSTER KEYSLOT")
    }

    /// The port of the master now serving `key`'s slot.
    pub fn master_for_key(&self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        self.slot_ranges()
            .into_iter()
            .find(|(r, _)| r.contains(&slot))
            .map(|(_, port)| port)
            .unwrap_or_else(|| panic!("no master serves slot {slot} (key {key:?})"))
    }

    /// Kills the node on `port` (SIGKILL) and waits for it to go.
    pub fn kill_node(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("port {port} is not a node of this cluster"));
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits, up to `timeout`, until every running node says `cluster_state:ok` and sees
    /// every slot served by a healthy master other than `killed_port` (a replica has
    /// taken the killed master's slots). Whether that happened in time.
    pub fn wait_for_failover(&self, killed_port: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.live_ports().into_iter().all(|p| {
                state_ok(p)
                    && cluster_nodes(p).is_some_and(|lines| {
                        all_slots_served(&lines, Some(killed_port))
                            && !lines
                                .iter()
                                .any(|l| l.port == killed_port && !l.slots.is_empty())
                    })
            });
            if done {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A cluster connection (follows MOVED/ASK, refreshes its slot map) seeded with every
    /// running node, for the test's own commands.
    pub async fn cluster_conn(&self) -> ClusterConnection {
        redis::cluster::ClusterClient::builder(self.seed_urls())
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(5))
            .build()
            .expect("valid seed urls")
            .get_async_connection()
            .await
            .expect("the test's cluster answers")
    }

    /// A plain connection to the one node on `port` (no redirects followed).
    pub async fn node_conn(&self, port: u16) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("the cluster node answers")
    }

    /// `calls` of `command` in `INFO commandstats`, summed over the current masters (a
    /// killed master's count goes with it; replicas apply writes without counting them).
    pub async fn command_calls_on_masters(&self, command: &str) -> u64 {
        let mut total = 0;
        for port in self.masters() {
            total += command_calls(&mut self.node_conn(port).await, command).await;
        }
        total
    }

    /// `EVALSHA` calls summed over the current masters.
    pub async fn evalsha_calls(&self) -> u64 {
        self.command_calls_on_masters("evalsha").await
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster as a [`Backend`](super::Backend): each value has a fresh key prefix,
/// decides on the test's clock, and layers made from one value share one store.
pub struct ClusterBackend {
    seeds: Vec<String>,
    prefix: String,
    store: std::sync::Mutex<Option<tollgate::RedisStore>>,
}

impl ClusterBackend {
    /// A backend on `cluster`, with a fresh prefix.
    pub fn on(cluster: &RedisCluster) -> ClusterBackend {
        ClusterBackend {
            seeds: cluster.seed_urls(),
            prefix: super::redis::fresh_prefix(),
            store: std::sync::Mutex::new(None),
        }
    }

    /// The store layers from this backend share (caller time, generous timeout, no deny
    /// cache: as [`super::redis::caller_time_store`]).
    pub fn store(&self) -> tollgate::RedisStore {
        let mut slot = self.store.lock().unwrap();
        slot.get_or_insert_with(|| {
            tollgate::RedisStore::cluster(self.seeds.iter().cloned())
                .key_prefix(&self.prefix)
                .caller_time(true)
                .timeout(Duration::from_secs(5))
                .deny_cache(0)
                .build()
                .expect("valid seed urls")
        })
        .clone()
    }
}

impl super::Backend for ClusterBackend {
    fn name(&self) -> &'static str {
        "redis_cluster"
    }

    fn layer(
        &self,
        cfg: tollgate::RateLimitConfig,
        clock: &tollgate::ManualClock,
    ) -> tollgate::RateLimitLayer {
        tollgate::RateLimitLayer::with_store(cfg, self.store()).with_clock(clock.clone())
    }
}
