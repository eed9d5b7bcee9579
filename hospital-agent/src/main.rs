//! `medsplit-agent`: enrol once with a one-time token, then run as a daemon; classify and
//! evaluate with an exported model.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use medsplit_agent::client::{Coordinator, Endpoint};
use medsplit_agent::config::{Config, Survey};
use medsplit_agent::daemon::Datasets;
use medsplit_agent::state;

#[derive(Parser)]
#[command(version, about = "MedSplit hospital agent")]
struct Cli {
    /// Log format: `text`, or `json` for log collectors.
    #[arg(
        long,
        env = "MEDSPLIT_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Redeem a one-time enrolment token: checks that the state directory can be written,
    /// then writes the identity key and credential there (mode 0600).
    Enrol {
        #[arg(long)]
        coordinator: String,
        /// The token as shown once by the dashboard (base64url: it may begin with `-`).
        #[arg(
            long,
            env = "MEDSPLIT_ENROL_TOKEN",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        token: String,
        #[arg(
            long,
            env = "MEDSPLIT_STATE_DIR",
            default_value = "/var/lib/medsplit-agent"
        )]
        state_dir: PathBuf,
        /// Name shown to the hospital's admins.
        #[arg(long, default_value = "agent")]
        name: String,
        /// PEM file of a private CA that signed the coordinator's certificate.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
    },
    /// Run the daemon: claim visits for this hospital and train them.
    Run {
        #[arg(
            long,
            env = "MEDSPLIT_AGENT_CONFIG",
            default_value = "/etc/medsplit/agent.toml"
        )]
        config: PathBuf,
    },
    /// Classify every beat of the inputs with an exported model (--model), or through private
    /// inference on a finished job's model (--job): one line per beat (record, beat, R-peak
    /// sample, class, probability of each class).
    Predict {
        #[command(flatten)]
        inputs: medsplit_agent::predict::InputArgs,
        /// Classify through the coordinator: the job's final client layers run here, its server
        /// layer on the coordinator, applied to encrypted activations. Uses the agent's identity
        /// from the state directory of --config (default: $MEDSPLIT_AGENT_CONFIG, else
        /// /etc/medsplit/agent.toml); the daemon may be running meanwhile.
        #[arg(long, conflicts_with = "model")]
        job: Option<i64>,
        /// `csv`, or `json` (one JSON object per line).
        #[arg(long, value_enum, default_value = "csv")]
        format: medsplit_agent::predict::Format,
        /// Write here instead of to standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Approve a job at this agent, as the hospital's admin: shows the job as the coordinator
    /// describes it and, on yes, records its digest in the state directory. The daemon trains
    /// only approved jobs, and refuses one whose specification changed after its approval.
    /// Without JOB: lists the approved jobs.
    Approve {
        job: Option<i64>,
        /// Approve without asking (for scripts that have shown the job otherwise).
        #[arg(long)]
        yes: bool,
        /// Withdraw the approval of JOB: its later visits are refused.
        #[arg(long, conflicts_with = "yes")]
        withdraw: bool,
        #[arg(
            long,
            env = "MEDSPLIT_AGENT_CONFIG",
            default_value = "/etc/medsplit/agent.toml"
        )]
        config: PathBuf,
    },
    /// Print this agent's key fingerprint and those of the peer agents it has pinned, for the
    /// hospitals to compare out of band (a key that changes is refused).
    Keys {
        /// The agent's configuration (its state directory).
        #[arg(long, default_value = "/etc/medsplit/agent.toml")]
        config: PathBuf,
    },
    /// Export a finished job's whole model, when the job's release policy lets this hospital
    /// take it: the ONNX graph, the weights (safetensors) and the model card, into a new
    /// directory. The coordinator records the export.
    Export {
        #[arg(long)]
        job: i64,
        /// A directory that does not exist yet, or is empty.
        #[arg(long)]
        out: PathBuf,
        /// The agent's configuration (its state directory and coordinator).
        #[arg(
            long,
            env = "MEDSPLIT_AGENT_CONFIG",
            default_value = "/etc/medsplit/agent.toml"
        )]
        config: PathBuf,
    },
    /// Measure an exported model on labelled inputs: per-class sensitivity, PPV and F1, the
    /// confusion matrix, accuracy next to the majority-class rate.
    Evaluate {
        #[command(flatten)]
        inputs: medsplit_agent::predict::InputArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    // One thread: the agent trains one visit at a time, and its session's socket, wake-ups and
    // computation stay on the same CPU (see `visit::REPLY_SPIN`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(try_main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: not in files, pipes or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enrol {
            coordinator,
            token,
            state_dir,
            name,
            ca_cert,
        } => {
            let endpoint = Endpoint::new(&coordinator, ca_cert.as_deref())?;
            let enrolled = medsplit_agent::enrol(&endpoint, &token, &name, &state_dir).await?;
            println!(
                "enrolled as agent {} of hospital {}; state in {}\n\
                 next: write the agent's configuration (state_dir = {:?} and its [[sources]]; \
                 see docs/operations.md) and start it with \
                 `medsplit-agent run --config /etc/medsplit/agent.toml`",
                enrolled.agent_id,
                enrolled.hospital_id,
                state_dir.display(),
                state_dir.display().to_string(),
            );
            Ok(())
        }
        Command::Run { config } => {
            let (config, state, coordinator) = connect(&config)?;
            let survey = config.survey()?;
            report(&survey);
            // The coordinator projects each job's ε from these counts; a failure is not fatal.
            if let Err(e) = coordinator
                .report_data(survey.split.train_beats, survey.split.test_beats)
                .await
            {
                tracing::warn!(error = %e, "the data's size was not reported to the coordinator");
            }
            tracing::info!(
                agent = state.identity.agent_id,
                coordinator = %state.identity.coordinator,
                "agent starting; each job's data is cut with its preprocessing and label set on its first visit"
            );
            let coordinator = Arc::new(coordinator);
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                stop_tx.send_replace(true);
            });
            let datasets = Arc::new(Datasets::new(config)?);
            medsplit_agent::daemon::run(coordinator, Arc::new(state), datasets, stop_rx).await?;
            Ok(())
        }
        Command::Predict {
            inputs,
            format,
            out,
            job: Some(job),
        } => {
            let config = inputs.config.clone().unwrap_or_else(|| {
                std::env::var_os("MEDSPLIT_AGENT_CONFIG")
                    .map_or_else(|| PathBuf::from("/etc/medsplit/agent.toml"), PathBuf::from)
            });
            let (_, state, coordinator) = connect(&config)?;
            medsplit_agent::inference::predict(
                &coordinator,
                &state.secret_key,
                job,
                &inputs,
                format,
                out.as_deref(),
            )
            .await
        }
        Command::Predict {
            inputs,
            format,
            out,
            job: None,
        } => medsplit_agent::predict::predict(&inputs, format, out.as_deref()),
        Command::Export { job, out, config } => {
            let (_, state, coordinator) = connect(&config)?;
            let card =
                medsplit_agent::release::export(&coordinator, &state.secret_key, job, &out).await?;
            println!(
                "exported job {job} ({}) into {}: {}; model card in model-card.md",
                card.job_name,
                out.display(),
                card.files
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Approve {
            job,
            yes,
            withdraw,
            config,
        } => approve(job, yes, withdraw, &config).await,
        Command::Keys { config } => {
            let config = Config::load(&config)?;
            let state = state::load(&config.state_dir)?;
            let own = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                state.secret_key.public_key().as_bytes(),
            );
            println!(
                "this agent   {:>6}  {}",
                state.identity.agent_id,
                medsplit_agent::peers::fingerprint(&own)
            );
            let peers = medsplit_agent::peers::PeerKeys::in_state_dir(&config.state_dir)?;
            let pinned = peers.pinned();
            if pinned.is_empty() {
                println!(
                    "no peer keys pinned yet (they are pinned at the first visit that names them)"
                );
            }
            for (agent, key) in pinned {
                println!(
                    "peer agent   {agent:>6}  {}",
                    medsplit_agent::peers::fingerprint(&key)
                );
            }
            Ok(())
        }
        Command::Evaluate { inputs } => {
            print!("{}", medsplit_agent::predict::evaluate(&inputs)?);
            Ok(())
        }
    }
}

