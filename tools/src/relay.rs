//! A TCP relay that makes a link slow, in user space (these machines have no netem): every byte
//! is delayed by half the round-trip time in each direction, and each direction carries at most
//! the given bandwidth. The benchmarks, the load generator and the demo put it between the
//! agents and the coordinator (`--rtt-ms`, `--bandwidth-mbps`).
//!
//! Each direction is a link of its own, modelled as a queue in front of a wire: a chunk read at
//! time `t` starts to go out when the wire is free (`start = max(t, free)`), takes
//! `len / bandwidth` to go out (`free = start + len / bandwidth`), and arrives half a round trip
//! later (`free + rtt / 2`). Chunks keep their order. A direction holds at most [`QUEUED`] chunks
//! between reading and delivering, so that a slow link pushes back on its sender like a real one
//! (the TCP window) instead of buffering without bound.
//!
//! Each direction runs on two threads of its own with blocking sockets: a reader, and a writer
//! that sleeps until each chunk's time. The OS sleeps to within tens of microseconds, where an
//! async timer rounds every wait up to the next millisecond, which would add a millisecond or
//! two to every message (a round trip per message at 0 ms).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

/// The most chunks (of up to 64 KiB) one direction holds between reading and delivering: 4 MiB,
/// a generous TCP window (enough to fill 100 Mbit/s at 300 ms).
pub const QUEUED: usize = 64;

/// How slow the link is.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Link {
    /// Round-trip time added (half in each direction).
    pub rtt: Duration,
    /// Each direction's bandwidth in bits per second; `None`: unlimited.
    pub bandwidth_bps: Option<f64>,
}

impl Link {
    /// A link of `rtt_ms` round trip and `bandwidth_mbps` (megabits per second) each way.
    pub fn new(rtt_ms: f64, bandwidth_mbps: Option<f64>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rtt_ms.is_finite() && (0.0..=10_000.0).contains(&rtt_ms),
            "--rtt-ms must be between 0 and 10000"
        );
        if let Some(b) = bandwidth_mbps {
            anyhow::ensure!(
                b.is_finite() && b > 0.0,
                "--bandwidth-mbps must be positive"
            );
        }
        Ok(Self {
            rtt: Duration::from_secs_f64(rtt_ms / 1000.0),
            bandwidth_bps: bandwidth_mbps.map(|b| b * 1e6),
        })
    }

    /// Whether the link adds nothing (no relay is needed).
    pub fn is_loopback(&self) -> bool {
        self.rtt.is_zero() && self.bandwidth_bps.is_none()
    }

    /// In a few words, for logs and tables.
    pub fn describe(&self) -> String {
        let rtt = format!("{} ms RTT", self.rtt.as_secs_f64() * 1000.0);
        match self.bandwidth_bps {
            Some(b) => format!("{rtt}, {} Mbit/s", b / 1e6),
            None => rtt,
        }
    }
}

/// A running relay: connections to [`Relay::addr`] are forwarded to the upstream address over
/// the slow link. Dropping it stops accepting (open connections run to their end).
pub struct Relay {
    pub addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Relay {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, link: Link) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(client) = client.into_std() else {
                    continue;
                };
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(upstream) else {
                        return;
                    };
                    let _ = client.set_nonblocking(false);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                        return;
                    };
                    let up = std::thread::spawn(move || direction(client, server, link));
                    direction(s2, c2, link);
                    let _ = up.join();
                });
            }
        });
        Ok(Self { addr, accept })
    }

    /// The relay's address as a URL with `url`'s scheme and path (`http://127.0.0.1:PORT`).
    pub fn url_for(&self, url: &str) -> String {
        with_host(url, self.addr)
    }
}

/// What agents connect to for a coordinator at `url` (`http://IP:PORT`) over `link`: a relay
/// started in front of it (keep it while they run) and its URL, or `url` itself when the link
/// adds nothing.
pub async fn in_front_of(url: String, link: Link) -> anyhow::Result<(Option<Relay>, String)> {
    if link.is_loopback() {
        return Ok((None, url));
    }
    let upstream: SocketAddr = url
        .split_once("://")
        .map_or(url.as_str(), |(_, rest)| rest)
        .trim_end_matches('/')
        .parse()
        .map_err(|e| anyhow::anyhow!("{url}: not a coordinator at IP:PORT ({e})"))?;
    let relay = Relay::start(upstream, link).await?;
    let agent_url = relay.url_for(&url);
    Ok((Some(relay), agent_url))
}

