//! `medsplit`: the researchers' and admins' command line (a REST client of the coordinator),
//! and `medsplit demo`, which runs the whole platform on this machine.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use medsplit_tools::local::{self, Postgres, Rest};
use medsplit_tools::report::{self, Detail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(
    version,
    about = "MedSplit: submit and follow split-learning jobs, or run the demo"
)]
struct Cli {
    /// Coordinator base URL.
    #[arg(
        long,
        env = "MEDSPLIT_COORDINATOR",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    coordinator: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Log in; the session token is kept in ~/.config/medsplit/session (mode 0600). The
    /// password is read from MEDSPLIT_PASSWORD or standard input.
    Login {
        #[arg(long)]
        email: String,
    },
    /// Submit a job from a JSON or TOML spec file.
    Submit {
        spec: PathBuf,
        /// The label set, replacing the file's: `aami` or `papers`.
        #[arg(long)]
        labels: Option<String>,
        /// The preprocessing, replacing the file's: a preset (`papers`, `inter_patient`) or a
        /// JSON object (`{"preset": "inter_patient", "beat_len": 256}`).
        #[arg(long)]
        preprocessing: Option<String>,
        /// Follow it until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// List jobs.
    Jobs,
    /// Follow a job with a progress display until it ends.
    Watch { job: i64 },
    /// A job's test measurements per round: each hospital's accuracy next to the majority-class
    /// rate, macro-F1, balanced accuracy, the kind of split, and per-class sensitivity, PPV and
    /// F1 (each hospital's and pooled over the round's hospitals).
    Metrics {
        job: i64,
        /// Print the REST response (JSON) instead.
        #[arg(long)]
        json: bool,
    },
    /// A job's privacy report: the ε each hospital is projected to spend and has spent, what
    /// the coordinator saw (message kinds, counts, bytes), what the attack harness recovers
    /// from that at the job's batch size and DP setting, and DP's accuracy cost.
    Privacy {
        job: i64,
        /// Print the REST response (JSON) instead.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job.
    Cancel { job: i64 },
    /// Run the platform on this machine: Postgres, a coordinator and agents as real processes
    /// on loopback, each agent with its own data, training one cyclic HE job.
    Demo(Demo),
}

#[derive(clap::Args)]
struct Demo {
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    #[arg(long, default_value_t = 3)]
    hospitals: usize,
    /// MIT-BIH beat directory (train/test .f32 + .labels + .src.u32), its patients divided
    /// among the hospitals; without it each hospital generates its own synthetic patients.
    #[arg(long, conflicts_with = "records")]
    data: Option<PathBuf>,
    /// Directory of raw MIT-BIH records (.hea/.dat/.atr): each hospital gets whole patients
    /// (every record but the paced ones, dealt in turn), holds a fifth of them out as its test
    /// set, and the job trains the inter-patient configuration (AAMI classes, `inter_patient`
    /// preprocessing, m1_tail; docs/benchmarks.md).
    #[arg(long)]
    records: Option<PathBuf>,
    /// Synthetic beats per hospital (without --data).
    #[arg(long, default_value_t = 4000)]
    samples: usize,
    /// Synthetic patients per hospital (without --data); a fifth of them are its test set.
    #[arg(long, default_value_t = 10)]
    patients: usize,
    /// Beats per batch (default 4, or 32 with --records).
    #[arg(long)]
    batch_size: Option<u32>,
    #[arg(long, default_value_t = 1)]
    local_epochs: u32,
    /// The round-trip time between the agents and the coordinator, in milliseconds (a relay in
    /// this process delays each direction by half of it).
    #[arg(long, default_value_t = 0.0)]
    rtt_ms: f64,
    /// The bandwidth of each agent's link each way, in Mbit/s (default: unlimited).
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// Write the final summary as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the last hospital exports the finished model (a new or empty directory); without it the
    /// export goes into the demo's working directory and is removed with it.
    #[arg(long)]
    export: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(try_main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    let rest =
        || -> anyhow::Result<Rest> { Ok(Rest::new(&cli.coordinator).with_token(read_session()?)) };
    match cli.command {
        Cmd::Login { email } => {
            let password = secret("MEDSPLIT_PASSWORD", "password")?;
            let r = Rest::new(&cli.coordinator).login(&email, &password).await?;
            save_session(r.token.as_deref().unwrap_or_default())?;
            println!("logged in as {email}");
        }
        Cmd::Submit {
            spec,
            labels,
            preprocessing,
            watch,
        } => {
            let overrides = medsplit_tools::spec::Overrides {
                labels,
                preprocessing,
            };
            let body = medsplit_tools::spec::read_with(&spec, &overrides)?;
            let r = rest()?;
            let job = r.call("POST", "/v1/jobs", Some(body)).await?;
            let id = job["id"].as_i64().unwrap_or_default();
            println!("job {id} submitted; waiting for the hospitals' consent");
            if watch {
                follow(&r, id).await?;
            }
        }
        Cmd::Jobs => {
            let jobs = rest()?.call("GET", "/v1/jobs", None).await?;
            println!(
                "{:>5}  {:<10}  {:>7}  {:<8}  name",
                "id", "status", "visits", "model"
            );
            for j in jobs.as_array().into_iter().flatten() {
                println!(
                    "{:>5}  {:<10}  {:>3}/{:<3}  {:<8}  {}",
                    j["id"],
                    j["status"].as_str().unwrap_or(""),
                    j["visits_done"],
                    j["visits_total"],
                    medsplit_tools::spec::model_name(&j["spec"]),
                    j["name"].as_str().unwrap_or("")
                );
            }
        }
        Cmd::Watch { job } => {
            follow(&rest()?, job).await?;
        }
        Cmd::Metrics { job, json } => {
            let m = rest()?
                .call("GET", &format!("/v1/jobs/{job}/metrics"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                for round in m["rounds"].as_array().into_iter().flatten() {
                    print!("{}", report::round(&m, round, Detail::PerHospital));
                }
            }
        }
        Cmd::Privacy { job, json } => {
            let r = rest()?
                .call("GET", &format!("/v1/jobs/{job}/privacy"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", report::privacy(&r));
            }
        }
        Cmd::Cancel { job } => {
            let j = rest()?
                .call("POST", &format!("/v1/jobs/{job}/cancel"), Some(json!({})))
                .await?;
            println!("job {job}: {}", j["status"].as_str().unwrap_or(""));
        }
        Cmd::Demo(args) => demo(args).await?,
    }
    Ok(())
}

fn secret(env: &str, what: &str) -> anyhow::Result<String> {
    if let Ok(v) = std::env::var(env) {
        return Ok(v);
    }
    if std::io::stdin().is_terminal() {
        eprint!("{what}: ");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn session_path() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".config/medsplit/session"))
}

fn save_session(token: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = session_path()?;
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(())
}

fn read_session() -> anyhow::Result<String> {
    let path = session_path()?;
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_string())
        .with_context(|| "not logged in: run `medsplit login --email …` first".to_string())
}

/// Follows a job until it ends: a progress bar over its visits, and the test measurements of
/// each finished round ([`report::round`]). Returns the final metrics.
async fn follow(r: &Rest, id: i64) -> anyhow::Result<Value> {
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(1)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("job {id}"));
    let job = r.call("GET", &format!("/v1/jobs/{id}"), None).await?;
    println!(
        "job {id} {:?}: {}",
        job["name"].as_str().unwrap_or(""),
        medsplit_tools::spec::describe(&job)
    );
    let mut printed_rounds = 0usize;
    let mut last_line = String::new();
    loop {
        let job = r.call("GET", &format!("/v1/jobs/{id}"), None).await?;
        let metrics = r
            .call("GET", &format!("/v1/jobs/{id}/metrics"), None)
            .await?;
        let total = job["visits_total"].as_u64().unwrap_or(1).max(1);
        let done = job["visits_done"].as_u64().unwrap_or(0);
        let current = &job["current"];
        let within = current["progress"].as_f64().unwrap_or(0.0);
        bar.set_length(1000);
        bar.set_position(((done as f64 + within) / total as f64 * 1000.0) as u64);
        let status = job["status"].as_str().unwrap_or("").to_string();
        let line = if current.is_object() {
            format!(
                "{status}: visit {}/{total}, round {} at {} ({:.0} %)",
                done + 1,
                current["round"].as_i64().unwrap_or(0) + 1,
                current["hospital"].as_str().unwrap_or(""),
                100.0 * within
            )
        } else {
            format!("{status}: {done}/{total} visits")
        };
        bar.set_message(line.clone());
        if bar.is_hidden() && line != last_line {
            eprintln!("job {id} {line}");
        }
        last_line = line;
        let rounds = metrics["rounds"].as_array().cloned().unwrap_or_default();
        while printed_rounds < rounds.len() {
            let round = &rounds[printed_rounds];
            let hs = round["hospitals"].as_array().cloned().unwrap_or_default();
            if hs
                .iter()
                .any(|h| !matches!(h["status"].as_str(), Some("completed" | "skipped")))
            {
                break;
            }
            let text = report::round(&metrics, round, Detail::Pooled);
            bar.suspend(|| print!("{text}"));
            printed_rounds += 1;
        }
        if !matches!(status.as_str(), "pending" | "running") {
            bar.finish_and_clear();
            if status != "completed" {
                bail!(
                    "job {id} ended {status}{}",
                    job["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            return Ok(metrics);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The demo

const DEMO_PASSWORD: &str = "demo-password-not-for-production";

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {}: build every binary first (cargo build --release --bins)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

async fn demo(args: Demo) -> anyhow::Result<()> {
    if args.hospitals == 0 || args.hospitals > 20 {
        bail!("--hospitals must be 1 to 20");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let records = match &args.records {
        Some(dir) => demo_records(dir, args.hospitals)?,
        None => Vec::new(),
    };
    let started = Instant::now();
    let coordinator_bin = sibling("medsplit-coordinator")?;
    let agent_bin = sibling("medsplit-agent")?;
    let dir = tempdir()?;
    let _cleanup = RemoveDir(dir.clone());
    eprintln!("demo: working in {}", dir.display());

    let pg = Postgres::start(&dir).await?;
    let db_url = pg.url.clone();

    let key = dir.join("jwt.key");
    local::write_private(&key, new_secret().as_bytes())?;
    let status = Command::new(&coordinator_bin)
        .args(["create-admin", "--email", "admin@demo.example"])
        .env("DATABASE_URL", &db_url)
        .env("MEDSPLIT_ADMIN_PASSWORD", DEMO_PASSWORD)
        .stdout(Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("creating the demo admin failed");
    }
    let mut coordinator = Command::new(&coordinator_bin);
    coordinator
        .args(["serve", "--listen", "127.0.0.1:0", "--jwt-key-file"])
        .arg(&key)
        .env("DATABASE_URL", &db_url)
        .env("MEDSPLIT_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("coordinator.log"))?)
        .kill_on_drop(true);
    let mut child = coordinator.spawn().context("starting the coordinator")?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("the coordinator did not start in 60 s (see coordinator.log)")??
        .context("the coordinator exited (see coordinator.log)")?;
    let url = line.rsplit(' ').next().unwrap_or_default().to_string();
    let _coordinator = Proc(child);
    eprintln!("demo: coordinator at {url}");
    // The agents reach the coordinator over the emulated link, if one is set.
    let link = medsplit_tools::relay::Link::new(args.rtt_ms, args.bandwidth_mbps)?;
    let (_relay, agent_url) = medsplit_tools::relay::in_front_of(url.clone(), link).await?;
    if !link.is_loopback() {
        eprintln!(
            "demo: agents reach the coordinator over {} at {agent_url}",
            link.describe()
        );
    }

    let admin = Rest::new(&url)
        .login("admin@demo.example", DEMO_PASSWORD)
        .await?;
    let mut names = Vec::new();
    let mut agents = Vec::new();
    let mut hospital_admins = Vec::new();
    for i in 0..args.hospitals {
        let name = format!("hospital-{}", i + 1);
        let ha = local::hospital_with_admin(&admin, &name, DEMO_PASSWORD).await?;
        let token = local::enrolment_token(&ha).await?;
        let state_dir = dir.join(format!("agent-{}", i + 1));
        let out = Command::new(&agent_bin)
            .args([
                "enrol",
                "--coordinator",
                &agent_url,
                "--name",
                &format!("agent-{}", i + 1),
            ])
            .arg("--state-dir")
            .arg(&state_dir)
            .env("MEDSPLIT_ENROL_TOKEN", &token)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "agent enrolment failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let config = dir.join(format!("agent-{}.toml", i + 1));
        std::fs::write(&config, agent_config(&args, i, &state_dir, &records))?;
        let log = std::fs::File::create(dir.join(format!("agent-{}.log", i + 1)))?;
        let child = Command::new(&agent_bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("MEDSPLIT_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting an agent")?;
        agents.push(Proc(child));
        hospital_admins.push(ha);
        names.push(name);
    }
    eprintln!("demo: {} agents enrolled and running", agents.len());

    let researcher = local::create_user(
        &admin,
        "researcher@demo.example",
        DEMO_PASSWORD,
        "researcher",
        None,
    )
    .await?;
    let mut spec = json!({
        "name": "demo: cyclic split learning with HE",
        "hospitals": names,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "batch_size": args.batch_size.unwrap_or(if args.records.is_some() { 32 } else { 4 }),
        "seed": 0,
    });
    if args.records.is_some() {
        // The configuration chosen by patient-wise cross-validation inside DS1.
        spec["labels"] = json!("aami");
        spec["preprocessing"] = json!("inter_patient");
        spec["model"] = json!("m1_tail");
        spec["class_weights"] = json!({ "fixed": [1, 8, 3, 1, 1] });
    }
    let job = researcher.call("POST", "/v1/jobs", Some(spec)).await?;
    let id = job["id"].as_i64().unwrap_or_default();
    // Each hospital approves the job twice: at its agent, which trains only jobs approved on its
    // own host (recording the job's digest), and on the dashboard.
    for i in 0..names.len() {
        let out = Command::new(&agent_bin)
            .args(["approve", &id.to_string(), "--yes", "--config"])
            .arg(dir.join(format!("agent-{}.toml", i + 1)))
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "approving job {id} at agent-{}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for ha in &hospital_admins {
        ha.call(
            "POST",
            &format!("/v1/jobs/{id}/consent"),
            Some(json!({ "decision": "approve" })),
        )
        .await?;
    }
    eprintln!(
        "demo: job {id} approved by {} hospitals, at their agents and on the dashboard: {} rounds, HE on",
        names.len(),
        args.rounds
    );
    let metrics = follow(&researcher, id).await?;
    let seconds = started.elapsed().as_secs_f64();

    // What a hospital does with the finished model: export it, then measure it on its own
    // held-out patients, as its admin would. The last hospital of the round trained the final
    // model last, so its figure in the last round is the exported model's, through HE.
    let exporter = names.last().expect("at least one hospital").clone();
    let model_dir = args.export.clone().unwrap_or_else(|| dir.join("model"));
    let config = dir.join(format!("agent-{}.toml", names.len()));
    let out = Command::new(&agent_bin)
        .args(["export", "--job", &id.to_string(), "--out"])
        .arg(&model_dir)
        .arg("--config")
        .arg(&config)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "exporting the model at {exporter} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "demo: {exporter} exported the model: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let out = Command::new(&agent_bin)
        .arg("evaluate")
        .arg("--model")
        .arg(&model_dir)
        .arg("--config")
        .arg(&config)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "evaluating the exported model at {exporter} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let evaluation = String::from_utf8_lossy(&out.stdout).into_owned();
    println!(
        "\n{exporter} evaluates the exported model on its held-out patients \
         (`medsplit-agent evaluate --model DIR --config agent.toml`):\n{evaluation}"
    );

    let mut rounds = Vec::new();
    for r in metrics["rounds"].as_array().into_iter().flatten() {
        let mut accuracy = serde_json::Map::new();
        let mut majority = serde_json::Map::new();
        for h in r["hospitals"].as_array().into_iter().flatten() {
            let name = h["hospital"].as_str().unwrap_or("").to_string();
            accuracy.insert(name.clone(), h["test_accuracy"].clone());
            majority.insert(name, h["test_majority_rate"].clone());
        }
        rounds.push(json!({
            "round": r["round"].as_i64().unwrap_or(0) + 1,
            "test_accuracy": accuracy,
            "test_majority_rate": majority,
            "mean_test_accuracy": r["mean_test_accuracy"],
            "pooled_test": r["pooled_test_evaluation"],
        }));
    }
    let visits = metrics["visits"].as_array().cloned().unwrap_or_default();
    let sum = |k: &str| visits.iter().filter_map(|v| v[k].as_f64()).sum::<f64>();
    let summary = json!({
        "job_id": id,
        "status": "completed",
        "hospitals": names,
        "rounds": rounds,
        "he": true,
        "visits": visits.len(),
        "bytes_up": sum("bytes_up"),
        "bytes_down": sum("bytes_down"),
        "server_seconds": sum("server_seconds"),
        "data": match (&args.records, &args.data) {
            (Some(r), _) => format!("raw records in {}: {}", r.display(), records.iter().map(|h| h.join(" ")).collect::<Vec<_>>().join(" | ")),
            (None, Some(d)) => d.display().to_string(),
            (None, None) => format!("synthetic, {} patients and {} beats per hospital", args.patients, args.samples),
        },
        "seconds": seconds,
        "export": {
            "hospital": exporter,
            "dir": args.export.as_ref().map(|d| d.display().to_string()),
            "evaluation": evaluation,
        },
    });
    println!(
        "demo finished in {seconds:.1} s: {} visits, {:.1} MB encrypted traffic",
        visits.len(),
        (sum("bytes_up") + sum("bytes_down")) / 1e6
    );
    if let Some(d) = &args.export {
        println!("the exported model stays in {}", d.display());
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| path.display().to_string())?;
        println!("summary written to {}", path.display());
    }
    drop(agents);
    drop(pg);
    Ok(())
}

/// The records in `dir` (every `.hea` with its `.atr`, the paced records 102, 104, 107 and 217
/// left out), dealt in turn to `hospitals` hospitals, each hospital's printed.
fn demo_records(dir: &Path, hospitals: usize) -> anyhow::Result<Vec<Vec<String>>> {
    const PACED: [&str; 4] = ["102", "104", "107", "217"];
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".hea")?.to_owned();
            dir.join(format!("{stem}.atr")).is_file().then_some(stem)
        })
        .filter(|n| !PACED.contains(&n.as_str()))
        .collect();
    names.sort();
    // Two patients at least per hospital: one to train on, one to test on.
    if names.len() < 2 * hospitals {
        bail!(
            "{} holds {} usable records (.hea with .atr, paced records left out); {hospitals} hospitals need at least {}",
            dir.display(),
            names.len(),
            2 * hospitals
        );
    }
    let mut dealt = vec![Vec::new(); hospitals];
    for (i, name) in names.into_iter().enumerate() {
        dealt[i % hospitals].push(name);
    }
    for (i, records) in dealt.iter().enumerate() {
        eprintln!(
            "demo: hospital-{} holds records {}",
            i + 1,
            records.join(" ")
        );
    }
    Ok(dealt)
}

fn agent_config(args: &Demo, i: usize, state_dir: &Path, records: &[Vec<String>]) -> String {
    if let Some(dir) = &args.records {
        let list: Vec<String> = records[i].iter().map(|r| format!("{r:?}")).collect();
        return format!(
            "state_dir = {:?}

[[sources]]
format = \"wfdb\"
path = {:?}
records = [{}]

[split]
test_fraction = 0.2
seed = {i}
",
            state_dir.display().to_string(),
            dir.display().to_string(),
            list.join(", ")
        );
    }
    let source = match &args.data {
        Some(d) => format!(
            "[[sources]]\nformat = \"beats\"\npath = {:?}\nfiles = [\"train\", \"test\"]\n\n[shard]\nindex = {i}\ncount = {}\n",
            d.display().to_string(),
            args.hospitals
        ),
        None => format!(
            "[[sources]]\nformat = \"synthetic\"\npatients = {}\nbeats = {}\nseed = {}\n",
            args.patients,
            args.samples,
            1000 + i
        ),
    };
    format!(
        "state_dir = {:?}\n\n{source}\n[split]\ntest_fraction = 0.2\nseed = {i}\n",
        state_dir.display().to_string()
    )
}

fn new_secret() -> String {
    medsplit_coordinator::auth::new_secret()
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("medsplit-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
