//! `medsplit-bench`: the paper's Table 1 — seconds per epoch, test accuracy and traffic of
//! `local`, `split` and `split-he` training, each from the same seed, data order and optimisers.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use medsplit_engine::data::{self, Dataset};
use medsplit_engine::model::{ModelConfig, ServerOptimizer};
use medsplit_engine::protocol::{InProcess, LocalModel, Privacy, Trainer};
use medsplit_engine::training::{epoch_order, evaluate, train_epoch};
use medsplit_engine::wfdb::CLASS_SYMBOLS;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark local, split and split-HE training (the paper's Table 1)"
)]
struct Args {
    /// Directory of the beat format (train.f32/train.labels/test.f32/test.labels); synthetic
    /// beats when absent.
    #[arg(long, env = "MEDSPLIT_DATA")]
    data: Option<PathBuf>,
    /// Synthetic training and test beats when no --data is given.
    #[arg(long, default_value_t = 4000)]
    synthetic_train: usize,
    #[arg(long, default_value_t = 2000)]
    synthetic_test: usize,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Comma-separated: local, split, split-he.
    #[arg(long, default_value = "local,split,split-he", value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Seed of the initial weights and of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Optimiser of the server layer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adam)]
    server_optimizer: OptimizerKind,
    #[arg(long, default_value_t = 1e-3)]
    server_lr: f64,
    /// Use the 512-wide cut layer (16 channels in the second block) instead of M1's 256.
    #[arg(long)]
    wide: bool,
    /// Worker threads of the tensor backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// `in-process`: both halves in this process, exchanging serialized messages.
    /// `websocket`: through a real coordinator (Postgres from DATABASE_URL or a private
    /// cluster) and an agent on loopback.
    #[arg(long, value_enum, default_value_t = Transport::InProcess)]
    transport: Transport,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Transport {
    InProcess,
    Websocket,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Mode {
    Local,
    Split,
    SplitHe,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Split => "split",
            Mode::SplitHe => "split-he",
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OptimizerKind {
    Adam,
    Sgd,
}

#[derive(Serialize)]
struct Report {
    dataset: String,
    train_samples: usize,
    test_samples: usize,
    threads: usize,
    results: Vec<ModeResult>,
}

#[derive(Serialize)]
struct ModeResult {
    mode: String,
    transport: String,
    batch_size: usize,
    epochs: usize,
    seconds_per_epoch: f64,
    test_accuracy: f64,
    bytes_client_to_server_per_epoch: u64,
    bytes_server_to_client_per_epoch: u64,
    epoch_seconds: Vec<f64>,
    final_train_loss: f64,
}

fn main() {
    if let Err(error) = try_main(Args::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn try_main(args: Args) -> anyhow::Result<()> {
    if args.epochs == 0 || args.batch_size == 0 {
        bail!("--epochs and --batch-size must be at least 1");
    }
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("configuring worker threads")?;
    }
    let config = if args.wide {
        ModelConfig::m1_wide()
    } else {
        ModelConfig::m1()
    };
    let (name, train, test) = load(&args, &config)?;
    let optimizer = match args.server_optimizer {
        OptimizerKind::Adam => ServerOptimizer::Adam { lr: args.server_lr },
        OptimizerKind::Sgd => ServerOptimizer::Sgd { lr: args.server_lr },
    };
    eprintln!(
        "{name}: {} train / {} test beats, batch {}, {} epochs, seed {}",
        train.len(),
        test.len(),
        args.batch_size,
        args.epochs,
        args.seed
    );
    let mut results = Vec::new();
    for &mode in &args.modes {
        if args.transport == Transport::Websocket {
            // The coordinator on its own multi-threaded runtime, the agent on this thread, as
            // two processes would run.
            let coordinator = tokio::runtime::Runtime::new()?;
            let agent = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            results.push(agent.block_on(websocket::run(
                mode,
                &train,
                &test,
                &args,
                optimizer,
                coordinator.handle(),
            ))?);
            continue;
        }
        let mut trainer: Box<dyn Trainer> = match mode {
            Mode::Local => Box::new(LocalModel::new(&config, optimizer, args.seed)?),
            Mode::Split => Box::new(InProcess::new(
                &config,
                Privacy::Plaintext,
                optimizer,
                args.seed,
            )?),
            Mode::SplitHe => Box::new(InProcess::new(
                &config,
                Privacy::Encrypted,
                optimizer,
                args.seed,
            )?),
        };
        results.push(run_mode(mode, trainer.as_mut(), &train, &test, &args)?);
    }
    print_table(&results);
    if let Some(path) = &args.json {
        let report = Report {
            dataset: name,
            train_samples: train.len(),
            test_samples: test.len(),
            threads: rayon::current_num_threads(),
            results,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn load(args: &Args, config: &ModelConfig) -> anyhow::Result<(String, Dataset, Dataset)> {
    match &args.data {
        Some(dir) => {
            let train = data::load_beats(dir, "train", config.beat_len, config.classes)?;
            let test = data::load_beats(dir, "test", config.beat_len, config.classes)?;
            let name = dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            Ok((name, train, test))
        }
        None => Ok((
            "synthetic".into(),
            data::synthetic(args.synthetic_train, args.seed.wrapping_add(1)),
            data::synthetic(args.synthetic_test, args.seed.wrapping_add(2)),
        )),
    }
}

fn run_mode(
    mode: Mode,
    trainer: &mut dyn Trainer,
    train: &Dataset,
    test: &Dataset,
    args: &Args,
) -> anyhow::Result<ModeResult> {
    let terminal = std::io::stderr().is_terminal();
    let mut epoch_seconds = Vec::new();
    let mut final_loss = f64::NAN;
    for epoch in 0..args.epochs {
        let order = epoch_order(train.len(), args.seed, epoch);
        let before = trainer.traffic();
        let mut last_shown = 0;
        let mut progress = |done: usize, total: usize| {
            let percent = done * 100 / total.max(1);
            if terminal && percent != last_shown {
                last_shown = percent;
                eprint!(
                    "\r{:>8} epoch {}/{}: {percent:>3}%",
                    mode.name(),
                    epoch + 1,
                    args.epochs
                );
            }
        };
        let started = Instant::now();
        let totals = train_epoch(trainer, train, &order, args.batch_size, &mut progress)
            .with_context(|| format!("{} epoch {}", mode.name(), epoch + 1))?;
        let seconds = started.elapsed().as_secs_f64();
        let after = trainer.traffic();
        epoch_seconds.push(seconds);
        final_loss = totals.mean_loss();
        eprintln!(
            "{}{:>8} epoch {}/{}: loss {:.4}, train accuracy {:.2}%, {:.2} s, {:.1} MB up, {:.1} MB down",
            if terminal { "\r" } else { "" },
            mode.name(),
            epoch + 1,
            args.epochs,
            final_loss,
            100.0 * totals.accuracy(),
            seconds,
            (after.client_to_server - before.client_to_server) as f64 / 1e6,
            (after.server_to_client - before.server_to_client) as f64 / 1e6,
        );
    }
    let traffic_before_eval = trainer.traffic();
    let accuracy = evaluate(trainer, test, 64, &CLASS_SYMBOLS)
        .with_context(|| format!("{} evaluation", mode.name()))?
        .accuracy();
    eprintln!("{:>8} test accuracy {:.2}%", mode.name(), 100.0 * accuracy);
    let epochs = args.epochs as u64;
    Ok(ModeResult {
        mode: mode.name().into(),
        transport: "in-process".into(),
        batch_size: args.batch_size,
        epochs: args.epochs,
        seconds_per_epoch: median(&epoch_seconds),
        test_accuracy: accuracy,
        bytes_client_to_server_per_epoch: traffic_before_eval.client_to_server / epochs,
        bytes_server_to_client_per_epoch: traffic_before_eval.server_to_client / epochs,
        epoch_seconds,
        final_train_loss: final_loss,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn print_table(results: &[ModeResult]) {
    println!(
        "| mode | batch | epochs | s/epoch (median) | test accuracy | MB/epoch up | MB/epoch down |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | {} | {} | {:.2} | {:.2}% | {:.1} | {:.1} |",
            r.mode,
            r.batch_size,
            r.epochs,
            r.seconds_per_epoch,
            100.0 * r.test_accuracy,
            r.bytes_client_to_server_per_epoch as f64 / 1e6,
            r.bytes_server_to_client_per_epoch as f64 / 1e6,
        );
    }
}

/// The same training through a real coordinator and agent on loopback.
mod websocket {
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::{Context, bail};
    use medsplit_agent::config::LocalData;
    use medsplit_agent::visit::{self, Observer};
    use medsplit_coordinator::{AppState, Settings, auth};
    use medsplit_engine::data::Dataset;
    use medsplit_engine::model::ServerOptimizer;
    use medsplit_engine::training::Totals;
    use medsplit_tools::local::{self, Postgres, Rest};
    use serde_json::json;

    use super::{Args, Mode, ModeResult, median};

    const PASSWORD: &str = "bench-password-not-for-production";

    /// A coordinator on loopback over `db_url`, with the bench's admin; its base URL.
    async fn start_coordinator(
        db_url: String,
    ) -> anyhow::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
        let db = medsplit_coordinator::connect(&db_url).await?;
        medsplit_coordinator::create_admin(&db, "bench@medsplit.local", PASSWORD).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = AppState::new(
            db,
            auth::Keys::from_secret(auth::new_secret().as_bytes()),
            Settings {
                public_url: url.clone(),
                ..Settings::default()
            },
        );
        medsplit_coordinator::spawn_background(&state);
        let app = medsplit_coordinator::create_app(state);
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((url, server))
    }

    struct Progress {
        mode: &'static str,
        final_loss: f64,
    }

    impl Observer for Progress {
        fn epoch_done(&mut self, epoch: u32, seconds: f64, totals: &Totals) {
            self.final_loss = totals.mean_loss();
            eprintln!(
                "{:>8} epoch {epoch} (websocket): loss {:.4}, train accuracy {:.2}%, {seconds:.2} s",
                self.mode,
                totals.mean_loss(),
                100.0 * totals.accuracy()
            );
        }
    }

    pub async fn run(
        mode: Mode,
        train: &Dataset,
        test: &Dataset,
        args: &Args,
        optimizer: ServerOptimizer,
        coordinator_runtime: &tokio::runtime::Handle,
    ) -> anyhow::Result<ModeResult> {
        if mode == Mode::Local {
            bail!(
                "--transport websocket needs a split mode (split, split-he): local training has no network"
            );
        }
        let dir = std::env::temp_dir().join(format!("medsplit-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pg = Postgres::start(&dir).await?;
        let (url, server) = coordinator_runtime
            .spawn(start_coordinator(pg.url.clone()))
            .await??;
        let admin = Rest::new(&url)
            .login("bench@medsplit.local", PASSWORD)
            .await?;
        let hospital_admin = local::hospital_with_admin(&admin, "bench", PASSWORD).await?;
        let researcher = local::create_user(
            &admin,
            "researcher@bench.local",
            PASSWORD,
            "researcher",
            None,
        )
        .await?;
        let (coordinator, key) = local::enrol_in_process(&url, &hospital_admin, "bench").await?;
        let job = researcher
            .call(
                "POST",
                "/v1/jobs",
                Some(json!({
                    "name": format!("bench {}", mode.name()),
                    "model": if args.wide { "m1_wide" } else { "m1" },
                    "hospitals": ["bench"],
                    "rounds": 1,
                    "local_epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "seed": args.seed,
                    "server_optimizer": optimizer,
                    "insecure_plaintext": mode == Mode::Split,
                })),
            )
            .await?;
        let id = job["id"].as_i64().unwrap_or_default();
        hospital_admin
            .call(
                "POST",
                &format!("/v1/jobs/{id}/consent"),
                Some(json!({ "decision": "approve" })),
            )
            .await?;
        let assignment = coordinator
            .claim(Duration::from_secs(10))
            .await?
            .context("the coordinator offered no visit")?;
        let data = LocalData {
            train: train.clone(),
            test: test.clone(),
        };
        let mut progress = Progress {
            mode: mode.name(),
            final_loss: f64::NAN,
        };
        // Keep the lease while training, as the agent daemon does.
        let coordinator = Arc::new(coordinator);
        let beat = coordinator.keep_lease((assignment.visit_id, assignment.attempt));
        let summary = visit::run(&coordinator, &key, &assignment, &data, &mut progress).await;
        beat.abort();
        let summary = summary?;
        let accuracy = summary.test_accuracy.context("no test accuracy measured")?;
        let metrics = researcher
            .call("GET", &format!("/v1/jobs/{id}/metrics"), None)
            .await?;
        let visit = &metrics["visits"][0];
        eprintln!(
            "{:>8} coordinator: {:.2} s computing over {} messages in a {:.2} s visit",
            mode.name(),
            visit["server_seconds"].as_f64().unwrap_or(0.0),
            visit["messages"].as_i64().unwrap_or(0),
            visit["wall_seconds"].as_f64().unwrap_or(0.0)
        );
        eprintln!(
            "{:>8} test accuracy {:.2}% (websocket)",
            mode.name(),
            100.0 * accuracy
        );
        server.abort();
        drop(pg);
        let _ = std::fs::remove_dir_all(&dir);
        let epochs = args.epochs as u64;
        Ok(ModeResult {
            mode: mode.name().into(),
            transport: "websocket".into(),
            batch_size: args.batch_size,
            epochs: args.epochs,
            seconds_per_epoch: median(&summary.epoch_seconds),
            test_accuracy: accuracy,
            bytes_client_to_server_per_epoch: summary.train_bytes_up / epochs,
            bytes_server_to_client_per_epoch: summary.train_bytes_down / epochs,
            epoch_seconds: summary.epoch_seconds,
            final_train_loss: progress.final_loss,
        })
    }
}
