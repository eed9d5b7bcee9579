//! `medsplit-bench`: local, split, split-HE and cyclic split-HE training from the same seed, data
//! order and optimisers, with the clinical metrics of each on a held-out test set.
//!
//! Two benchmarks:
//! - the papers' Table 1 (`--data DIR`): their pre-cut beat set, a random split of beats, so
//!   the same patients are on both sides (the figures say so: `"evaluation": "beat"`);
//! - the inter-patient benchmark of the ECG literature (`--records DIR`, raw MIT-BIH records):
//!   train on DS1's 22 patients, test once on DS2's 22 other patients, AAMI classes
//!   (`--split inter-patient`); or choose a configuration by patient-wise cross-validation
//!   inside DS1 without looking at DS2 (`--split ds1-cv --folds K`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use medsplit_engine::api::{ClassWeights, DpSpec, JobSpec, ModelName, ModelSpec};
use medsplit_engine::data::{self, Dataset};
use medsplit_engine::dp;
use medsplit_engine::dpsgd::{DpSgd, PoissonBatches};
use medsplit_engine::export::{CardEvaluation, ModelCard, TrainedModel};
use medsplit_engine::metrics::{Confusion, EvalKind};
use medsplit_engine::model::{ModelConfig, Objective, ServerOptimizer};
use medsplit_engine::preprocess::{LabelSet, Preprocessing};
use medsplit_engine::protocol::{
    ClientSession, InProcess, LocalModel, Privacy, ServerSession, Trainer,
};
use medsplit_engine::training::{
    SampleStream, epoch_order, evaluate, train_epoch, train_private_steps,
};
use medsplit_engine::wfdb::{self, DS1, DS2};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark local, split, split-HE and cyclic split-HE training with clinical metrics"
)]
struct Args {
    /// Directory of the papers' beat format (train/test .f32 + .labels): Table 1, a beat-wise
    /// split.
    #[arg(long, env = "MEDSPLIT_DATA", conflicts_with = "records")]
    data: Option<PathBuf>,
    /// Directory of the raw MIT-BIH records (.hea/.dat/.atr): the inter-patient benchmark.
    #[arg(long)]
    records: Option<PathBuf>,
    /// With --records: `inter-patient` trains on DS1 and tests on DS2; `ds1-cv` cross-validates
    /// by patient inside DS1 (for choosing a configuration; DS2 is never read).
    #[arg(long, value_enum, default_value_t = SplitKind::InterPatient)]
    split: SplitKind,
    /// Folds of --split ds1-cv (patients dealt to folds by their count of S beats).
    #[arg(long, default_value_t = 3)]
    folds: usize,
    /// Synthetic training and test beats when neither --data nor --records is given.
    #[arg(long, default_value_t = 4000)]
    synthetic_train: usize,
    #[arg(long, default_value_t = 2000)]
    synthetic_test: usize,
    /// Passes over the training set (cyclic-he: rounds, each visit one pass over that
    /// hospital's patients, unless --rounds is given).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// cyclic-he: rounds over the hospitals (default: --epochs).
    #[arg(long)]
    rounds: Option<usize>,
    /// cyclic-he: hospitals DS1's patients are divided among (by patient).
    #[arg(long, default_value_t = 3)]
    hospitals: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Training batches in flight in the split modes (the job spec's `batches_in_flight`): the
    /// client sends later batches' forward messages before earlier ones' replies arrive.
    /// Comma-separated: every mode is run at each (default: a new job's default, 1 with DP).
    #[arg(long, value_delimiter = ',')]
    batches_in_flight: Vec<usize>,
    /// Comma-separated: local, split, split-he, cyclic-he.
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
    /// Learning rate of the client's Adam.
    #[arg(long, default_value_t = 1e-3)]
    client_lr: f64,
    /// Model: a preset (m1, m1_wide, m1_tail) or a job spec's model object as JSON, e.g.
    /// '{"preset": "m1_tail", "tail": 32}' (default: m1 for --data, m1_tail for --records).
    #[arg(long)]
    model: Option<String>,
    /// Shorthand for --model m1_wide.
    #[arg(long)]
    wide: bool,
    /// Preprocessing for --records: a preset (papers, inter_patient) or a job spec's
    /// preprocessing object as JSON, e.g. '{"preset": "inter_patient", "template": "subtract"}'.
    #[arg(long, default_value = "inter_patient")]
    preprocessing: String,
    /// Class weights of the loss: uniform, balanced (n / (classes · n_c), capped), or a job
    /// spec's class_weights as JSON ('{"fixed": [1, 4, 4, 1, 1]}').
    /// Default: uniform for --data and synthetic beats, balanced for --records.
    #[arg(long)]
    class_weights: Option<String>,
    /// cyclic-he: batches per visit, going on through the hospital's beats from round to round,
    /// instead of one pass over them.
    #[arg(long)]
    local_steps: Option<usize>,
    /// Worker threads of the tensor backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cyclic-he (in process): write the final model here in the export format (model.onnx,
    /// model.safetensors, model-card.json/.md), its card holding the test-set figures;
    /// `medsplit-agent evaluate --model DIR` measures it again in plaintext.
    #[arg(long)]
    export: Option<PathBuf>,
    /// `in-process`: both halves in this process, exchanging serialized messages.
    /// `websocket`: through a real coordinator (Postgres from DATABASE_URL or a private
    /// cluster) and an agent on loopback.
    #[arg(long, value_enum, default_value_t = Transport::InProcess)]
    transport: Transport,
    /// With --transport websocket: the round-trip time between the agents and the coordinator,
    /// in milliseconds (a relay in this process delays each direction by half of it).
    /// Comma-separated: every mode is run over each.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    rtt_ms: Vec<f64>,
    /// With --transport websocket: the bandwidth of the link each way, in Mbit/s (default:
    /// unlimited).
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// With --transport websocket: once the job has finished, classify the test set through
    /// private inference (the first hospital's agent, the coordinator's final layer on
    /// ciphertexts) and print beats per second, bytes per beat and the agreement with the
    /// plaintext forward pass.
    #[arg(long)]
    private_inference: bool,
    /// cyclic-he (in process): train with DP-SGD at this noise multiplier σ (each hospital's
    /// Poisson sampling rate from its training-set size; ε per hospital printed and in the JSON).
    #[arg(long, conflicts_with = "dp_epsilon")]
    dp_noise: Option<f64>,
    /// cyclic-he (in process): DP-SGD with σ chosen per hospital for this ε.
    #[arg(long)]
    dp_epsilon: Option<f64>,
    /// DP-SGD's bound on each beat's gradient.
    #[arg(long, default_value_t = 1.0)]
    dp_clip: f64,
    /// DP-SGD's δ.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Play the coordinator on training and reconstruct each sample's cut-layer activation and
    /// label from what it receives (tools/src/attack.rs); the figures per --attack-batch-sizes.
    #[arg(long)]
    attack: bool,
    /// --attack: batch sizes to attack, each on its own training run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,32")]
    attack_batch_sizes: Vec<usize>,
    /// --attack: samples attacked per window.
    #[arg(long, default_value_t = 512)]
    attack_samples: usize,
    /// --attack: training samples between the first window and a second, later one (0: none).
    #[arg(long, default_value_t = 0)]
    attack_later: usize,
    /// --attack: also a malicious coordinator that chooses its layer's weights ("fishing").
    #[arg(long)]
    attack_malicious: bool,
    /// --attack: `split-he` (the backward message's sums) or `split` (the same sums formed by
    /// the harness from the plaintext messages; faster).
    #[arg(long, default_value = "split-he")]
    attack_privacy: String,
    /// --attack: neighbours of the k-NN score.
    #[arg(long, default_value_t = 5)]
    knn_k: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Transport {
    InProcess,
    Websocket,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum SplitKind {
    InterPatient,
    Ds1Cv,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Mode {
    Local,
    Split,
    SplitHe,
    CyclicHe,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Local => "local",
            Mode::Split => "split",
            Mode::SplitHe => "split-he",
            Mode::CyclicHe => "cyclic-he",
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
    /// `patient` (no patient on both sides) or `beat` (a random split of beats).
    evaluation: EvalKind,
    labels: Vec<String>,
    preprocessing: String,
    model: ModelSpec,
    class_weights: ClassWeights,
    train_samples: usize,
    test_samples: usize,
    train_patients: Vec<String>,
    test_patients: Vec<String>,
    threads: usize,
    results: Vec<ModeResult>,
}

#[derive(Serialize)]
struct ModeResult {
    mode: String,
    transport: String,
    batch_size: usize,
    /// Training batches in flight in the split modes.
    batches_in_flight: usize,
    epochs: usize,
    /// cyclic-he: batches per visit (absent: one pass over the hospital's beats per visit).
    #[serde(skip_serializing_if = "Option::is_none")]
    local_steps: Option<usize>,
    seconds_per_epoch: f64,
    test_accuracy: f64,
    bytes_client_to_server_per_epoch: u64,
    bytes_server_to_client_per_epoch: u64,
    epoch_seconds: Vec<f64>,
    final_train_loss: f64,
    /// cyclic-he: each hospital's training patients, in visiting order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hospitals: Vec<Vec<String>>,
    /// ds1-cv: each fold's test patients.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    folds: Vec<Vec<String>>,
    /// cyclic-he with DP-SGD: its setting and each hospital's ε.
    #[serde(skip_serializing_if = "Option::is_none")]
    dp: Option<DpResult>,
    metrics: Confusion,
}

#[derive(Serialize)]
struct DpResult {
    clip_norm: f64,
    noise_multiplier: Option<f64>,
    target_epsilon: Option<f64>,
    delta: f64,
    epsilon_per_hospital: Vec<f64>,
}

/// What every mode trains on and is measured with.
struct Setup {
    name: String,
    evaluation: EvalKind,
    labels: LabelSet,
    preprocessing: Preprocessing,
    model: ModelSpec,
    config: ModelConfig,
    weights: ClassWeights,
    optimizer: ServerOptimizer,
    client_lr: f64,
    /// Training batches in flight in the split modes.
    in_flight: usize,
    train: Dataset,
    test: Dataset,
}

impl Setup {
    fn classes(&self) -> Vec<&'static str> {
        self.labels.class_names().to_vec()
    }

    /// The client's objective on `train`: the job's learning rate, class weights from its counts.
    fn objective(&self, train: &Dataset) -> Objective {
        Objective {
            client_lr: self.client_lr,
            class_weights: self.weights.for_counts(&train.class_counts()),
        }
    }
}

fn main() {
    if let Err(error) = try_main(Args::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn try_main(args: Args) -> anyhow::Result<()> {
    if args.epochs == 0
        || args.batch_size == 0
        || args.hospitals == 0
        || args.folds < 2
        || args.rounds == Some(0)
        || args.local_steps == Some(0)
    {
        bail!(
            "--epochs, --batch-size, --hospitals, --rounds and --local-steps must be at least 1, --folds at least 2"
        );
    }
    if let Some(dir) = &args.export {
        if !args.modes.contains(&Mode::CyclicHe)
            || args.transport != Transport::InProcess
            || args.split == SplitKind::Ds1Cv
        {
            bail!("--export writes the model of an in-process cyclic-he run (--modes cyclic-he)");
        }
        if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            bail!("--export {}: the directory is not empty", dir.display());
        }
    }
    let links = args
        .rtt_ms
        .iter()
        .map(|&rtt| medsplit_tools::relay::Link::new(rtt, args.bandwidth_mbps))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if links.iter().any(|l| !l.is_loopback()) && args.transport != Transport::Websocket {
        bail!(
            "--rtt-ms and --bandwidth-mbps slow the link to a coordinator: add --transport websocket"
        );
    }
    // By default what a new job gets: one at a time with DP.
    let depths = match args.batches_in_flight.as_slice() {
        [] if dp_spec(&args).is_some() => vec![1],
        [] => vec![JobSpec::DEFAULT_BATCHES_IN_FLIGHT as usize],
        d => d.to_vec(),
    };
    if let Some(&k) = depths
        .iter()
        .find(|&&k| !(1..=medsplit_engine::protocol::MAX_DEPTH).contains(&k))
    {
        bail!(
            "--batches-in-flight {k}: 1 to {}",
            medsplit_engine::protocol::MAX_DEPTH
        );
    }
    if args.private_inference && args.transport != Transport::Websocket {
        bail!("--private-inference runs through a coordinator: add --transport websocket");
    }
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("configuring worker threads")?;
    }
    let mut setup = load(&args)?;
    if args.attack {
        return attack(&setup, &args);
    }
    eprintln!(
        "{}: {} train / {} test beats ({}), labels {}, model {}, cut {}, batch {}, {} epochs, seed {}",
        setup.name,
        setup.train.len(),
        setup.test.len(),
        setup.evaluation.describe(),
        setup.classes().join("/"),
        setup.model.preset.map_or("custom", ModelName::as_str),
        setup.config.cut_width().0,
        args.batch_size,
        args.epochs,
        args.seed
    );
    eprintln!(
        "train classes {:?}, test classes {:?}",
        setup.train.class_counts(),
        setup.test.class_counts()
    );
    let mut results = Vec::new();
    for &depth in &depths {
        setup.in_flight = depth;
        for &mode in &args.modes {
            if args.split == SplitKind::Ds1Cv && args.records.is_some() {
                results.push(cross_validate(mode, &setup, &args)?);
                continue;
            }
            if args.transport == Transport::Websocket {
                for &link in &links {
                    // The coordinator on its own multi-threaded runtime, the agent on this
                    // thread, as two processes would run.
                    let coordinator = tokio::runtime::Runtime::new()?;
                    let agent = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    results.push(agent.block_on(websocket::run(
                        mode,
                        &setup,
                        &args,
                        link,
                        coordinator.handle(),
                    ))?);
                }
                continue;
            }
            let result = if mode == Mode::CyclicHe {
                cyclic(&setup, &args)?
            } else {
                let mut trainer = trainer(mode, &setup, &setup.train, args.seed)?;
                run_mode(
                    mode,
                    trainer.as_mut(),
                    &setup,
                    &setup.train,
                    &setup.test,
                    &args,
                )?
            };
            results.push(result);
        }
    }
    print_table(&results);
    if let Some(path) = &args.json {
        let report = Report {
            dataset: setup.name.clone(),
            evaluation: setup.evaluation,
            labels: setup.classes().iter().map(|c| c.to_string()).collect(),
            preprocessing: setup.preprocessing.describe(),
            model: setup.model.clone(),
            class_weights: setup.weights.clone(),
            train_samples: setup.train.len(),
            test_samples: setup.test.len(),
            train_patients: setup.train.patient_names().to_vec(),
            test_patients: setup.test.patient_names().to_vec(),
            threads: rayon::current_num_threads(),
            results,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn attack(setup: &Setup, args: &Args) -> anyhow::Result<()> {
    use medsplit_tools::attack::{self, AttackOptions, DpOptions, Target};
    let privacy = match args.attack_privacy.as_str() {
        "split-he" => Privacy::Encrypted,
        "split" => Privacy::Plaintext,
        other => bail!("--attack-privacy {other}: split-he or split"),
    };
    let options = AttackOptions {
        batch_sizes: args.attack_batch_sizes.clone(),
        samples: args.attack_samples,
        later: args.attack_later,
        malicious: args.attack_malicious,
        privacy,
        knn_k: args.knn_k,
        seed: args.seed,
        dp: dp_spec(args).map(|spec| DpOptions {
            noise_multiplier: spec.noise_multiplier,
            target_epsilon: spec.target_epsilon,
            delta: spec.delta,
            clip_norm: spec.clip_norm,
        }),
        ..AttackOptions::default()
    };
    let target = Target {
        config: &setup.config,
        objective: setup.objective(&setup.train),
        optimizer: setup.optimizer,
        train: &setup.train,
    };
    let mut report = attack::run(&target, &options)?;
    report.dataset = setup.name.clone();
    print!("{}", attack::table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn load(args: &Args) -> anyhow::Result<Setup> {
    let model: ModelSpec = match (&args.model, args.wide) {
        (Some(_), true) => bail!("--wide and --model are exclusive"),
        (_, true) => ModelName::M1Wide.spec(),
        (Some(text), false) => spec_value(text).context("--model")?,
        (None, false) if args.records.is_some() => ModelName::M1Tail.spec(),
        (None, false) => ModelName::M1.spec(),
    };
    let optimizer = match args.server_optimizer {
        OptimizerKind::Adam => ServerOptimizer::Adam { lr: args.server_lr },
        OptimizerKind::Sgd => ServerOptimizer::Sgd { lr: args.server_lr },
    };
    let weights = match &args.class_weights {
        Some(text) => spec_value(text).context("--class-weights")?,
        None if args.records.is_some() => ClassWeights::Balanced,
        None => ClassWeights::Uniform,
    };
    let (name, evaluation, labels, preprocessing_spec, train, test) =
        if let Some(dir) = &args.records {
            let p: Preprocessing = spec_value(&args.preprocessing).context("--preprocessing")?;
            p.validate().context("--preprocessing")?;
            let labels = LabelSet::Aami;
            let started = Instant::now();
            let train = records(dir, &DS1, &p, labels)?;
            let test = match args.split {
                // Cross-validation never reads DS2.
                SplitKind::Ds1Cv => train.select(&[])?,
                SplitKind::InterPatient => records(dir, &DS2, &p, labels)?,
            };
            eprintln!(
                "read {} records in {:.1} s",
                train.patient_names().len() + test.patient_names().len(),
                started.elapsed().as_secs_f64()
            );
            let name = match args.split {
                SplitKind::InterPatient => "mitdb inter-patient DS1 -> DS2",
                SplitKind::Ds1Cv => "mitdb DS1 patient-wise cross-validation",
            };
            (name.to_owned(), EvalKind::Patient, labels, p, train, test)
        } else if let Some(dir) = &args.data {
            let train = data::load_beats(dir, "train", 128, 5)?;
            let test = data::load_beats(dir, "test", 128, 5)?;
            let name = dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            (
                name,
                EvalKind::Beat,
                LabelSet::Papers,
                Preprocessing::papers(),
                train,
                test,
            )
        } else {
            (
                "synthetic".into(),
                EvalKind::Beat,
                LabelSet::Papers,
                Preprocessing::papers(),
                data::synthetic(args.synthetic_train, args.seed.wrapping_add(1)),
                data::synthetic(args.synthetic_test, args.seed.wrapping_add(2)),
            )
        };
    let config = model.config(train.beat_len(), train.feature_len(), labels.num_classes());
    config.validate().context("model")?;
    Ok(Setup {
        name,
        evaluation,
        labels,
        preprocessing: preprocessing_spec,
        model,
        config,
        weights,
        optimizer,
        client_lr: args.client_lr,
        in_flight: 1,
        train,
        test,
    })
}

/// A job spec value from the command line: JSON, or a bare name taken as a JSON string
/// (`inter_patient` for `"inter_patient"`).
fn spec_value<T: serde::de::DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    let text = text.trim();
    if text.starts_with(['{', '[', '"']) {
        Ok(serde_json::from_str(text)?)
    } else {
        Ok(serde_json::from_value(serde_json::Value::String(
            text.to_owned(),
        ))?)
    }
}

/// The beats of `names` in `dir`, one patient per record.
fn records(
    dir: &Path,
    names: &[&str],
    p: &Preprocessing,
    labels: LabelSet,
) -> anyhow::Result<Dataset> {
    wfdb::load_records_with(dir, names, p, labels)
        .with_context(|| format!("reading records from {}", dir.display()))
}

fn trainer(
    mode: Mode,
    setup: &Setup,
    train: &Dataset,
    seed: u64,
) -> anyhow::Result<Box<dyn Trainer>> {
    let (config, optimizer) = (&setup.config, setup.optimizer);
    let objective = setup.objective(train);
    Ok(match mode {
        Mode::Local => {
            let mut m = LocalModel::new(config, optimizer, seed)?;
            m.set_objective(objective)?;
            Box::new(m)
        }
        Mode::Split | Mode::SplitHe | Mode::CyclicHe => {
            let privacy = if mode == Mode::Split {
                Privacy::Plaintext
            } else {
                Privacy::Encrypted
            };
            let mut t =
                InProcess::new(config, privacy, optimizer, seed)?.with_depth(setup.in_flight)?;
            t.client.set_objective(objective)?;
            Box::new(t)
        }
    })
}

fn run_mode(
    mode: Mode,
    trainer: &mut dyn Trainer,
    setup: &Setup,
    train: &Dataset,
    test: &Dataset,
    args: &Args,
) -> anyhow::Result<ModeResult> {
    let mut epoch_seconds = Vec::new();
    let mut final_loss = f64::NAN;
    for epoch in 0..args.epochs {
        let before = trainer.traffic();
        let label = format!("{:>9} epoch {}/{}", mode.name(), epoch + 1, args.epochs);
        let order = epoch_order(train.len(), args.seed, epoch);
        let (seconds, totals) = timed_epoch(trainer, train, &order, args.batch_size, &label)?;
        let after = trainer.traffic();
        epoch_seconds.push(seconds);
        final_loss = totals.mean_loss();
        eprintln!(
            "{label}: loss {:.4}, train accuracy {:.2}%, {seconds:.2} s, {:.1} MB up, {:.1} MB down",
            final_loss,
            100.0 * totals.accuracy(),
            (after.client_to_server - before.client_to_server) as f64 / 1e6,
            (after.server_to_client - before.server_to_client) as f64 / 1e6,
        );
    }
    let traffic = trainer.traffic();
    let metrics = evaluate(trainer, test, 64, &setup.classes())
        .with_context(|| format!("{} evaluation", mode.name()))?;
    print_metrics(mode.name(), setup.evaluation, &metrics);
    let epochs = args.epochs as u64;
    Ok(ModeResult {
        mode: mode.name().into(),
        transport: "in-process".into(),
        batch_size: args.batch_size,
        batches_in_flight: in_flight(mode, setup),
        epochs: args.epochs,
        local_steps: None,
        seconds_per_epoch: median(&epoch_seconds),
        test_accuracy: metrics.accuracy(),
        bytes_client_to_server_per_epoch: traffic.client_to_server / epochs,
        bytes_server_to_client_per_epoch: traffic.server_to_client / epochs,
        epoch_seconds,
        final_train_loss: final_loss,
        hospitals: Vec::new(),
        folds: Vec::new(),
        dp: None,
        metrics,
    })
}

/// Training batches in flight in `mode` (a local model trains one at a time).
fn in_flight(mode: Mode, setup: &Setup) -> usize {
    match mode {
        Mode::Local => 1,
        _ => setup.in_flight,
    }
}

/// One pass over `data` in `order`, with a progress line on a terminal.
fn timed_epoch(
    trainer: &mut dyn Trainer,
    data: &Dataset,
    order: &[usize],
    batch_size: usize,
    label: &str,
) -> anyhow::Result<(f64, medsplit_engine::training::Totals)> {
    let terminal = std::io::stderr().is_terminal();
    let mut last_shown = 0;
    let mut progress = |done: usize, total: usize| {
        let percent = done * 100 / total.max(1);
        if terminal && percent != last_shown {
            last_shown = percent;
            eprint!("\r{label}: {percent:>3}%");
        }
    };
    let started = Instant::now();
    let totals = train_epoch(trainer, data, order, batch_size, &mut progress)
        .with_context(|| label.trim().to_owned())?;
    if terminal {
        eprint!("\r");
    }
    Ok((started.elapsed().as_secs_f64(), totals))
}

/// Patients dealt to `groups` groups, largest count of `class` first (so that every group gets
/// some of the rarest class), each group's patient indices in ascending order.
fn deal_patients(data: &Dataset, groups: usize, class: u8) -> Vec<Vec<u32>> {
    let names = data.patient_names().len();
    let mut rare = vec![0usize; names];
    for (&p, &l) in data.patients().iter().zip(data.labels()) {
        if l == class {
            rare[p as usize] += 1;
        }
    }
    let mut order: Vec<u32> = (0..names as u32).collect();
    order.sort_by_key(|&p| (std::cmp::Reverse(rare[p as usize]), p));
    let mut dealt = vec![Vec::new(); groups];
    for (i, p) in order.into_iter().enumerate() {
        dealt[i % groups].push(p);
    }
    dealt.iter_mut().for_each(|g| g.sort_unstable());
    dealt
}

/// The beats of `data` whose patient is in `patients`.
fn of_patients(data: &Dataset, patients: &[u32]) -> anyhow::Result<Dataset> {
    let rows: Vec<usize> = (0..data.len())
        .filter(|&i| patients.contains(&data.patients()[i]))
        .collect();
    Ok(data.select(&rows)?)
}

fn patient_names(data: &Dataset, patients: &[u32]) -> Vec<String> {
    patients
        .iter()
        .map(|&p| data.patient_names()[p as usize].clone())
        .collect()
}

/// Cyclic split-HE training as the platform runs it: DS1's patients divided among hospitals;
/// every round visits the hospitals in order; each visit resumes the client half from the
/// weights the previous visit handed over and the server layer from its checkpoint (each with a
/// fresh optimiser, as the agents and the coordinator do), trains one pass over that hospital's
/// beats with its own class weights, and hands both on.
fn cyclic(setup: &Setup, args: &Args) -> anyhow::Result<ModeResult> {
    let (hospitals, names) = hospitals(setup, args)?;
    let rounds = args.rounds.unwrap_or(args.epochs);
    let config = &setup.config;
    let mut client_parameters: Option<Vec<f32>> = None;
    let mut server_parameters: Option<Vec<f32>> = None;
    let mut epoch_seconds = Vec::new();
    let mut traffic = (0u64, 0u64);
    let mut final_loss = f64::NAN;
    let mut last: Option<InProcess> = None;
    let mut epsilons = Vec::new();
    for round in 0..rounds {
        let started = Instant::now();
        let mut loss = (0.0, 0usize);
        for (h, data) in hospitals.iter().enumerate() {
            if data.is_empty() {
                continue;
            }
            let mut client = match &client_parameters {
                None => ClientSession::new(config, Privacy::Encrypted, args.seed)?,
                Some(p) => ClientSession::resume(config, Privacy::Encrypted, p)?,
            };
            client.set_objective(setup.objective(data))?;
            let server = match &server_parameters {
                None => ServerSession::new(config, Privacy::Encrypted, setup.optimizer, args.seed)?,
                Some(p) => ServerSession::resume(config, Privacy::Encrypted, setup.optimizer, p)?,
            };
            let label = format!("cyclic-he round {}/{rounds} hospital {}", round + 1, h + 1);
            let (mut visit, totals) = match dp_spec(args) {
                None => {
                    let mut visit =
                        InProcess::from_sessions(client, server).with_depth(setup.in_flight)?;
                    let order = visit_order(data.len(), args, round, h)?;
                    let (_, totals) =
                        timed_epoch(&mut visit, data, &order, args.batch_size, &label)?;
                    (visit, totals)
                }
                Some(spec) => {
                    let schedule = dp::Schedule {
                        batch_size: args.batch_size as u32,
                        rounds: rounds as u32,
                        local_epochs: 1,
                        local_steps: args.local_steps.map(|s| s as u32),
                    };
                    let plan = dp::plan_with(
                        spec.noise_multiplier,
                        spec.target_epsilon,
                        spec.delta,
                        &schedule,
                        data.len() as u64,
                    )?;
                    let seed = args.seed ^ ((round as u64) << 32 | h as u64);
                    let client = client.with_dp(DpSgd {
                        clip_norm: spec.clip_norm,
                        noise_multiplier: plan.noise_multiplier,
                        expected_batch: plan.sampling_rate * data.len() as f64,
                        padded_batch: plan.padded_batch as usize,
                        seed: Some(seed),
                    })?;
                    if round == 0 {
                        eprintln!(
                            "hospital {}: DP-SGD q = {:.5}, σ = {:.3}, {} steps per visit of \
                             {} rows, ε = {:.3} at δ = {} after {rounds} rounds",
                            h + 1,
                            plan.sampling_rate,
                            plan.noise_multiplier,
                            plan.steps_per_visit,
                            plan.padded_batch,
                            plan.epsilon,
                            plan.delta
                        );
                        epsilons.push(plan.epsilon);
                    }
                    let mut visit = InProcess::from_sessions(client, server);
                    let mut batches = PoissonBatches::new(
                        data.len(),
                        plan.sampling_rate,
                        plan.padded_batch as usize,
                        Some(seed),
                    );
                    let started = Instant::now();
                    let totals = train_private_steps(
                        &mut visit,
                        data,
                        &mut batches,
                        plan.steps_per_visit,
                        &mut |_, _| {},
                    )?;
                    eprintln!("{label}: {:.1} s", started.elapsed().as_secs_f64());
                    (visit, totals)
                }
            };
            loss.0 += totals.loss_sum;
            loss.1 += totals.samples;
            let t = visit.traffic();
            traffic.0 += t.client_to_server;
            traffic.1 += t.server_to_client;
            client_parameters = Some(visit.client.model().parameters());
            server_parameters = Some(visit.server.model()?.parameters());
            last = Some(visit);
        }
        let seconds = started.elapsed().as_secs_f64();
        epoch_seconds.push(seconds);
        final_loss = loss.0 / loss.1.max(1) as f64;
        eprintln!(
            "cyclic-he round {}/{rounds}: loss {final_loss:.4}, {seconds:.2} s",
            round + 1
        );
    }
    let mut trainer = last.context("no hospital has training beats")?;
    let metrics = evaluate(&mut trainer, &setup.test, 64, &setup.classes())
        .context("cyclic-he evaluation")?;
    print_metrics("cyclic-he", setup.evaluation, &metrics);
    if let (Some(dir), Some(client), Some(server)) =
        (&args.export, client_parameters, server_parameters)
    {
        export(dir, setup, args, rounds, client, server, &metrics)?;
    }
    let rounds_u = rounds as u64;
    Ok(ModeResult {
        mode: Mode::CyclicHe.name().into(),
        transport: "in-process".into(),
        batch_size: args.batch_size,
        batches_in_flight: setup.in_flight,
        epochs: rounds,
        local_steps: args.local_steps,
        seconds_per_epoch: median(&epoch_seconds),
        test_accuracy: metrics.accuracy(),
        bytes_client_to_server_per_epoch: traffic.0 / rounds_u,
        bytes_server_to_client_per_epoch: traffic.1 / rounds_u,
        epoch_seconds,
        final_train_loss: final_loss,
        hospitals: names,
        folds: Vec::new(),
        dp: dp_spec(args).map(|spec| DpResult {
            clip_norm: spec.clip_norm,
            noise_multiplier: spec.noise_multiplier,
            target_epsilon: spec.target_epsilon,
            delta: spec.delta,
            epsilon_per_hospital: epsilons,
        }),
        metrics,
    })
}

/// The run's DP setting (`--dp-noise` or `--dp-epsilon`), if any.
fn dp_spec(args: &Args) -> Option<DpSpec> {
    (args.dp_noise.is_some() || args.dp_epsilon.is_some()).then_some(DpSpec {
        noise_multiplier: args.dp_noise,
        target_epsilon: args.dp_epsilon,
        delta: args.dp_delta,
        clip_norm: args.dp_clip,
    })
}

/// Writes the final cyclic-he model to `dir` in the export format, as a job of the run's
/// settings whose card holds the test-set figures.
fn export(
    dir: &Path,
    setup: &Setup,
    args: &Args,
    rounds: usize,
    client: Vec<f32>,
    server: Vec<f32>,
    metrics: &Confusion,
) -> anyhow::Result<()> {
    let hospitals: Vec<String> = (1..=args.hospitals)
        .map(|h| format!("hospital-{h}"))
        .collect();
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": format!("medsplit-bench cyclic-he: {}", setup.name),
        "model": setup.model,
        "labels": setup.labels,
        "preprocessing": setup.preprocessing,
        "hospitals": hospitals,
        "rounds": rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "server_optimizer": setup.optimizer,
        "client_lr": setup.client_lr,
        "class_weights": setup.weights,
    }))
    .context("the run's settings as a job spec")?;
    let model = TrainedModel::new(setup.config.clone(), client, server)?;
    let evaluation = CardEvaluation {
        round: rounds as u32,
        kind: setup.evaluation,
        hospitals: Vec::new(),
        pooled: metrics.clone(),
    };
    let mut card = ModelCard::new(
        0,
        spec,
        hospitals,
        rounds as u32,
        Some(evaluation),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "medsplit-bench".into(),
    );
    medsplit_agent::model_dir::write(dir, &model, &mut card, false)
        .with_context(|| format!("exporting to {}", dir.display()))?;
    eprintln!("exported the cyclic-he model to {}", dir.display());
    Ok(())
}

/// DS1's patients dealt to `--hospitals` hospitals (by patient, S beats spread first), printed:
/// each hospital's beats and its patients' names.
fn hospitals(setup: &Setup, args: &Args) -> anyhow::Result<(Vec<Dataset>, Vec<Vec<String>>)> {
    let train = &setup.train;
    if train.patient_names().len() < args.hospitals {
        // Beats without enough patients (the synthetic beat set is one unknown patient): every
        // hospital gets every `--hospitals`-th beat.
        eprintln!(
            "{} patients for {} hospitals: beats dealt in turn",
            train.patient_names().len(),
            args.hospitals
        );
        let hospitals: Vec<Dataset> = (0..args.hospitals)
            .map(|h| {
                let rows: Vec<usize> = (h..train.len()).step_by(args.hospitals).collect();
                train.select(&rows)
            })
            .collect::<Result<_, _>>()?;
        let names = hospitals
            .iter()
            .map(|d| d.patient_names().to_vec())
            .collect();
        return Ok((hospitals, names));
    }
    let groups = deal_patients(train, args.hospitals, 1);
    let hospitals: Vec<Dataset> = groups
        .iter()
        .map(|g| of_patients(&setup.train, g))
        .collect::<anyhow::Result<_>>()?;
    let names: Vec<Vec<String>> = groups
        .iter()
        .map(|g| patient_names(&setup.train, g))
        .collect();
    for (h, (n, d)) in names.iter().zip(&hospitals).enumerate() {
        eprintln!(
            "hospital {}: patients {} ({} beats, classes {:?})",
            h + 1,
            n.join(" "),
            d.len(),
            d.class_counts()
        );
    }
    Ok((hospitals, names))
}

/// The samples hospital `h` (0-based) trains on in `round` of a cyclic run, in order, as its
/// agent would take them: one seeded pass, or `--local-steps` batches going on from where the
/// previous round's visit stopped.
fn visit_order(len: usize, args: &Args, round: usize, h: usize) -> anyhow::Result<Vec<usize>> {
    Ok(match args.local_steps {
        None => epoch_order(len, args.seed ^ ((round as u64) << 32 | h as u64), 0),
        Some(steps) => {
            let per_visit = steps * args.batch_size;
            SampleStream::starting_at(len, args.seed ^ h as u64, (round * per_visit) as u64)
                .with_context(|| format!("hospital {} has no training beats", h + 1))?
                .take(per_visit)
        }
    })
}

/// Patient-wise K-fold cross-validation inside the training set: each fold's patients are
/// held out in turn, a model of `mode` trains on the others; the held-out predictions of all
/// folds are pooled into one confusion matrix.
fn cross_validate(mode: Mode, setup: &Setup, args: &Args) -> anyhow::Result<ModeResult> {
    if mode == Mode::CyclicHe {
        bail!("--split ds1-cv takes local, split or split-he");
    }
    let folds = deal_patients(&setup.train, args.folds, 1);
    let mut pooled = Confusion::new(setup.classes())?;
    let mut epoch_seconds = Vec::new();
    let mut final_loss = f64::NAN;
    for (k, held_out) in folds.iter().enumerate() {
        let rest: Vec<u32> = folds
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != k)
            .flat_map(|(_, g)| g.iter().copied())
            .collect();
        let (train, test) = (
            of_patients(&setup.train, &rest)?,
            of_patients(&setup.train, held_out)?,
        );
        eprintln!(
            "fold {}/{}: test patients {}",
            k + 1,
            folds.len(),
            patient_names(&setup.train, held_out).join(" ")
        );
        let mut trainer = trainer(mode, setup, &train, args.seed)?;
        let result = run_mode(mode, trainer.as_mut(), setup, &train, &test, args)?;
        pooled.merge(&result.metrics)?;
        epoch_seconds.extend(result.epoch_seconds);
        final_loss = result.final_train_loss;
    }
    eprintln!("pooled over {} folds:", folds.len());
    print_metrics(mode.name(), EvalKind::Patient, &pooled);
    Ok(ModeResult {
        mode: mode.name().into(),
        transport: "in-process".into(),
        batch_size: args.batch_size,
        batches_in_flight: in_flight(mode, setup),
        epochs: args.epochs,
        local_steps: None,
        seconds_per_epoch: median(&epoch_seconds),
        test_accuracy: pooled.accuracy(),
        bytes_client_to_server_per_epoch: 0,
        bytes_server_to_client_per_epoch: 0,
        epoch_seconds,
        final_train_loss: final_loss,
        hospitals: Vec::new(),
        folds: folds
            .iter()
            .map(|g| patient_names(&setup.train, g))
            .collect(),
        dp: None,
        metrics: pooled,
    })
}

fn print_metrics(mode: &str, kind: EvalKind, m: &Confusion) {
    eprintln!(
        "{mode:>9} test ({}): accuracy {:.2}% (majority class {:.2}%), macro-F1 {:.3}, balanced accuracy {:.2}%",
        kind.describe(),
        100.0 * m.accuracy(),
        100.0 * m.majority_rate(),
        m.macro_f1(),
        100.0 * m.balanced_accuracy()
    );
    for (c, name) in m.classes().iter().enumerate() {
        eprintln!(
            "{:>9}   {name}: Se {:6.2}%  PPV {:6.2}%  F1 {:.3}  support {}",
            "",
            100.0 * m.sensitivity(c),
            100.0 * m.ppv(c),
            m.f1(c),
            m.support(c)
        );
    }
    eprintln!(
        "{:>9}   confusion (rows true, columns predicted): {:?}",
        "",
        m.rows()
    );
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.is_empty() {
        f64::NAN
    } else if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn print_table(results: &[ModeResult]) {
    let Some(first) = results.first() else {
        return;
    };
    let classes = first.metrics.classes();
    let mut header = String::from(
        "| mode | batch | in flight | epochs | s/epoch (median) | accuracy | majority class | macro-F1 |",
    );
    for c in classes {
        header.push_str(&format!(" {c} Se / PPV |"));
    }
    header.push_str(" MB/epoch up | MB/epoch down |");
    println!("{header}");
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|{}---:|---:|",
        "---:|".repeat(classes.len())
    );
    for r in results {
        let m = &r.metrics;
        let mut line = format!(
            "| {} | {} | {} | {} | {:.2} | {:.2}% | {:.2}% | {:.3} |",
            match r.transport.as_str() {
                "in-process" => r.mode.clone(),
                transport => format!("{} ({transport})", r.mode),
            },
            r.batch_size,
            r.batches_in_flight,
            r.epochs,
            r.seconds_per_epoch,
            100.0 * m.accuracy(),
            100.0 * m.majority_rate(),
            m.macro_f1()
        );
        for c in 0..classes.len() {
            line.push_str(&format!(
                " {:.1} / {:.1} |",
                100.0 * m.sensitivity(c),
                100.0 * m.ppv(c)
            ));
        }
        line.push_str(&format!(
            " {:.1} | {:.1} |",
            r.bytes_client_to_server_per_epoch as f64 / 1e6,
            r.bytes_server_to_client_per_epoch as f64 / 1e6,
        ));
        println!("{line}");
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
    use medsplit_engine::training::Totals;
    use medsplit_tools::local::{self, Postgres, Rest};
    use serde_json::json;

    use super::{Args, Mode, ModeResult, Setup, median, print_metrics};

    const PASSWORD: &str = "bench-password-not-for-production";

    /// A coordinator on loopback over `db_url`, with the bench's admin; its base URL.
    async fn start_coordinator(
        db_url: String,
    ) -> anyhow::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
        let db = medsplit_coordinator::connect(&db_url).await?;
        medsplit_coordinator::create_admin(&db, "bench@medsplit.local", PASSWORD).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let state = AppState::register(
            db,
            auth::Keys::from_secret(auth::new_secret().as_bytes()),
            Settings {
                public_url: url.clone(),
                ..Settings::default()
            },
            &url,
        )
        .await?;
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

    /// Trains `mode` through a real coordinator (its own Postgres) and in-process agents on
    /// loopback, as a deployment would: split and split-he with one hospital holding the whole
    /// training set; cyclic-he with `--hospitals` hospitals, each with its own agent and its
    /// patients, the client weights sealed from one to the next. Every visit of the last round
    /// measures the test set; the result is the last visit's, the model the cycle ends with.
    pub async fn run(
        mode: Mode,
        setup: &Setup,
        args: &Args,
        link: medsplit_tools::relay::Link,
        coordinator_runtime: &tokio::runtime::Handle,
    ) -> anyhow::Result<ModeResult> {
        if mode == Mode::Local {
            bail!(
                "--transport websocket needs a split mode (split, split-he, cyclic-he): local training has no network"
            );
        }
        let (hospitals, patients) = if mode == Mode::CyclicHe {
            super::hospitals(setup, args)?
        } else {
            (vec![setup.train.clone()], Vec::new())
        };
        let rounds = match mode {
            Mode::CyclicHe => args.rounds.unwrap_or(args.epochs),
            _ => 1,
        };
        let dir = std::env::temp_dir().join(format!("medsplit-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pg = Postgres::start(&dir).await?;
        let (url, server) = coordinator_runtime
            .spawn(start_coordinator(pg.url.clone()))
            .await??;
        // The agents reach the coordinator over the emulated link, if one is set.
        let (_relay, agent_url) = coordinator_runtime
            .spawn(medsplit_tools::relay::in_front_of(url.clone(), link))
            .await??;
        if !link.is_loopback() {
            eprintln!("agents reach the coordinator over {}", link.describe());
        }
        let admin = Rest::new(&url)
            .login("bench@medsplit.local", PASSWORD)
            .await?;
        let researcher = local::create_user(
            &admin,
            "researcher@bench.local",
            PASSWORD,
            "researcher",
            None,
        )
        .await?;
        let names: Vec<String> = (1..=hospitals.len())
            .map(|h| format!("bench-{h}"))
            .collect();
        let mut agents = Vec::new();
        let mut hospital_admins = Vec::new();
        for name in &names {
            let hospital_admin = local::hospital_with_admin(&admin, name, PASSWORD).await?;
            let (coordinator, key) =
                local::enrol_in_process(&agent_url, &hospital_admin, name).await?;
            agents.push((Arc::new(coordinator), key));
            hospital_admins.push(hospital_admin);
        }
        let (local_epochs, local_steps) = match mode {
            Mode::CyclicHe => (1, args.local_steps),
            _ => (args.epochs, None),
        };
        let job = researcher
            .call(
                "POST",
                "/v1/jobs",
                Some(json!({
                    "name": format!("bench {}", mode.name()),
                    "model": setup.model,
                    "labels": setup.labels,
                    "preprocessing": setup.preprocessing,
                    "class_weights": setup.weights,
                    "client_lr": setup.client_lr,
                    "hospitals": names,
                    "rounds": rounds,
                    "local_epochs": local_epochs,
                    "local_steps": local_steps,
                    "eval_every": rounds,
                    "batch_size": args.batch_size,
                    "batches_in_flight": setup.in_flight,
                    "seed": args.seed,
                    "server_optimizer": setup.optimizer,
                    "insecure_plaintext": mode == Mode::Split,
                })),
            )
            .await?;
        let id = job["id"].as_i64().unwrap_or_default();
        for hospital_admin in &hospital_admins {
            hospital_admin
                .call(
                    "POST",
                    &format!("/v1/jobs/{id}/consent"),
                    Some(json!({ "decision": "approve" })),
                )
                .await?;
        }
        let mut progress = Progress {
            mode: mode.name(),
            final_loss: f64::NAN,
        };
        let mut epoch_seconds = Vec::new();
        let mut traffic = (0u64, 0u64);
        let mut last = None;
        for round in 0..rounds {
            let started = std::time::Instant::now();
            for (h, ((coordinator, key), train)) in agents.iter().zip(&hospitals).enumerate() {
                let assignment = coordinator
                    .claim(Duration::from_secs(30))
                    .await?
                    .with_context(|| {
                        format!("the coordinator offered hospital {} no visit", h + 1)
                    })?;
                let data = LocalData {
                    train: train.clone(),
                    test: setup.test.clone(),
                    kind: setup.evaluation,
                };
                // Keep the lease while training, as the agent daemon does.
                let beat = coordinator.keep_lease((assignment.visit_id, assignment.attempt));
                let summary = visit::run(coordinator, key, &assignment, &data, &mut progress).await;
                beat.abort();
                let summary =
                    summary.with_context(|| format!("round {} hospital {}", round + 1, h + 1))?;
                traffic.0 += summary.train_bytes_up;
                traffic.1 += summary.train_bytes_down;
                if mode != Mode::CyclicHe {
                    epoch_seconds.extend(&summary.epoch_seconds);
                }
                last = Some(summary);
            }
            if mode == Mode::CyclicHe {
                let seconds = started.elapsed().as_secs_f64();
                epoch_seconds.push(seconds);
                eprintln!(
                    "cyclic-he round {}/{rounds} (websocket): loss {:.4}, {seconds:.2} s",
                    round + 1,
                    progress.final_loss
                );
            }
        }
        let summary = last.context("no visit ran")?;
        let metrics = summary.test.clone().context("no test metrics measured")?;
        let stored = researcher
            .call("GET", &format!("/v1/jobs/{id}/metrics"), None)
            .await?;
        let visits = stored["visits"].as_array().cloned().unwrap_or_default();
        let sum = |key: &str| visits.iter().filter_map(|v| v[key].as_f64()).sum::<f64>();
        eprintln!(
            "{:>8} coordinator: {:.2} s computing over {} messages in {} visits, {:.2} s of visits",
            mode.name(),
            sum("server_seconds"),
            sum("messages"),
            visits.len(),
            sum("wall_seconds")
        );
        print_metrics(
            &format!("{} (websocket)", mode.name()),
            setup.evaluation,
            &metrics,
        );
        if args.private_inference {
            let (coordinator, key) = &agents[0];
            let all: Vec<usize> = (0..setup.test.len()).collect();
            let (rows, _) = medsplit_engine::training::gather(&setup.test, &all);
            let figures = medsplit_tools::inference::measure(coordinator, key, id, &rows).await?;
            eprintln!("{figures}");
        }
        server.abort();
        drop(pg);
        let _ = std::fs::remove_dir_all(&dir);
        let epochs = match mode {
            Mode::CyclicHe => rounds,
            _ => args.epochs,
        };
        let per_epoch = epochs.max(1) as u64;
        Ok(ModeResult {
            mode: mode.name().into(),
            transport: match link.is_loopback() {
                true => "websocket".into(),
                false => format!("websocket, {}", link.describe()),
            },
            batch_size: args.batch_size,
            batches_in_flight: setup.in_flight,
            epochs,
            local_steps,
            seconds_per_epoch: median(&epoch_seconds),
            test_accuracy: metrics.accuracy(),
            bytes_client_to_server_per_epoch: traffic.0 / per_epoch,
            bytes_server_to_client_per_epoch: traffic.1 / per_epoch,
            epoch_seconds,
            final_train_loss: progress.final_loss,
            hospitals: patients,
            folds: Vec::new(),
            dp: None,
            metrics,
        })
    }
}
