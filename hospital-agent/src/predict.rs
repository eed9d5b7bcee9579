//! Local inference with an exported model (`medsplit-agent predict` and `evaluate`): every
//! beat of raw WFDB records, beat files or CSV files, cut with the model card's preprocessing,
//! classified by a plain-Rust forward pass of the exported weights.
//!
//! Inputs are named by path:
//! - a WFDB record: `DIR/100.hea` or `DIR/100` (its `.dat` files and `.atr` beside it; the beat
//!   positions come from the annotations, any sampling rate);
//! - beat files: `DIR/test.f32` or `DIR/test` (with `test.labels`, and `test.src.u32` for each
//!   beat's record and R-peak sample), cut with the papers' preprocessing;
//! - a CSV file `*.csv` in the agent configuration's `csv` source format (label, optional
//!   patient, the samples and features of the model's preprocessing);
//! - a directory: every WFDB record in it (or those of `--records`), else every beat-file stem.

use std::io::Write;
use std::path::{Path, PathBuf};

use medsplit_engine::api::JobSpec;
use medsplit_engine::data::Dataset;
use medsplit_engine::export::infer::{Classifier, Scratch, softmax_assign};
use medsplit_engine::export::{ModelCard, TrainedModel};
use medsplit_engine::metrics::{Confusion, ReportRow, confusion_text, text_report};
use medsplit_engine::preprocess::{self, LabelSet};
use medsplit_engine::wfdb;
use rayon::prelude::*;

use crate::AgentError;
use crate::config::Source;

/// One input to classify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A WFDB record `name` in `dir`.
    Wfdb { dir: PathBuf, record: String },
    /// Beat files `dir/stem.f32`, `.labels` (and `.src.u32`).
    Beats { dir: PathBuf, stem: String },
    /// A CSV file of rows cut beforehand.
    Csv { path: PathBuf },
}

impl Input {
    pub fn describe(&self) -> String {
        match self {
            Self::Wfdb { dir, record } => format!("WFDB record {}", dir.join(record).display()),
            Self::Beats { dir, stem } => format!("beat files {}", dir.join(stem).display()),
            Self::Csv { path } => format!("CSV {}", path.display()),
        }
    }
}

/// How CSV inputs are laid out (the agent configuration's `csv` source options).
#[derive(Clone, Copy, Debug, Default)]
pub struct CsvOptions {
    /// A patient column right after the label.
    pub patient_column: bool,
    /// The label set of the file's integer labels; the model's when `None`.
    pub labels: Option<LabelSet>,
}

fn config_error(message: String) -> AgentError {
    AgentError::Config(message)
}

fn strip(path: &Path, extension: &str) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(extension).unwrap_or(name);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    Some((dir.unwrap_or(Path::new(".")).to_owned(), stem.to_owned()))
}

