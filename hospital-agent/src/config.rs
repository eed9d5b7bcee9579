//! The agent's TOML configuration: where its state lives, which local data it trains on, and how
//! that data is divided into a training set and a held-out test set.
//!
//! ```toml
//! state_dir = "/var/lib/medsplit-agent"
//! # ca_cert = "/etc/medsplit/ca.pem"   # trust this CA for the coordinator's TLS certificate
//!
//! [[sources]]                          # any number, concatenated
//! format = "wfdb"                      # wfdb | beats | csv | synthetic
//! path = "/data/mitdb"
//! records = ["100", "208", "232"]
//!
//! [[sources]]
//! format = "beats"                     # the papers' pre-cut beat files
//! path = "/data/mitbih"
//! files = ["train", "test"]            # stems in `path`; `<stem>.src.u32` names each beat's record
//!
//! [split]                              # the local held-out test set
//! by = "patient"                       # patient (default) | beat
//! test_fraction = 0.2                  # or: test_patients = ["105", "208"]
//! seed = 0
//! ```
//!
//! Every job names the preprocessing and the label set its beats must have; [`Config::load_data`]
//! reads each source that way. Raw sources (`wfdb`, `synthetic`) are cut as the job says; files of
//! beats cut beforehand (`beats`, `csv`) can only give the preprocessing they were cut with, and
//! their labels only in their own set or one it maps into. When a source cannot give what the job
//! asks, the error is [`AgentError::Unsupported`].
//!
//! Under the patient split (the default) the test set holds whole patients: no patient has beats
//! on both sides, which is what a new patient would see. `split.by = "beat"` draws beats at random
//! instead (the same patients on both sides; every figure it gives is labelled beat-wise).
//!
//! A `shard = { index = 0, count = 3 }` table keeps every `count`-th patient (under a beat split:
//! every `count`-th beat) from `index` on, to divide one data set between demo hospitals.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use medsplit_engine::data::{self, CsvLayout, Dataset, UNKNOWN_PATIENT};
use medsplit_engine::metrics::EvalKind;
use medsplit_engine::preprocess::{LabelSet, Preprocessing, Preset};
use medsplit_engine::synthetic::Cohort;
use medsplit_engine::wfdb::{self, WfdbError};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::AgentError;

/// The agent's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the identity key and credential live (written by `medsplit-agent enrol`).
    pub state_dir: PathBuf,
    /// A PEM file of the CA that signed the coordinator's certificate.
    pub ca_cert: Option<PathBuf>,
    /// The hospital's data, concatenated in order.
    #[serde(default)]
    pub sources: Vec<Source>,
    /// How the test set is held out.
    #[serde(default)]
    pub split: Split,
    /// Keep only a share of the data (demos).
    pub shard: Option<Shard>,
    /// The most ε (at each job's δ) this agent spends on one job with differential privacy,
    /// whatever the coordinator says; visits past it are refused before any step.
    pub max_epsilon: Option<f64>,
    /// What this hospital trains (`[policy]`); the safe defaults when absent.
    #[serde(default)]
    pub policy: crate::policy::Policy,
}

/// One source of beats.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// The papers' beat files: `<path>/<stem>.f32` + `<stem>.labels`, labelled N L R A V, cut
    /// with the papers' preprocessing; `<stem>.src.u32`, when present, gives each beat's record
    /// (its patient).
    Beats {
        path: PathBuf,
        #[serde(default = "default_files")]
        files: Vec<String>,
    },
    /// One CSV file of beats cut beforehand: the integer label, the patient if `patient_column`,
    /// then the preprocessing's samples and features (see `engine::data::parse_csv_with`).
    Csv {
        path: PathBuf,
        /// A patient column right after the label.
        #[serde(default)]
        patient_column: bool,
        /// The label set the file's integer labels are in.
        #[serde(default = "papers_labels")]
        labels: LabelSet,
        /// The preset the file's rows were cut with.
        #[serde(default = "papers_preset")]
        preprocessing: Preset,
        /// Side features per row after the samples; the preset's (0 for `papers`, 4 RR features
        /// for `inter_patient`) when left out, and it must be that.
        features: Option<usize>,
    },
    /// Raw WFDB records (`.hea`, `.dat` format 212, `.atr`) in `path`, one patient each.
    Wfdb { path: PathBuf, records: Vec<String> },
    /// A generated cohort (demos and tests): `patients` records of `beats` beats in all, cut
    /// like raw records.
    Synthetic {
        patients: usize,
        beats: usize,
        seed: u64,
    },
}

fn default_files() -> Vec<String> {
    vec!["train".into(), "test".into()]
}

fn papers_labels() -> LabelSet {
    LabelSet::Papers
}

fn papers_preset() -> Preset {
    Preset::Papers
}

/// The most patients and beats a synthetic source may generate.
const MAX_SYNTHETIC_PATIENTS: usize = 10_000;
const MAX_SYNTHETIC_BEATS: usize = 2_000_000;

impl Source {
    /// How logs and error messages name the source: its format and path.
    pub fn describe(&self) -> String {
        match self {
            Self::Beats { path, .. } => format!("beats {}", path.display()),
            Self::Csv { path, .. } => format!("csv {}", path.display()),
            Self::Wfdb { path, .. } => format!("wfdb {}", path.display()),
            Self::Synthetic { patients, seed, .. } => {
                format!("synthetic ({patients} patients, seed {seed})")
            }
        }
    }

