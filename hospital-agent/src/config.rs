//! The agent's TOML configuration: where its state lives and which local data it trains on.
//!
//! ```toml
//! state_dir = "/var/lib/medsplit-agent"
//! # ca_cert = "/etc/medsplit/ca.pem"   # trust this CA for the coordinator's TLS certificate
//!
//! [[sources]]                          # any number, concatenated
//! format = "beats"                     # beats | csv | wfdb | synthetic
//! path = "/data/mitbih"
//! files = ["train", "test"]            # beats: file stems in `path`
//!
//! [[sources]]
//! format = "wfdb"
//! path = "/data/mitdb"
//! records = ["100", "208"]
//!
//! [split]                              # the local held-out test set
//! test_fraction = 0.2
//! seed = 0
//! ```
//!
//! A `shard = { index = 0, count = 3 }` table keeps every `count`-th beat from `index` on (used
//! to divide one data set between demo hospitals).

use std::path::{Path, PathBuf};

use medsplit_engine::data::{self, Dataset, SYNTHETIC_BEAT_LEN, SYNTHETIC_CLASSES};
use medsplit_engine::metrics::EvalKind;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::AgentError;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub sources: Vec<Source>,
    #[serde(default)]
    pub split: Split,
    pub shard: Option<Shard>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// The MIT-BIH beat format: `<path>/<stem>.f32` + `<stem>.labels`.
    Beats {
        path: PathBuf,
        #[serde(default = "default_files")]
        files: Vec<String>,
    },
    /// One CSV file: the label, then 128 sample columns (see `engine::data::parse_csv`).
    Csv { path: PathBuf },
    /// Raw WFDB records (`.hea`, `.dat` format 212, `.atr`) in `path`.
    Wfdb { path: PathBuf, records: Vec<String> },
    /// Generated beats (demos and tests).
    Synthetic { samples: usize, seed: u64 },
}

fn default_files() -> Vec<String> {
    vec!["train".into(), "test".into()]
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub test_fraction: f64,
    pub seed: u64,
}

impl Default for Split {
    fn default() -> Self {
        Self {
            test_fraction: 0.2,
            seed: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// The hospital's local data: what it trains on and what it measures test accuracy on.
pub struct LocalData {
    pub train: Dataset,
    pub test: Dataset,
}

impl LocalData {
    /// Which kind of split made the test set: beats drawn at random from every source, so
    /// the same patients are on both sides.
    pub fn evaluation(&self) -> EvalKind {
        EvalKind::Beat
    }
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
        if !(self.split.test_fraction > 0.0 && self.split.test_fraction < 1.0) {
            return Err(AgentError::Config(format!(
                "split.test_fraction must be in (0, 1), got {}",
                self.split.test_fraction
            )));
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

    /// Reads every source and splits off the local test set.
    pub fn load_data(&self) -> Result<LocalData, AgentError> {
        let (len, classes) = (SYNTHETIC_BEAT_LEN, SYNTHETIC_CLASSES);
        let mut samples = Vec::new();
        let mut labels = Vec::new();
        for source in &self.sources {
            let parts = match source {
                Source::Beats { path, files } => files
                    .iter()
                    .map(|f| data::load_beats(path, f, len, classes))
                    .collect::<Result<Vec<_>, _>>()?,
                Source::Csv { path } => vec![data::load_csv(path, len, classes)?],
                Source::Wfdb { path, records } => {
                    vec![medsplit_engine::wfdb::load_records(path, records)?]
                }
                Source::Synthetic { samples, seed } => vec![data::synthetic(*samples, *seed)],
            };
            for d in parts {
                samples.extend_from_slice(d.rows());
                labels.extend_from_slice(d.labels());
            }
        }
        let all = Dataset::new(samples, labels, len, classes)?;
        let mut indices: Vec<usize> = (0..all.len()).collect();
        if let Some(s) = self.shard {
            indices.retain(|i| i % s.count == s.index);
        }
        indices.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(self.split.seed));
        let test_len = ((indices.len() as f64) * self.split.test_fraction).round() as usize;
        if test_len == 0 || test_len == indices.len() {
            return Err(AgentError::Config(format!(
                "{} beats cannot be split into non-empty train and test sets",
                indices.len()
            )));
        }
        let (test, train) = indices.split_at(test_len);
        Ok(LocalData {
            train: all.select(train)?,
            test: all.select(test)?,
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

    #[test]
    fn synthetic_sources_split_into_disjoint_train_and_test_sets() {
        let config = parse(
            "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"synthetic\"\nsamples = 500\nseed = 1\n\
             [split]\ntest_fraction = 0.2\nseed = 3\n",
        )
        .unwrap();
        let data = config.load_data().unwrap();
        assert_eq!((data.train.len(), data.test.len()), (400, 100));
        let sharded = parse(
            "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"synthetic\"\nsamples = 500\nseed = 1\n\
             [shard]\nindex = 1\ncount = 5\n",
        )
        .unwrap()
        .load_data()
        .unwrap();
        assert_eq!(sharded.train.len() + sharded.test.len(), 100);
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        for (text, needle) in [
            ("state_dir = \"/x\"\n", "no [[sources]]"),
            (
                "state_dir = \"/x\"\n[[sources]]\nformat = \"hdf5\"\npath = \"/d\"\n",
                "hdf5",
            ),
            ("state_dir = \"/x\"\ncolour = 1\n", "colour"),
            (
                "state_dir = \"/x\"\n[[sources]]\nformat = \"synthetic\"\nsamples = 5\nseed = 1\n[split]\ntest_fraction = 1.5\nseed = 0\n",
                "test_fraction",
            ),
            (
                "state_dir = \"/x\"\n[[sources]]\nformat = \"synthetic\"\nsamples = 5\nseed = 1\n[shard]\nindex = 3\ncount = 3\n",
                "shard",
            ),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn raw_wfdb_records_are_a_data_source() {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/mitdb-raw"
        ));
        if !dir.join("100.hea").is_file() {
            eprintln!("skipping: ../shared/data/mitdb-raw not found");
            return;
        }
        let config = parse(&format!(
            "state_dir = \"/tmp/x\"\n[[sources]]\nformat = \"wfdb\"\npath = {:?}\nrecords = [\"100\", \"208\", \"232\"]\n",
            dir.display().to_string()
        ))
        .unwrap();
        let data = config.load_data().unwrap();
        // 2,270 + 2,526 + 1,765 N/L/R/A/V beats in the three records.
        assert_eq!(data.train.len() + data.test.len(), 6561);
        assert_eq!(data.train.beat_len(), 128);
    }
}
