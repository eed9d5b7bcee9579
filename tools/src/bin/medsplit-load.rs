//! `medsplit-load`: coordinator processes (one, or replicas behind HAProxy) serving many agents,
//! each training its own job at the same time. Prints per-batch latency percentiles (as the
//! agents see them: one training step, forward and backward, including the agent's own
//! computation) and the coordinators' CPU time per trained sample (from /proc), in all and per
//! replica.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use medsplit_agent::config::LocalData;
use medsplit_agent::visit::{self, Observer};
use medsplit_engine::metrics::EvalKind;
use medsplit_tools::local::{self, Postgres, Rest};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(
    version,
    about = "Load test: many agents training many jobs on one coordinator or on replicas behind HAProxy"
)]
struct Args {
    /// Agents, each at its own hospital with its own job.
    #[arg(long, default_value_t = 20)]
    agents: usize,
    /// Synthetic training beats per agent (a fifth more are drawn for its test set).
    #[arg(long, default_value_t = 400)]
    samples: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: u32,
    /// The round-trip time between the agents and the coordinator, in milliseconds (a relay in
    /// this process delays each direction by half of it).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// The bandwidth of each agent's link each way, in Mbit/s (default: unlimited).
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// Coordinator processes on the one database; more than one puts HAProxy in front.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Put HAProxy (deploy/haproxy.cfg) in front of the replicas even when there is one.
    #[arg(long)]
    balancer: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const PASSWORD: &str = "load-password-not-for-production";

/// Records the wall time of every training step.
struct Steps {
    last: Instant,
    out: Arc<Mutex<Vec<f64>>>,
}

impl Observer for Steps {
    fn epoch_started(&mut self, _: u32, _: u32, _: u64) {
        self.last = Instant::now();
    }
    fn batch_done(&mut self, _: u64) {
        let now = Instant::now();
        self.out
            .lock()
            .unwrap()
            .push((now - self.last).as_secs_f64());
        self.last = now;
    }
}

/// A process's peak resident memory, in MiB (`VmHWM` of /proc).
fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Many agents share this machine's cores here; an agent polling for its replies would take
    // CPU from the others and from the coordinator.
    visit::poll_for_replies(false);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let exe = std::env::current_exe()?;
    let coordinator_bin = exe.with_file_name("medsplit-coordinator");
    if !coordinator_bin.exists() {
        bail!("medsplit-coordinator not found next to this program: cargo build --release --bins");
    }
    let dir = std::env::temp_dir().join(format!("medsplit-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pg = Postgres::start(&dir).await?;
    let key = dir.join("jwt.key");
    local::write_private(&key, medsplit_coordinator::auth::new_secret().as_bytes())?;
    let status = tokio::process::Command::new(&coordinator_bin)
        .args(["create-admin", "--email", "load@medsplit.local"])
        .env("DATABASE_URL", &pg.url)
        .env("MEDSPLIT_ADMIN_PASSWORD", PASSWORD)
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("create-admin failed");
    }
    let mut replicas = Vec::new();
    for _ in 0..args.replicas {
        let mut child = tokio::process::Command::new(&coordinator_bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--jwt-key-file"])
            .arg(&key)
            .env("DATABASE_URL", &pg.url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().context("coordinator pid")?;
        let line = BufReader::new(child.stdout.take().context("stdout")?)
            .lines()
            .next_line()
            .await?
            .context("the coordinator exited")?;
        let url = line.rsplit(' ').next().unwrap_or_default().to_string();
        let port: u16 = url.rsplit(':').next().unwrap_or_default().parse()?;
        replicas.push((child, pid, url, port));
    }
    let balancer = if args.replicas > 1 || args.balancer {
        let ports: Vec<u16> = replicas.iter().map(|r| r.3).collect();
        Some(medsplit_balancer::Balancer::start(&dir, &ports).await?)
    } else {
        None
    };
    let url = match &balancer {
        Some(b) => b.url.clone(),
        None => replicas[0].2.clone(),
    };

    // Each agent's connections go through the emulated link, if one is set (one relay: each
    // connection gets a link of its own).
    let link = medsplit_tools::relay::Link::new(args.rtt_ms, args.bandwidth_mbps)?;
    let (_relay, agent_url) = medsplit_tools::relay::in_front_of(url.clone(), link).await?;
    let admin = Rest::new(&url)
        .login("load@medsplit.local", PASSWORD)
        .await?;
    let researcher =
        local::create_user(&admin, "r@load.local", PASSWORD, "researcher", None).await?;
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let name = format!("load-{i}");
        let ha = local::hospital_with_admin(&admin, &name, PASSWORD).await?;
        let (coordinator, secret) = local::enrol_in_process(&agent_url, &ha, &name).await?;
        let job = researcher
            .call(
                "POST",
                "/v1/jobs",
                Some(json!({ "name": name, "hospitals": [name], "batch_size": args.batch_size, "seed": i })),
            )
            .await?;
        ha.call(
            "POST",
            &format!("/v1/jobs/{}/consent", job["id"]),
            Some(json!({ "decision": "approve" })),
        )
        .await?;
        let assignment = coordinator
            .claim(Duration::from_secs(10))
            .await?
            .context("no visit offered")?;
        let all = medsplit_engine::data::synthetic(args.samples + args.samples / 5, 7 + i as u64);
        let train: Vec<usize> = (0..args.samples).collect();
        let test: Vec<usize> = (args.samples..all.len()).collect();
        let data = LocalData {
            train: all.select(&train)?,
            test: all.select(&test)?,
            kind: EvalKind::Beat,
        };
        agents.push((coordinator, secret, assignment, data));
    }
    eprintln!(
        "{} agents enrolled, each holding a claimed visit of its own job",
        agents.len()
    );

    let steps = Arc::new(Mutex::new(Vec::new()));
    let cpu_of =
        || -> anyhow::Result<Vec<f64>> { replicas.iter().map(|r| cpu_seconds(r.1)).collect() };
    let cpu_before = cpu_of()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (coordinator, secret, assignment, data) in agents {
        let steps = steps.clone();
        let coordinator = Arc::new(coordinator);
        // Keep the lease while training, as the agent daemon does.
        let beat = coordinator.keep_lease((assignment.visit_id, assignment.attempt));
        tasks.push(tokio::spawn(async move {
            let mut observer = Steps {
                last: Instant::now(),
                out: steps,
            };
            let result = visit::run(&coordinator, &secret, &assignment, &data, &mut observer).await;
            beat.abort();
            result
        }));
    }
    let mut samples = 0u64;
    for t in tasks {
        let summary = t.await??;
        samples += summary.train.samples as u64;
    }
    let wall = started.elapsed().as_secs_f64();
    let per_replica: Vec<f64> = cpu_of()?
        .iter()
        .zip(&cpu_before)
        .map(|(after, before)| after - before)
        .collect();
    let cpu: f64 = per_replica.iter().sum();
    let peak_rss: Vec<f64> = replicas
        .iter()
        .map(|r| peak_rss_mib(r.1))
        .collect::<anyhow::Result<_>>()?;
    let mut lat = steps.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let ms = |p| 1e3 * percentile(&lat, p);
    let report = json!({
        "agents": args.agents,
        "replicas": args.replicas,
        "balancer": balancer.is_some(),
        "coordinator_cpu_seconds_per_replica": per_replica,
        "coordinator_peak_rss_mib_per_replica": peak_rss,
        "jobs": args.agents,
        "batch_size": args.batch_size,
        "link": link.describe(),
        "samples_trained": samples,
        "batches": lat.len(),
        "wall_seconds": wall,
        "batch_latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": ms(1.0) },
        "coordinator_cpu_seconds": cpu,
        "coordinator_cpu_ms_per_sample": 1e3 * cpu / samples.max(1) as f64,
        "samples_per_second": samples as f64 / wall,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    drop(balancer);
    drop(replicas);
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