    /// The preprocessing and labels this source gives without conversion, for the start-up
    /// report: pre-cut files as they were cut and labelled, raw records with the
    /// `inter_patient` preset and AAMI classes.
    pub fn native(&self) -> (Preprocessing, LabelSet) {
        match self {
            Self::Beats { .. } => (Preprocessing::papers(), LabelSet::Papers),
            Self::Csv {
                labels,
                preprocessing,
                ..
            } => (preprocessing.preprocessing(), *labels),
            Self::Wfdb { .. } | Self::Synthetic { .. } => {
                (Preprocessing::inter_patient(), LabelSet::Aami)
            }
        }
    }

    fn check(&self) -> Result<(), AgentError> {
        let config = |message: String| Err(AgentError::Config(message));
        match self {
            Self::Beats { files, .. } if files.is_empty() => config(format!(
                "{}: files is empty: name at least one stem",
                self.describe()
            )),
            Self::Wfdb { records, .. } if records.is_empty() => config(format!(
                "{}: records is empty: name at least one record",
                self.describe()
            )),
            Self::Csv {
                preprocessing,
                features: Some(features),
                ..
            } if *features != preprocessing.preprocessing().feature_len() => config(format!(
                "{}: features = {features}, but rows cut with the {} preprocessing have {} \
                 features",
                self.describe(),
                preprocessing.as_str(),
                preprocessing.preprocessing().feature_len()
            )),
            Self::Synthetic {
                patients, beats, ..
            } => {
                if !(1..=MAX_SYNTHETIC_PATIENTS).contains(patients) {
                    return config(format!(
                        "synthetic: patients must be between 1 and {MAX_SYNTHETIC_PATIENTS}, \
                         got {patients}"
                    ));
                }
                if *beats > MAX_SYNTHETIC_BEATS || *beats < 3 * patients {
                    return config(format!(
                        "synthetic: beats must be between 3 per patient ({}) and \
                         {MAX_SYNTHETIC_BEATS}, got {beats}",
                        3 * patients
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The source's beats cut with `preprocessing` and labelled in `labels`, as one dataset
    /// per file.
    pub(crate) fn load(
        &self,
        preprocessing: &Preprocessing,
        labels: LabelSet,
    ) -> Result<Vec<Dataset>, AgentError> {
        let cut_with = |preset: Preset| -> Result<(), AgentError> {
            if preprocessing.preset() == Some(preset) {
                return Ok(());
            }
            Err(AgentError::Unsupported(format!(
                "{}: its beats were cut with the {} preprocessing; this job asks for {}",
                self.describe(),
                preset.as_str(),
                preprocessing.describe()
            )))
        };
        match self {
            Self::Beats { path, files } => {
                cut_with(Preset::Papers)?;
                let papers = Preprocessing::papers();
                files
                    .iter()
                    .map(|stem| {
                        let beats = data::load_beats(
                            path,
                            stem,
                            papers.beat_len,
                            LabelSet::Papers.num_classes(),
                        )?;
                        self.relabel(beats, LabelSet::Papers, labels)
                    })
                    .collect()
            }
            Self::Csv {
                path,
                patient_column,
                labels: file_labels,
                preprocessing: preset,
                ..
            } => {
                cut_with(*preset)?;
                let layout = CsvLayout {
                    patient_column: *patient_column,
                    beat_len: preprocessing.beat_len,
                    feature_len: preprocessing.feature_len(),
                };
                let beats = data::load_csv_with(path, layout, file_labels.num_classes())?;
                Ok(vec![self.relabel(beats, *file_labels, labels)?])
            }
            Self::Wfdb { path, records } => {
                let beats = wfdb::load_records_with(path, records, preprocessing, labels)
                    .map_err(|e| self.cut_error(e, preprocessing))?;
                Ok(vec![beats])
            }
            Self::Synthetic {
                patients,
                beats,
                seed,
            } => {
                let cohort = Cohort {
                    patients: *patients,
                    beats: *beats,
                    seed: *seed,
                };
                let beats = cohort
                    .load(preprocessing, labels)
                    .map_err(|e| self.cut_error(e, preprocessing))?;
                Ok(vec![beats])
            }
        }
    }

    /// Beats labelled in `from` as `to` asks: the same set as is, the papers' classes mapped into
    /// AAMI; AAMI classes cannot be split back into the papers' symbols.
    fn relabel(&self, beats: Dataset, from: LabelSet, to: LabelSet) -> Result<Dataset, AgentError> {
        match (from, to) {
            _ if from == to => Ok(beats),
            (LabelSet::Papers, _) => {
                let map: Vec<Option<u8>> = (0..from.num_classes() as u8)
                    .map(|class| to.from_papers(class))
                    .collect();
                Ok(beats.relabel(&map, to.num_classes())?)
            }
            (LabelSet::Aami, _) => Err(AgentError::Unsupported(format!(
                "{}: its labels are the AAMI classes ({}), which cannot give the {} label set \
                 ({}) this job asks for",
                self.describe(),
                from.class_names().join(" "),
                to,
                to.class_names().join(" ")
            ))),
        }
    }

    /// A record that the job's preprocessing cannot cut (no such lead, too short for the
    /// window, ...) is the job's ask this data cannot give; reading errors stay what they are.
    fn cut_error(&self, error: WfdbError, preprocessing: &Preprocessing) -> AgentError {
        match error {
            WfdbError::Extraction { .. } | WfdbError::InvalidArgument(_) => {
                AgentError::Unsupported(format!(
                    "{}: cannot cut its records with the {} preprocessing: {error}",
                    self.describe(),
                    preprocessing.describe()
                ))
            }
            other => AgentError::Wfdb(other),
        }
    }

    /// Why a file of this source without patients cannot serve a patient split.
    fn without_patients(&self, file: usize) -> String {
        let remedy = "or set split.by = \"beat\" for a beat-wise split (the same patients in \
                      training and test)";
        match self {
            Self::Beats { path, files } => format!(
                "{}: {} has no patient information: add {} (each beat's record), {remedy}",
                self.describe(),
                files[file],
                path.join(format!("{}.src.u32", files[file])).display()
            ),
            Self::Csv { .. } => format!(
                "{}: no patient column: add one after the label and set patient_column = true, \
                 {remedy}",
                self.describe()
            ),
            _ => format!("{}: no patient information, {remedy}", self.describe()),
        }
    }
}

/// Which kind of held-out test set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitBy {
    /// Whole patients go to the test set.
    #[default]
    Patient,
    /// Beats are drawn at random: the same patients on both sides.
    Beat,
}

/// The `[split]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    #[serde(default)]
    pub by: SplitBy,
    /// The share of patients (or beats) held out; 0.2 when neither it nor `test_patients` is
    /// given.
    pub test_fraction: Option<f64>,
    /// Shuffles patients (or beats) before the test share is taken.
    #[serde(default)]
    pub seed: u64,
    /// Exactly these patients are the test set (patient split only): record names, the record
    /// numbers of `.src.u32` files, CSV patient texts, synthetic patient names.
    pub test_patients: Option<Vec<String>>,
}

/// The test fraction when the configuration gives none.
pub const DEFAULT_TEST_FRACTION: f64 = 0.2;

impl Split {
    /// The share held out.
    pub fn fraction(&self) -> f64 {
        self.test_fraction.unwrap_or(DEFAULT_TEST_FRACTION)
    }

    fn kind(&self) -> EvalKind {
        match self.by {
            SplitBy::Patient => EvalKind::Patient,
            SplitBy::Beat => EvalKind::Beat,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// The hospital's local data for one job: what it trains on and what it measures on.
pub struct LocalData {
    pub train: Dataset,
    pub test: Dataset,
    /// Which kind of split made the test set.
    pub kind: EvalKind,
}

impl std::fmt::Debug for LocalData {
    /// Sizes and patients, not the beats.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalData")
            .field("train_beats", &self.train.len())
            .field("train_patients", &self.train.patient_names())
            .field("test_beats", &self.test.len())
            .field("test_patients", &self.test.patient_names())
            .field("kind", &self.kind)
            .finish()
    }
}

impl LocalData {
    /// Which kind of split made the test set; every evaluation carries it.
    pub fn evaluation(&self) -> EvalKind {
        self.kind
    }
}

/// One source's beats, for the start-up report.
#[derive(Clone, Debug)]
pub struct SourceSummary {
    /// [`Source::describe`].
    pub source: String,
    /// The preprocessing the counts were taken with ([`Preprocessing::describe`]).
    pub preprocessing: String,
    pub labels: LabelSet,
    pub beats: usize,
    pub patients: usize,
    /// Beats per class, in the label set's order.
    pub class_counts: Vec<(&'static str, usize)>,
    /// Why a raw source could not be cut with the `inter_patient` preset (its counts are then
    /// the papers' cut): jobs that ask for that preprocessing will be refused.
    pub unsupported: Option<String>,
}

/// The held-out split, for the start-up report.
#[derive(Clone, Debug)]
pub struct SplitSummary {
    pub kind: EvalKind,
    pub train_beats: usize,
    pub test_beats: usize,
    /// Patients with beats in training (under a beat split, every patient is on both sides).
    pub train_patients: usize,
    /// The test patients by name (all patients under a beat split).
    pub test_patients: Vec<String>,
}

/// What the agent logs at start-up: each source's beats and classes, then the split.
#[derive(Clone, Debug)]
pub struct Survey {
    pub sources: Vec<SourceSummary>,
    pub split: SplitSummary,
}

/// Which beats of each part go to training and which to test.
struct Division {
    /// Per part: (train indices, test indices).
    sides: Vec<(Vec<usize>, Vec<usize>)>,
    test_patients: Vec<String>,
    train_patients: usize,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
        let config: Config = toml::from_str(&text)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), AgentError> {
        if self.sources.is_empty() {
            return Err(AgentError::Config(
                "no [[sources]]: name at least one".into(),
            ));
        }
        for source in &self.sources {
            source.check()?;
        }
        self.policy.validate().map_err(AgentError::Config)?;
        if let Some(eps) = self.max_epsilon
            && !(eps.is_finite() && eps > 0.0)
        {
            return Err(AgentError::Config(format!(
                "max_epsilon must be a positive number, got {eps}"
            )));
        }
        let split = &self.split;
        if let Some(fraction) = split.test_fraction
            && !(fraction > 0.0 && fraction < 1.0)
        {
            return Err(AgentError::Config(format!(
                "split.test_fraction must be in (0, 1), got {fraction}"
            )));
        }
        if let Some(named) = &split.test_patients {
            if split.by == SplitBy::Beat {
                return Err(AgentError::Config(
                    "split.test_patients names whole patients: it needs split.by = \"patient\""
                        .into(),
                ));
            }
            if split.test_fraction.is_some() {
                return Err(AgentError::Config(
                    "split: give test_fraction or test_patients, not both".into(),
                ));
            }
            if named.is_empty() {
                return Err(AgentError::Config(
                    "split.test_patients is empty: name at least one patient, or leave it out \
                     for a test_fraction of patients"
                        .into(),
                ));
            }
        }
        if let Some(s) = self.shard
            && (s.count == 0 || s.index >= s.count)
        {
            return Err(AgentError::Config(format!(
                "shard: index {} must be below count {}",
                s.index, s.count
            )));
        }
        Ok(())
    }

    /// Reads every source cut with `preprocessing` and labelled in `labels`, and splits off the
    /// local test set as `[split]` says.
    ///
    /// Errors: [`AgentError::Unsupported`] when a source cannot give the preprocessing or the
    /// label set; [`AgentError::Config`] when the split cannot be made (a source without
    /// patients under a patient split, too few patients, an unknown test patient).
    pub fn load_data(
        &self,
        preprocessing: &Preprocessing,
        labels: LabelSet,
    ) -> Result<LocalData, AgentError> {
        let parts = self.load_parts(preprocessing, labels)?;
        let all = Dataset::concat(&parts)?;
        let division = self.divide(std::slice::from_ref(&all))?;
        let (train, test) = &division.sides[0];
        let data = LocalData {
            train: all.select(train)?,
            test: all.select(test)?,
            kind: self.split.kind(),
        };
        if data.kind == EvalKind::Patient {
            // The promise of a patient-wise evaluation: no patient on both sides.
            let test: HashSet<&String> = data.test.patient_names().iter().collect();
            if let Some(shared) = data.train.patient_names().iter().find(|p| test.contains(p)) {
                return Err(AgentError::Config(format!(
                    "patient {shared:?} has beats in both the training and the test set"
                )));
            }
        }
        Ok(data)
    }

    /// The start-up report: each source read as it is ([`Source::native`]), and the split.
    pub fn survey(&self) -> Result<Survey, AgentError> {
        let mut parts = Vec::new();
        let mut sources = Vec::new();
        for source in &self.sources {
            let (mut preprocessing, mut labels) = source.native();
            let mut unsupported = None;
            let files = match source.load(&preprocessing, labels) {
                // Raw records that the inter_patient preset cannot cut (e.g. without an MLII
                // lead) may still serve jobs of the papers' preprocessing.
                Err(AgentError::Unsupported(reason))
                    if matches!(source, Source::Wfdb { .. } | Source::Synthetic { .. }) =>
                {
                    unsupported = Some(reason);
                    (preprocessing, labels) = (Preprocessing::papers(), LabelSet::Papers);
                    source.load(&preprocessing, labels)?
                }
                other => other?,
            };
            let all = Dataset::concat(&files)?;
            let class_counts = labels.class_names().into_iter().zip(all.class_counts());
            sources.push(SourceSummary {
                source: source.describe(),
                preprocessing: preprocessing.describe(),
                labels,
                beats: all.len(),
                patients: all.patient_names().len(),
                class_counts: class_counts.collect(),
                unsupported,
            });
            if self.split.by == SplitBy::Patient {
                self.require_patients(source, &files)?;
            }
            parts.push(all);
        }
        let division = self.divide(&parts)?;
        Ok(Survey {
            sources,
            split: SplitSummary {
                kind: self.split.kind(),
                train_beats: division.sides.iter().map(|s| s.0.len()).sum(),
                test_beats: division.sides.iter().map(|s| s.1.len()).sum(),
                train_patients: division.train_patients,
                test_patients: division.test_patients,
            },
        })
    }

    /// Every source's files cut and labelled as the job asks, checked to have patients when
    /// the split is by patient.
    fn load_parts(
        &self,
        preprocessing: &Preprocessing,
        labels: LabelSet,
    ) -> Result<Vec<Dataset>, AgentError> {
        let mut parts = Vec::new();
        for source in &self.sources {
            let files = source.load(preprocessing, labels)?;
            if self.split.by == SplitBy::Patient {
                self.require_patients(source, &files)?;
            }
            parts.extend(files);
        }
        Ok(parts)
    }

    fn require_patients(&self, source: &Source, files: &[Dataset]) -> Result<(), AgentError> {
        match files
            .iter()
            .position(|f| f.patient_names().iter().any(|p| p == UNKNOWN_PATIENT))
        {
            Some(file) => Err(AgentError::Config(format!(
                "split.by = \"patient\": {}",
                source.without_patients(file)
            ))),
            None => Ok(()),
        }
    }

    /// Divides the beats of `parts` (any shapes) into training and test as `[split]` and
    /// `shard` say. Patients of the same name in two parts are one patient.
    fn divide(&self, parts: &[Dataset]) -> Result<Division, AgentError> {
        match self.split.by {
            SplitBy::Beat => self.divide_beats(parts),
            SplitBy::Patient => self.divide_patients(parts),
        }
    }

    fn divide_beats(&self, parts: &[Dataset]) -> Result<Division, AgentError> {
        // Global beat numbers: part by part.
        let mut beats: Vec<(usize, usize)> = parts
            .iter()
            .enumerate()
            .flat_map(|(p, part)| (0..part.len()).map(move |i| (p, i)))
            .collect();
        if let Some(s) = self.shard {
            beats = beats
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % s.count == s.index)
                .map(|(_, b)| b)
                .collect();
        }
        beats.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(self.split.seed));
        let test_len = ((beats.len() as f64) * self.split.fraction()).round() as usize;
        if test_len == 0 || test_len == beats.len() {
            return Err(AgentError::Config(format!(
                "{} beats cannot be split into non-empty training and test sets with \
                 split.test_fraction {}",
                beats.len(),
                self.split.fraction()
            )));
        }
        let mut sides = vec![(Vec::new(), Vec::new()); parts.len()];
        for (n, &(p, i)) in beats.iter().enumerate() {
            if n < test_len {
                sides[p].1.push(i);
            } else {
                sides[p].0.push(i);
            }
        }
        let mut names: Vec<&String> = parts.iter().flat_map(|p| p.patient_names()).collect();
        names.sort();
        names.dedup();
        Ok(Division {
            sides,
            train_patients: names.len(),
            test_patients: names.into_iter().cloned().collect(),
        })
    }

    fn divide_patients(&self, parts: &[Dataset]) -> Result<Division, AgentError> {
        // Every patient by name, in order of first appearance.
        let mut names: Vec<String> = Vec::new();
        let ids: Vec<Vec<usize>> = parts
            .iter()
            .map(|part| {
                part.patient_names()
                    .iter()
                    .map(|name| match names.iter().position(|n| n == name) {
                        Some(id) => id,
                        None => {
                            names.push(name.clone());
                            names.len() - 1
                        }
                    })
                    .collect()
            })
            .collect();
        let mut kept: Vec<usize> = (0..names.len()).collect();
        let mut shard_note = String::new();
        if let Some(s) = self.shard {
            kept.retain(|i| i % s.count == s.index);
            shard_note = format!(" (shard {} of {} keeps {})", s.index, s.count, kept.len());
        }
        if kept.len() < 2 {
            return Err(AgentError::Config(format!(
                "split.by = \"patient\" needs at least 2 patients, one for training and one for \
                 test; the sources give {}{shard_note}",
                names.len()
            )));
        }
        let test: Vec<usize> = match &self.split.test_patients {
            Some(named) => {
                let mut test = Vec::with_capacity(named.len());
                for name in named {
                    match kept.iter().find(|&&i| names[i] == *name) {
                        Some(&i) if !test.contains(&i) => test.push(i),
                        Some(_) => {}
                        None => {
                            let known: Vec<&str> =
                                kept.iter().map(|&i| names[i].as_str()).collect();
                            return Err(AgentError::Config(format!(
                                "split.test_patients: no patient {name:?} in the sources{shard_note}; \
                                 their patients are: {}",
                                known.join(", ")
                            )));
                        }
                    }
                }
                if test.len() == kept.len() {
                    return Err(AgentError::Config(format!(
                        "split.test_patients names all {} patients: none is left for training",
                        kept.len()
                    )));
                }
                test
            }
            None => {
                let mut shuffled = kept.clone();
                shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(self.split.seed));
                let count = ((kept.len() as f64) * self.split.fraction()).round() as usize;
                shuffled.truncate(count.clamp(1, kept.len() - 1));
                shuffled
            }
        };
        let mut side = vec![None; names.len()];
        for &i in &kept {
            side[i] = Some(test.contains(&i));
        }
        let sides = parts
            .iter()
            .zip(&ids)
            .map(|(part, ids)| {
                let (mut train, mut tested) = (Vec::new(), Vec::new());
                for (beat, &patient) in part.patients().iter().enumerate() {
                    match side[ids[patient as usize]] {
                        Some(true) => tested.push(beat),
                        Some(false) => train.push(beat),
                        None => {}
                    }
                }
                (train, tested)
            })
            .collect();
        Ok(Division {
            sides,
            train_patients: kept.len() - test.len(),
            test_patients: test.iter().map(|&i| names[i].clone()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, AgentError> {
        let config: Config = toml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    const COHORT: &str = "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"synthetic\"\n\
                          patients = 6\nbeats = 300\nseed = 1\n";

    fn papers(config: &Config) -> Result<LocalData, AgentError> {
        config.load_data(&Preprocessing::papers(), LabelSet::Papers)
    }

    fn inter_patient(config: &Config) -> Result<LocalData, AgentError> {
        config.load_data(&Preprocessing::inter_patient(), LabelSet::Aami)
    }

    fn names(data: &Dataset) -> Vec<&str> {
        data.patient_names().iter().map(String::as_str).collect()
    }

    /// A temporary directory of beat files: `<stem>.f32` of `labels.len()` beats of 128
    /// samples, `<stem>.labels`, and `<stem>.src.u32` when `records` is given.
    struct BeatFiles(PathBuf);

    impl BeatFiles {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("medsplit-agent-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, stem: &str, labels: &[u8], records: Option<&[u32]>) {
            let samples: Vec<u8> = (0..labels.len() * 128)
                .flat_map(|i| ((i % 128) as f32 / 128.0).to_le_bytes())
                .collect();
            std::fs::write(self.0.join(format!("{stem}.f32")), samples).unwrap();
            std::fs::write(self.0.join(format!("{stem}.labels")), labels).unwrap();
            if let Some(records) = records {
                let src: Vec<u8> = records
                    .iter()
                    .enumerate()
                    .flat_map(|(i, r)| [r.to_le_bytes(), (i as u32).to_le_bytes()].concat())
                    .collect();
                std::fs::write(self.0.join(format!("{stem}.src.u32")), src).unwrap();
            }
        }

        fn config(&self, files: &str, split: &str) -> Config {
            parse(&format!(
                "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"beats\"\npath = {:?}\n\
                 files = {files}\n{split}",
                self.0.display().to_string()
            ))
            .unwrap()
        }
    }

    impl Drop for BeatFiles {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_default_split_holds_out_whole_patients() {
        let config = parse(&format!("{COHORT}[split]\nseed = 3\n")).unwrap();
        for data in [papers(&config).unwrap(), inter_patient(&config).unwrap()] {
            assert_eq!(data.evaluation(), EvalKind::Patient);
            let (train, test) = (names(&data.train), names(&data.test));
            // round(0.2 x 6) = 1 test patient, 5 in training, none on both sides.
            assert_eq!((train.len(), test.len()), (5, 1), "{train:?} {test:?}");
            assert!(
                train.iter().all(|p| !test.contains(p)),
                "{train:?} {test:?}"
            );
            assert!(!data.train.is_empty() && !data.test.is_empty());
        }
        let data = inter_patient(&config).unwrap();
        // Every beat of the cohort is on one side or the other; rows as the job cuts them.
        assert_eq!(data.train.len() + data.test.len(), 300);
        assert_eq!(data.train.feature_len(), 4);
        assert_eq!(papers(&config).unwrap().train.feature_len(), 0);
        // The same seed, the same test patient; the shuffle depends on it.
        assert_eq!(
            names(&data.test),
            names(&inter_patient(&config).unwrap().test)
        );
        let tests: HashSet<String> = (0..8)
            .map(|seed| {
                let config = parse(&format!("{COHORT}[split]\nseed = {seed}\n")).unwrap();
                inter_patient(&config).unwrap().test.patient_names()[0].clone()
            })
            .collect();
        assert!(tests.len() > 1, "{tests:?}");
        // A larger fraction holds out more patients, never all of them.
        let half = parse(&format!("{COHORT}[split]\ntest_fraction = 0.5\n")).unwrap();
        assert_eq!(inter_patient(&half).unwrap().test.patient_names().len(), 3);
        let most = parse(&format!("{COHORT}[split]\ntest_fraction = 0.99\n")).unwrap();
        assert_eq!(inter_patient(&most).unwrap().train.patient_names().len(), 1);
    }

    #[test]
    fn named_test_patients_are_the_test_set_and_unknown_ones_are_refused() {
        let config = parse(&format!(
            "{COHORT}[split]\ntest_patients = [\"syn1-4\", \"syn1-0\"]\n"
        ))
        .unwrap();
        let data = inter_patient(&config).unwrap();
        assert_eq!(names(&data.test), ["syn1-0", "syn1-4"]);
        assert_eq!(names(&data.train), ["syn1-1", "syn1-2", "syn1-3", "syn1-5"]);
        assert_eq!(data.evaluation(), EvalKind::Patient);

        let unknown = parse(&format!("{COHORT}[split]\ntest_patients = [\"105\"]\n")).unwrap();
        let err = inter_patient(&unknown).unwrap_err().to_string();
        assert!(
            err.contains("split.test_patients")
                && err.contains("\"105\"")
                && err.contains("syn1-0, syn1-1, syn1-2, syn1-3, syn1-4, syn1-5"),
            "{err}"
        );
        let all = (0..6).map(|i| format!("\"syn1-{i}\"")).collect::<Vec<_>>();
        let everyone = parse(&format!(
            "{COHORT}[split]\ntest_patients = [{}]\n",
            all.join(", ")
        ))
        .unwrap();
        let err = inter_patient(&everyone).unwrap_err().to_string();
        assert!(err.contains("none is left for training"), "{err}");
    }

    #[test]
    fn a_beat_split_only_when_asked_and_labelled_so() {
        let config = parse(&format!(
            "{COHORT}[split]\nby = \"beat\"\ntest_fraction = 0.2\nseed = 3\n"
        ))
        .unwrap();
        let data = inter_patient(&config).unwrap();
        assert_eq!(data.evaluation(), EvalKind::Beat);
        assert_eq!((data.train.len(), data.test.len()), (240, 60));
        // Drawn at random: patients on both sides.
        assert_eq!(data.train.patient_names().len(), 6);
        assert!(data.test.patient_names().len() > 1);
        // A shard of a beat split keeps every count-th beat.
        let sharded = parse(&format!(
            "{COHORT}[split]\nby = \"beat\"\n[shard]\nindex = 1\ncount = 5\n"
        ))
        .unwrap();
        let data = inter_patient(&sharded).unwrap();
        assert_eq!(data.train.len() + data.test.len(), 60);
        // A shard of a patient split keeps every count-th patient.
        let sharded = parse(&format!("{COHORT}[shard]\nindex = 1\ncount = 3\n")).unwrap();
        let data = inter_patient(&sharded).unwrap();
        let mut kept = [names(&data.train), names(&data.test)].concat();
        kept.sort();
        assert_eq!(kept, ["syn1-1", "syn1-4"]);
        assert_eq!(data.evaluation(), EvalKind::Patient);
    }

    #[test]
    fn patient_splits_that_cannot_be_made_are_refused_with_the_reason() {
        let files = BeatFiles::new("nosrc");
        files.write("train", &[0, 1, 2, 3, 4, 0], None);
        let err = papers(&files.config("[\"train\"]", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train has no patient information")
                && err.contains("train.src.u32")
                && err.contains("split.by = \"beat\""),
            "{err}"
        );
        // Asked for explicitly, a beat split of the same files works.
        let beat = papers(&files.config(
            "[\"train\"]",
            "[split]\nby = \"beat\"\ntest_fraction = 0.5\n",
        ))
        .unwrap();
        assert_eq!(
            (beat.train.len(), beat.test.len(), beat.kind),
            (3, 3, EvalKind::Beat)
        );

        // One patient cannot be on both sides of a patient split.
        let one = parse(
            "state_dir = \"/x\"\n[[sources]]\nformat = \"synthetic\"\npatients = 1\nbeats = 50\n\
             seed = 1\n",
        )
        .unwrap();
        let err = inter_patient(&one).unwrap_err().to_string();
        assert!(
            err.contains("at least 2 patients") && err.contains("give 1"),
            "{err}"
        );
        let sharded = parse(&format!("{COHORT}[shard]\nindex = 5\ncount = 6\n")).unwrap();
        let err = inter_patient(&sharded).unwrap_err().to_string();
        assert!(err.contains("shard 5 of 6 keeps 1"), "{err}");

        // A CSV without a patient column.
        let path = files.0.join("beats.csv");
        let row = |label: u8, patient: Option<&str>| {
            let mut fields = vec![label.to_string()];
            fields.extend(patient.map(str::to_owned));
            fields.extend((0..128).map(|i| format!("{}", i as f32 / 128.0)));
            fields.join(",")
        };
        let plain: Vec<String> = (0..6).map(|i| row(i % 5, None)).collect();
        std::fs::write(&path, plain.join("\n")).unwrap();
        let csv = |keys: &str, split: &str| {
            parse(&format!(
                "state_dir = \"/x\"\n[[sources]]\nformat = \"csv\"\npath = {:?}\n{keys}\n{split}",
                path.display().to_string()
            ))
            .unwrap()
        };
        let err = papers(&csv("", "")).unwrap_err().to_string();
        assert!(
            err.contains("no patient column") && err.contains("patient_column = true"),
            "{err}"
        );
        let with: Vec<String> = (0..6)
            .map(|i| row(i % 5, Some(["a", "b", "c"][usize::from(i) % 3])))
            .collect();
        std::fs::write(&path, with.join("\n")).unwrap();
        let data = papers(&csv("patient_column = true", "")).unwrap();
        assert_eq!(
            data.train.patient_names().len() + data.test.patient_names().len(),
            3
        );
        // Rows cut with the papers' preprocessing cannot give inter_patient rows; AAMI labels
        // cannot give the papers' classes.
        let err = inter_patient(&csv("patient_column = true", "")).unwrap_err();
        assert!(matches!(err, AgentError::Unsupported(_)), "{err}");
        assert!(
            err.to_string()
                .contains("cut with the papers preprocessing; this job asks for inter_patient"),
            "{err}"
        );
        let aami = csv("patient_column = true\nlabels = \"aami\"", "");
        let err = papers(&aami).unwrap_err();
        assert!(matches!(err, AgentError::Unsupported(_)), "{err}");
        assert!(
            err.to_string().contains("cannot give the papers label set"),
            "{err}"
        );
        let labels = aami
            .load_data(&Preprocessing::papers(), LabelSet::Aami)
            .unwrap();
        assert_eq!(labels.train.num_classes(), 5);
        let err = parse(
            "state_dir = \"/x\"\n[[sources]]\nformat = \"csv\"\npath = \"/d.csv\"\n\
             preprocessing = \"inter_patient\"\nfeatures = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("features = 0") && err.contains("have 4 features"),
            "{err}"
        );
    }

    #[test]
    fn beat_files_give_the_papers_preprocessing_in_either_label_set() {
        let files = BeatFiles::new("src");
        // N L R A V, then the same record's beats in a second file.
        files.write(
            "train",
            &[0, 1, 2, 3, 4, 0],
            Some(&[100, 100, 101, 101, 102, 102]),
        );
        files.write("test", &[4, 3, 2, 1], Some(&[100, 101, 102, 103]));
        let config = files.config(
            "[\"train\", \"test\"]",
            "[split]\ntest_patients = [\"101\"]\n",
        );
        let data = papers(&config).unwrap();
        assert_eq!(names(&data.test), ["101"]);
        // Record 101's beats of both files are one patient: all in test.
        assert_eq!(data.test.labels(), &[2, 3, 3]);
        assert_eq!(names(&data.train), ["100", "102", "103"]);
        // Into AAMI: N L R are N, A is S, V is V.
        let aami = config
            .load_data(&Preprocessing::papers(), LabelSet::Aami)
            .unwrap();
        assert_eq!(aami.test.labels(), &[0, 1, 1]);
        assert_eq!(aami.train.labels(), &[0, 0, 2, 0, 2, 0, 0]);
        // Any other preprocessing: the beat files cannot give it.
        let err = inter_patient(&config).unwrap_err();
        assert!(matches!(err, AgentError::Unsupported(_)), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("beats ")
                && message.contains(
                    "cut with the papers preprocessing; this job asks for \
                                     inter_patient"
                ),
            "{message}"
        );
    }

    #[test]
    fn the_survey_reports_every_source_and_the_split() {
        let files = BeatFiles::new("survey");
        files.write("train", &[0, 1, 3, 4], Some(&[100, 100, 101, 102]));
        let config = parse(&format!(
            "{COHORT}[[sources]]\nformat = \"beats\"\npath = {:?}\nfiles = [\"train\"]\n\
             [split]\ntest_patients = [\"101\", \"syn1-2\"]\n",
            files.0.display().to_string()
        ))
        .unwrap();
        let survey = config.survey().unwrap();
        let [synthetic, beats] = &survey.sources[..] else {
            panic!("{survey:?}")
        };
        assert_eq!((synthetic.beats, synthetic.patients), (300, 6));
        assert_eq!(synthetic.preprocessing, "inter_patient");
        assert_eq!(synthetic.class_counts[0].0, "N");
        assert_eq!(
            synthetic.class_counts.iter().map(|c| c.1).sum::<usize>(),
            300
        );
        assert_eq!(
            (beats.beats, beats.patients, beats.labels),
            (4, 3, LabelSet::Papers)
        );
        assert_eq!(
            beats.class_counts,
            [("N", 1), ("L", 1), ("R", 0), ("A", 1), ("V", 1)]
        );
        let split = &survey.split;
        assert_eq!(split.kind, EvalKind::Patient);
        assert_eq!(split.test_patients, ["101", "syn1-2"]);
        assert_eq!(split.train_patients, 7);
        assert_eq!(split.test_beats, 1 + 50);
        assert_eq!(split.train_beats, 300 + 4 - 51);
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cohort = |extra: &str| format!("{COHORT}{extra}");
        let synthetic = |keys: &str| {
            format!("state_dir = \"/x\"\n[[sources]]\nformat = \"synthetic\"\n{keys}\n")
        };
        for (text, needle) in [
            ("state_dir = \"/x\"\n".to_owned(), "no [[sources]]"),
            (
                "state_dir = \"/x\"\n[[sources]]\nformat = \"hdf5\"\npath = \"/d\"\n".to_owned(),
                "hdf5",
            ),
            ("state_dir = \"/x\"\ncolour = 1\n".to_owned(), "colour"),
            (cohort("[split]\ntest_fraction = 1.5\n"), "test_fraction"),
            (cohort("[shard]\nindex = 3\ncount = 3\n"), "shard"),
            (cohort("[split]\nby = \"record\"\n"), "record"),
            (
                cohort("[split]\nby = \"beat\"\ntest_patients = [\"a\"]\n"),
                "needs split.by = \"patient\"",
            ),
            (
                cohort("[split]\ntest_fraction = 0.3\ntest_patients = [\"a\"]\n"),
                "not both",
            ),
            (cohort("[split]\ntest_patients = []\n"), "test_patients is empty"),
            (synthetic("samples = 5\nseed = 1"), "samples"),
            (
                synthetic("patients = 4\nbeats = 5\nseed = 1"),
                "beats must be between 3 per patient (12)",
            ),
            (
                synthetic("patients = 0\nbeats = 5\nseed = 1"),
                "patients must be between 1",
            ),
            (
                "state_dir = \"/x\"\n[[sources]]\nformat = \"wfdb\"\npath = \"/d\"\nrecords = []\n"
                    .to_owned(),
                "records is empty",
            ),
            (
                "state_dir = \"/x\"\n[[sources]]\nformat = \"csv\"\npath = \"/d\"\nlabels = \"lead\"\n"
                    .to_owned(),
                "lead",
            ),
        ] {
            let err = parse(&text).expect_err(&text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    fn mitdb_raw() -> Option<PathBuf> {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/mitdb-raw"
        ));
        if dir.join("100.hea").is_file() {
            Some(dir.to_owned())
        } else {
            eprintln!("skipping: ../shared/data/mitdb-raw not found");
            None
        }
    }

    #[test]
    fn raw_wfdb_records_are_a_data_source() {
        let Some(dir) = mitdb_raw() else { return };
        let config = parse(&format!(
            "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"wfdb\"\npath = {:?}\nrecords = [\"100\", \"208\", \"232\"]\n",
            dir.display().to_string()
        ))
        .unwrap();
        let data = papers(&config).unwrap();
        // 2,270 + 2,526 + 1,765 N/L/R/A/V beats in the three records.
        assert_eq!(data.train.len() + data.test.len(), 6561);
        assert_eq!(data.train.beat_len(), 128);
    }

    #[test]
    fn raw_wfdb_records_split_by_record() {
        let Some(dir) = mitdb_raw() else { return };
        let config = parse(&format!(
            "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"wfdb\"\npath = {:?}\n\
             records = [\"100\", \"101\", \"103\", \"105\", \"208\"]\n\
             [split]\ntest_patients = [\"208\"]\n",
            dir.display().to_string()
        ))
        .unwrap();
        let data = inter_patient(&config).unwrap();
        assert_eq!(data.evaluation(), EvalKind::Patient);
        assert_eq!(names(&data.test), ["208"]);
        assert_eq!(names(&data.train), ["100", "101", "103", "105"]);
        assert_eq!(data.train.feature_len(), 4);
        // AAMI V beats of record 208 (992 PVCs) are all in the test set.
        assert!(
            data.test.class_counts()[2] > 900,
            "{:?}",
            data.test.class_counts()
        );
        let survey = config.survey().unwrap();
        assert_eq!(survey.sources[0].patients, 5);
        assert!(survey.sources[0].unsupported.is_none());
        assert_eq!(survey.split.test_patients, ["208"]);
        assert_eq!(survey.split.test_beats, data.test.len());

        // Record 102 has no MLII lead: the inter_patient preset cannot cut it, the papers' can.
        let config = parse(&format!(
            "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"wfdb\"\npath = {:?}\n\
             records = [\"100\", \"102\"]\n",
            dir.display().to_string()
        ))
        .unwrap();
        let err = inter_patient(&config).unwrap_err();
        assert!(matches!(err, AgentError::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("MLII"), "{err}");
        assert!(papers(&config).is_ok());
        let survey = config.survey().unwrap();
        assert_eq!(survey.sources[0].preprocessing, "papers");
        assert!(
            survey.sources[0]
                .unsupported
                .as_deref()
                .is_some_and(|r| r.contains("MLII")),
            "{survey:?}"
        );
    }
}