/// The inputs `paths` name; `records` keeps only those WFDB records of a directory (in the
/// order given; each must be there).
pub fn resolve(paths: &[PathBuf], records: Option<&[String]>) -> Result<Vec<Input>, AgentError> {
    let mut inputs = Vec::new();
    if paths.is_empty() {
        return Err(config_error("name at least one input".into()));
    }
    for path in paths {
        if path.is_dir() {
            inputs.extend(directory(path, records)?);
            continue;
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let with = |ext: &str| {
            let mut p = path.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        let input = match ext {
            "csv" => Some(Input::Csv { path: path.clone() }),
            "hea" => strip(path, ".hea").map(|(dir, record)| Input::Wfdb { dir, record }),
            "f32" => strip(path, ".f32").map(|(dir, stem)| Input::Beats { dir, stem }),
            _ if with(".hea").is_file() => {
                strip(path, "").map(|(dir, record)| Input::Wfdb { dir, record })
            }
            _ if with(".f32").is_file() => {
                strip(path, "").map(|(dir, stem)| Input::Beats { dir, stem })
            }
            _ => None,
        };
        match input {
            Some(input) => inputs.push(input),
            None => {
                return Err(config_error(format!(
                    "{}: not a WFDB record (.hea), beat files (.f32 + .labels), a CSV file or a \
                     directory of records",
                    path.display()
                )));
            }
        }
    }
    Ok(inputs)
}

/// Every WFDB record of `dir` (by name, or those of `records`), else every beat-file stem.
fn directory(dir: &Path, records: Option<&[String]>) -> Result<Vec<Input>, AgentError> {
    let mut headers = Vec::new();
    let mut stems = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| config_error(format!("{}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(record) = name.strip_suffix(".hea") {
            headers.push(record.to_owned());
        } else if let Some(stem) = name.strip_suffix(".f32") {
            stems.push(stem.to_owned());
        }
    }
    headers.sort();
    stems.sort();
    let wfdb = |record: &str| Input::Wfdb {
        dir: dir.to_owned(),
        record: record.to_owned(),
    };
    if let Some(records) = records {
        return records
            .iter()
            .map(|r| {
                if headers.contains(r) {
                    Ok(wfdb(r))
                } else {
                    Err(config_error(format!(
                        "record {r} is not in {} (no {r}.hea)",
                        dir.display()
                    )))
                }
            })
            .collect();
    }
    if !headers.is_empty() {
        return Ok(headers.iter().map(|r| wfdb(r)).collect());
    }
    if !stems.is_empty() {
        return Ok(stems
            .into_iter()
            .map(|stem| Input::Beats {
                dir: dir.to_owned(),
                stem,
            })
            .collect());
    }
    Err(config_error(format!(
        "{}: no WFDB records (.hea) or beat files (.f32) in it",
        dir.display()
    )))
}

/// One input's beats, cut as the model's card says.
pub struct Beats {
    /// Each beat's record (or patient; the input's name when it has none).
    pub records: Vec<String>,
    /// Each beat's R-peak sample, when the input says it.
    pub samples: Vec<Option<u64>>,
    /// The rows and the true labels in the model's label set.
    pub dataset: Dataset,
}

/// Reads `input` and cuts it with the preprocessing and labels of the job that trained the
/// model (its model card's `spec`).
pub fn load(input: &Input, spec: &JobSpec, csv: CsvOptions) -> Result<Beats, AgentError> {
    let p = &spec.preprocessing;
    let labels = spec.labels;
    match input {
        Input::Wfdb { dir, record } => {
            let annotations = dir.join(format!("{record}.atr"));
            if !annotations.is_file() {
                return Err(AgentError::Unsupported(format!(
                    "{}: no annotation file {}: the beat positions come from the annotations \
                     (a QRS detector is not part of MedSplit)",
                    input.describe(),
                    annotations.display()
                )));
            }
            let rec = wfdb::read_record(dir, record)?;
            let annotations = wfdb::read_annotations(&annotations)?;
            let (dataset, peaks) = preprocess::extract(&rec, &annotations, p, labels)?;
            Ok(Beats {
                records: vec![record.clone(); dataset.len()],
                samples: peaks.into_iter().map(Some).collect(),
                dataset,
            })
        }
        Input::Beats { dir, stem } => {
            let source = Source::Beats {
                path: dir.clone(),
                files: vec![stem.clone()],
            };
            let dataset = source.load(p, labels)?.remove(0);
            // `.src.u32`: (record, R-peak sample) per beat.
            let src = std::fs::read(dir.join(format!("{stem}.src.u32"))).ok();
            let samples = match src {
                Some(bytes) if bytes.len() == 8 * dataset.len() => bytes
                    .chunks_exact(8)
                    .map(|c| Some(u64::from(u32::from_le_bytes([c[4], c[5], c[6], c[7]]))))
                    .collect(),
                _ => vec![None; dataset.len()],
            };
            Ok(Beats {
                records: names(&dataset, stem),
                samples,
                dataset,
            })
        }
        Input::Csv { path } => {
            let preset = p.preset().ok_or_else(|| {
                AgentError::Unsupported(format!(
                    "{}: CSV rows are cut with a named preprocessing; this model's is {}",
                    input.describe(),
                    p.describe()
                ))
            })?;
            let source = Source::Csv {
                path: path.clone(),
                patient_column: csv.patient_column,
                labels: csv.labels.unwrap_or(labels),
                preprocessing: preset,
                features: None,
            };
            let dataset = source.load(p, labels)?.remove(0);
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
            Ok(Beats {
                records: names(&dataset, &stem.unwrap_or_default()),
                samples: vec![None; dataset.len()],
                dataset,
            })
        }
    }
}

/// Each beat's patient name, or `fallback` for beats of no known patient.
fn names(dataset: &Dataset, fallback: &str) -> Vec<String> {
    (0..dataset.len())
        .map(|i| match dataset.patient_name(i) {
            "" => fallback.to_owned(),
            name => name.to_owned(),
        })
        .collect()
}

/// Rows classified per chunk (one thread's work item).
const CHUNK: usize = 2048;

/// The class probabilities of `rows` (`[n, classes]`), the rows split across threads.
pub fn probabilities(classifier: &Classifier, rows: &[f32]) -> Vec<f32> {
    let (len, classes) = (classifier.input_len(), classifier.classes());
    let mut out = vec![0.0; rows.len() / len * classes];
    out.par_chunks_mut(CHUNK * classes)
        .zip(rows.par_chunks(CHUNK * len))
        .for_each(|(out, rows)| {
            let mut scratch = Scratch::default();
            for (p, row) in out.chunks_exact_mut(classes).zip(rows.chunks_exact(len)) {
                classifier.logits_into(row, &mut scratch, p);
                softmax_assign(p);
            }
        });
    out
}

/// Arg-max of each row.
pub fn classes_of(probabilities: &[f32], classes: usize) -> Vec<usize> {
    medsplit_engine::model::predictions(probabilities, classes).collect()
}

/// Output format of `predict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `record,beat,sample,class,p_<class>…`, one line per beat after a header.
    Csv,
    /// One JSON object per beat and line: `{"record", "beat", "sample", "class",
    /// "probabilities"}` (`sample` null when the input does not say it).
    Json,
}

/// Writes one input's predictions (after [`csv_header`] for CSV): `beat` is the beat's index in
/// its input, `sample` its R-peak sample when known.
pub fn write_predictions(
    out: &mut dyn Write,
    format: Format,
    class_names: &[String],
    beats: &Beats,
    probabilities: &[f32],
) -> std::io::Result<()> {
    let classes = class_names.len();
    let predicted = classes_of(probabilities, classes);
    let mut line = String::new();
    for (i, (p, &class)) in probabilities
        .chunks_exact(classes)
        .zip(&predicted)
        .enumerate()
    {
        line.clear();
        let record = &beats.records[i];
        let sample = beats.samples[i];
        match format {
            Format::Csv => {
                use std::fmt::Write as _;
                let _ = write!(line, "{},{i},", csv_field(record));
                if let Some(s) = sample {
                    let _ = write!(line, "{s}");
                }
                let _ = write!(line, ",{}", class_names[class]);
                for v in p {
                    let _ = write!(line, ",{v}");
                }
                line.push('\n');
            }
            Format::Json => {
                let value = serde_json::json!({
                    "record": record,
                    "beat": i,
                    "sample": sample,
                    "class": class_names[class],
                    "probabilities": p,
                });
                line = serde_json::to_string(&value).expect("JSON");
                line.push('\n');
            }
        }
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// The CSV header line.
pub fn csv_header(class_names: &[String]) -> String {
    let mut header = String::from("record,beat,sample,class");
    for c in class_names {
        header.push_str(",p_");
        header.push_str(c);
    }
    header.push('\n');
    header
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The confusion matrix of the model on labelled beats.
pub fn confusion(
    card: &ModelCard,
    beats: &Beats,
    probabilities: &[f32],
) -> Result<Confusion, AgentError> {
    let classes = card.classes.len();
    let pairs = beats
        .dataset
        .labels()
        .iter()
        .map(|&l| usize::from(l))
        .zip(classes_of(probabilities, classes));
    Confusion::from_pairs(card.classes.clone(), pairs)
        .map_err(|e| AgentError::Config(format!("model card classes: {e}")))
}

/// A loaded model ready to classify.
pub struct Model {
    pub card: ModelCard,
    pub classifier: Classifier,
    pub trained: TrainedModel,
}

impl Model {
    /// Reads and checks an exported model directory.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let (trained, card) = crate::model_dir::read(dir)?;
        Ok(Self {
            classifier: Classifier::new(&trained),
            card,
            trained,
        })
    }
}

/// The inputs of `predict` and `evaluate`.
#[derive(Clone, Debug, clap::Args)]
pub struct InputArgs {
    /// The exported model's directory (model-card.json, model.safetensors, model.onnx); `predict`
    /// takes `--job` instead to classify through the coordinator.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// WFDB records (`DIR/100.hea` or `DIR/100`), beat files (`DIR/test.f32` or `DIR/test`),
    /// CSV files, or directories of records.
    #[arg(required_unless_present = "config")]
    pub inputs: Vec<PathBuf>,
    /// `evaluate`: also (or instead) the held-out test set of this agent configuration's
    /// sources (its `[split]`), cut with the model's preprocessing and label set: the
    /// hospital's own patients that the model never trained on. `predict --job`: the agent's
    /// configuration (its state directory and coordinator).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Only these records of a directory: names separated by commas, or `ds1` / `ds2` for the
    /// inter-patient split's MIT-BIH records.
    #[arg(long)]
    pub records: Option<String>,
    /// CSV inputs have a patient column after the label.
    #[arg(long)]
    pub csv_patient_column: bool,
    /// The label set of CSV inputs' integer labels (default: the model's).
    #[arg(long, value_parser = parse_labels)]
    pub csv_labels: Option<LabelSet>,
}

fn parse_labels(name: &str) -> Result<LabelSet, String> {
    LabelSet::ALL
        .into_iter()
        .find(|l| l.as_str() == name)
        .ok_or_else(|| format!("expected aami or papers, got {name:?}"))
}

impl InputArgs {
    /// The exported model's directory.
    pub fn model_dir(&self) -> anyhow::Result<&Path> {
        self.model
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("name the exported model's directory with --model"))
    }

    /// The record names of `--records`.
    pub fn record_names(&self) -> Option<Vec<String>> {
        let list = self.records.as_deref()?;
        Some(match list.to_ascii_lowercase().as_str() {
            "ds1" => wfdb::DS1.iter().map(|r| r.to_string()).collect(),
            "ds2" => wfdb::DS2.iter().map(|r| r.to_string()).collect(),
            _ => list
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    pub(crate) fn csv(&self) -> CsvOptions {
        CsvOptions {
            patient_column: self.csv_patient_column,
            labels: self.csv_labels,
        }
    }

    pub(crate) fn resolve(&self) -> Result<Vec<Input>, AgentError> {
        resolve(&self.inputs, self.record_names().as_deref())
    }
}

/// `medsplit-agent predict`: classifies every beat of the inputs, writing to `out` (standard
/// output when `None`); a summary goes to standard error.
pub fn predict(args: &InputArgs, format: Format, out: Option<&Path>) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let model = Model::open(args.model_dir()?)?;
    let inputs = args.resolve()?;
    let sink: Box<dyn Write> = match out {
        Some(path) => Box::new(
            std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut sink = std::io::BufWriter::with_capacity(1 << 20, sink);
    if format == Format::Csv {
        sink.write_all(csv_header(&model.card.classes).as_bytes())?;
    }
    let mut beats_total = 0;
    let mut stages = [0.0f64; 3];
    let mut lap = std::time::Instant::now();
    let mut stage = |i: usize| {
        stages[i] += lap.elapsed().as_secs_f64();
        lap = std::time::Instant::now();
    };
    for input in &inputs {
        let beats = load(input, &model.card.spec, args.csv())
            .map_err(|e| anyhow::anyhow!("{}: {e}", input.describe()))?;
        stage(0);
        let p = probabilities(&model.classifier, beats.dataset.rows());
        stage(1);
        write_predictions(&mut sink, format, &model.card.classes, &beats, &p)?;
        beats_total += beats.dataset.len();
        stage(2);
    }
    sink.flush()?;
    stage(2);
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "classified {beats_total} beats of {} input(s) in {seconds:.3} s ({:.0} beats/s): \
         reading and cutting {:.3} s, classifying {:.3} s, writing {:.3} s",
        inputs.len(),
        beats_total as f64 / seconds,
        stages[0],
        stages[1],
        stages[2]
    );
    Ok(())
}

/// `medsplit-agent evaluate`: the model's figures on each labelled input and on all of them
/// pooled, as text.
pub fn evaluate(args: &InputArgs) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let model = Model::open(args.model_dir()?)?;
    let inputs = match (&args.config, args.inputs.is_empty()) {
        (Some(_), true) => Vec::new(),
        _ => args.resolve()?,
    };
    let mut rows = Vec::new();
    for input in &inputs {
        let beats = load(input, &model.card.spec, args.csv())
            .map_err(|e| anyhow::anyhow!("{}: {e}", input.describe()))?;
        let p = probabilities(&model.classifier, beats.dataset.rows());
        let name = match input {
            Input::Wfdb { record, .. } => record.clone(),
            Input::Beats { stem, .. } => stem.clone(),
            Input::Csv { path } => path.display().to_string(),
        };
        rows.push((name, None, confusion(&model.card, &beats, &p)?));
    }
    if let Some(path) = &args.config {
        let data = crate::config::Config::load(path)?
            .load_data(&model.card.spec.preprocessing, model.card.spec.labels)?;
        let beats = Beats {
            records: Vec::new(),
            samples: Vec::new(),
            dataset: data.test.clone(),
        };
        let p = probabilities(&model.classifier, beats.dataset.rows());
        rows.push((
            "held-out test set".to_owned(),
            Some(data.evaluation()),
            confusion(&model.card, &beats, &p)?,
        ));
    }
    let pooled = Confusion::pooled(rows.iter().map(|(_, _, c)| c))?.expect("at least one input");
    let card = &model.card;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model: job {} ({}), {} preprocessing, label set {} ({}); trained at {} over {} round(s)",
        card.job_id,
        card.job_name,
        card.spec.preprocessing.describe(),
        card.spec.labels,
        card.classes.join(" "),
        card.hospitals.join(", "),
        card.rounds
    );
    let _ = writeln!(out, "inputs: {} ({} beats)\n", rows.len(), pooled.total());
    let mut report: Vec<ReportRow> = rows
        .iter()
        .map(|(name, kind, c)| ReportRow {
            name,
            kind: *kind,
            confusion: c,
        })
        .collect();
    let all = ReportRow {
        name: "all",
        kind: None,
        confusion: &pooled,
    };
    if report.len() > 1 {
        report.push(all);
    } else {
        report.truncate(0);
        report.push(ReportRow {
            name: &rows[0].0,
            kind: rows[0].1,
            ..all
        });
    }
    let last = report.len() - 1;
    out.push_str(&text_report("input", &report, &report[last..]));
    let _ = writeln!(out, "\nconfusion matrix ({}):", report[last].name);
    out.push_str(&confusion_text(&pooled));
    Ok(out)
}