/// `medsplit-agent approve`: list, approve or withdraw.
async fn approve(
    job: Option<i64>,
    yes: bool,
    withdraw: bool,
    config: &std::path::Path,
) -> anyhow::Result<()> {
    use medsplit_agent::approvals::Approvals;
    let config = Config::load(config)?;
    let approvals = Approvals::in_state_dir(&config.state_dir);
    let Some(job) = job else {
        if withdraw {
            anyhow::bail!("--withdraw needs the job's id");
        }
        let approved = approvals.list()?;
        if approved.is_empty() {
            println!("no job approved at this agent yet (medsplit-agent approve JOB)");
        }
        for (id, a) in approved {
            println!(
                "job {id:>6}  {}  approved {}  {} ({})",
                &a.digest[..16.min(a.digest.len())],
                a.approved_at,
                a.name,
                a.owner
            );
        }
        return Ok(());
    };
    if withdraw {
        if approvals.withdraw(job)? {
            println!("approval of job {job} withdrawn: its later visits are refused");
        } else {
            println!("job {job} was not approved at this agent");
        }
        return Ok(());
    }
    let (_, _, coordinator) = connect_at(&config)?;
    let described = coordinator.job(job).await?;
    println!("{}", described.describe());
    if !yes {
        use std::io::{BufRead, Write};
        print!("approve this job at this hospital? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("not approved");
            return Ok(());
        }
    }
    let approval = approvals.approve(&described)?;
    println!(
        "job {job} approved at this agent (digest {}); its visits are trained once the \
         hospital's consent is also given on the dashboard",
        approval.digest
    );
    Ok(())
}

/// The agent's configuration, its state (identity key, credential) and its coordinator.
fn connect(path: &std::path::Path) -> anyhow::Result<(Config, state::AgentState, Coordinator)> {
    connect_at(&Config::load(path)?)
}

fn connect_at(config: &Config) -> anyhow::Result<(Config, state::AgentState, Coordinator)> {
    let config = config.clone();
    let state = state::load(&config.state_dir)?;
    let endpoint = Endpoint::new(&state.identity.coordinator, config.ca_cert.as_deref())?;
    let coordinator = Coordinator::new(endpoint, state.identity.credential.clone());
    Ok((config, state, coordinator))
}

/// Logs what the agent holds before it connects: each source's beats, patients and classes,
/// then the held-out split.
fn report(survey: &Survey) {
    for s in &survey.sources {
        let classes: Vec<String> = s
            .class_counts
            .iter()
            .map(|(name, count)| format!("{name} {count}"))
            .collect();
        tracing::info!(
            source = %s.source,
            beats = s.beats,
            patients = s.patients,
            classes = %classes.join(", "),
            preprocessing = %s.preprocessing,
            labels = %s.labels,
            "data source"
        );
        if let Some(reason) = &s.unsupported {
            tracing::warn!(source = %s.source, "{reason}");
        }
    }
    let split = &survey.split;
    tracing::info!(
        kind = %split.kind,
        train_beats = split.train_beats,
        test_beats = split.test_beats,
        train_patients = split.train_patients,
        test_patients = %split.test_patients.join(", "),
        "held-out test set: {}",
        split.kind.describe()
    );
}
