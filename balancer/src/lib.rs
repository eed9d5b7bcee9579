//! Debian's HAProxy (`scripts/balancer-deps` installs it) in front of coordinator replicas on this
//! machine, as deploy/haproxy.cfg configures it (round robin, health checks on `/healthz` every
//! 500 ms, WebSocket sessions tunnelled, a request whose replica refuses the connection or drains
//! sent to another), with a loopback `bind` and the replicas' `server` lines. The multi-replica
//! tests and `medsplit-load --balancer` run it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};

/// deploy/haproxy.cfg, listening on loopback `port` in front of the replicas on `replicas`.
pub fn config(port: u16, replicas: &[u16]) -> String {
    let mut config = String::new();
    for line in include_str!("../../deploy/haproxy.cfg").lines() {
        match line.trim_start() {
            l if l.starts_with("bind ") => config.push_str(&format!("    bind 127.0.0.1:{port}\n")),
            l if l.starts_with("server ") => {}
            _ => config.push_str(&format!("{line}\n")),
        }
    }
    for (i, p) in replicas.iter().enumerate() {
        config.push_str(&format!("    server replica{i} 127.0.0.1:{p} check\n"));
    }
    config
}

/// A running HAProxy; killed when dropped.
pub struct Balancer {
    _child: tokio::process::Child,
    pub url: String,
}

impl Balancer {
    /// Starts HAProxy (`$HAPROXY` or `haproxy` on the PATH) in front of `replicas`, its
    /// configuration written in `dir`, and waits until it accepts connections.
    pub async fn start(dir: &Path, replicas: &[u16]) -> anyhow::Result<Balancer> {
        let haproxy = std::env::var("HAPROXY").unwrap_or_else(|_| "haproxy".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config(port, replicas))?;
        let child = tokio::process::Command::new(&haproxy)
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "{haproxy}: install Debian's haproxy (scripts/balancer-deps) or set HAPROXY"
                )
            })?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() >= deadline {
                bail!("HAProxy did not start listening on 127.0.0.1:{port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Balancer {
            _child: child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}