/// `url` with its host and port replaced by `addr`.
fn with_host(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    format!("{scheme}://{addr}{path}")
}

/// One direction of a connection: read, schedule, deliver (on a thread of its own); closes the
/// writing side when the reading side ends, after delivering what was read.
fn direction(mut from: TcpStream, to: TcpStream, link: Link) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUED);
    let deliver = std::thread::spawn(move || deliver(rx, to));
    let one_way = link.rtt / 2;
    let mut free = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let start = free.max(Instant::now());
        free = match link.bandwidth_bps {
            Some(bps) => start + Duration::from_secs_f64(n as f64 * 8.0 / bps),
            None => start,
        };
        if tx.send((free + one_way, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = deliver.join();
    let _ = from.shutdown(Shutdown::Read);
}

fn deliver(rx: mpsc::Receiver<(Instant, Vec<u8>)>, mut to: TcpStream) {
    while let Ok((at, bytes)) = rx.recv() {
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        if to.write_all(&bytes).is_err() {
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// An echo server: what it reads, it writes back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Round trips through the relay take the set RTT (the median of 20 pings within 10 %, none
    /// shorter than the setting).
    #[tokio::test]
    async fn round_trips_take_the_set_rtt() {
        let link = Link::new(40.0, None).unwrap();
        let relay = Relay::start(echo().await, link).await.unwrap();
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut rtts = Vec::new();
        let mut byte = [0u8; 1];
        for i in 0..20u8 {
            let t = std::time::Instant::now();
            s.write_all(&[i]).await.unwrap();
            s.read_exact(&mut byte).await.unwrap();
            assert_eq!(byte[0], i, "bytes arrive, in order");
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
        let m = median(rtts);
        assert!(
            min >= 40.0,
            "a round trip took {min} ms, under the 40 ms set"
        );
        assert!(
            m <= 44.0,
            "median round trip {m} ms, more than 10 % over 40 ms"
        );
    }

    /// A bulk transfer goes at the set bandwidth (within 10 %), and arrives whole.
    #[tokio::test]
    async fn transfers_go_at_the_set_bandwidth() {
        let link = Link::new(0.0, Some(50.0)).unwrap();
        // A sink that counts what it receives and reports when it has all of it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = listener.local_addr().unwrap();
        const BYTES: usize = 4 << 20;
        let received = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut all = Vec::with_capacity(BYTES);
            s.read_to_end(&mut all).await.unwrap();
            (std::time::Instant::now(), all)
        });
        let relay = Relay::start(sink, link).await.unwrap();
        let data: Vec<u8> = (0..BYTES).map(|i| (i * 7 % 251) as u8).collect();
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        let t = std::time::Instant::now();
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let (done, all) = received.await.unwrap();
        assert!(all == data, "the bytes arrive whole and in order");
        let mbps = BYTES as f64 * 8.0 / done.duration_since(t).as_secs_f64() / 1e6;
        assert!(
            (45.0..=50.0 * 1.001).contains(&mbps),
            "{mbps:.1} Mbit/s through a 50 Mbit/s link"
        );
    }

    #[test]
    fn links_are_checked_and_described() {
        assert!(Link::new(-1.0, None).is_err());
        assert!(Link::new(10.0, Some(0.0)).is_err());
        assert!(Link::new(0.0, None).unwrap().is_loopback());
        let l = Link::new(20.0, Some(100.0)).unwrap();
        assert_eq!(l.describe(), "20 ms RTT, 100 Mbit/s");
        let addr: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(
            with_host("http://10.0.0.1:8080/x", addr),
            "http://127.0.0.1:5/x"
        );
        assert_eq!(with_host("https://c.example", addr), "https://127.0.0.1:5");
    }
}
