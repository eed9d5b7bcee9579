//! A finished job's model outside MedSplit: both halves' parameters ([`TrainedModel`]) and the
//! model card that says what they were trained on and how well they did ([`ModelCard`]).

pub mod infer;
pub mod onnx;
pub mod tensors;

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::api::JobSpec;
use crate::metrics::{Confusion, EvalKind};
use crate::model::{ModelConfig, ModelError};

/// The card's format version.
pub const CARD_FORMAT: u32 = 1;

/// A trained split network: both halves' parameters in the order of
/// [`ClientNet::parameters`](crate::model::ClientNet::parameters) /
/// [`ServerNet::parameters`](crate::model::ServerNet::parameters).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainedModel {
    pub config: ModelConfig,
    pub client: Vec<f32>,
    pub server: Vec<f32>,
}

impl TrainedModel {
    /// Checks the configuration and both parameter counts, and that every value is finite.
    pub fn new(
        config: ModelConfig,
        client: Vec<f32>,
        server: Vec<f32>,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        for (expected, values) in [
            (config.client_parameter_count(), &client),
            (config.server_parameter_count(), &server),
        ] {
            if values.len() != expected {
                return Err(ModelError::ParameterCount {
                    expected,
                    got: values.len(),
                });
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::NonFiniteParameter);
            }
        }
        Ok(Self {
            config,
            client,
            server,
        })
    }

    /// The untrained network of `config` with PyTorch's initialisation from `seed`, as a job's
    /// first visit starts it.
    pub fn initial(config: &ModelConfig, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        let device = burn::tensor::Device::flex();
        Self::new(
            config.clone(),
            config.init_client(seed, &device).parameters(),
            config.init_server(seed, &device).parameters(),
        )
    }
}

/// One exported file and its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardFile {
    pub name: String,
    /// Lower-case hex.
    pub sha256: String,
}

/// A tensor the ONNX graph takes or gives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardTensor {
    pub name: String,
    /// Dimensions; `"N"` is the batch.
    pub shape: Vec<String>,
    pub description: String,
}

/// One hospital's test-set counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HospitalEvaluation {
    pub hospital: String,
    pub confusion: Confusion,
}

/// The last measured round: each hospital's held-out beats and all of them pooled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CardEvaluation {
    /// 1-based round.
    pub round: u32,
    pub kind: EvalKind,
    pub hospitals: Vec<HospitalEvaluation>,
    pub pooled: Confusion,
}

/// What an exported model is: the job that trained it, its spec (label set and preprocessing
/// included), who trained and exported it, its metrics, its inputs and outputs, its files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// [`CARD_FORMAT`].
    pub format: u32,
    pub job_id: i64,
    pub job_name: String,
    pub spec: JobSpec,
    /// Class names in output order.
    pub classes: Vec<String>,
    /// In visiting order.
    pub hospitals: Vec<String>,
    /// Rounds completed.
    pub rounds: u32,
    pub evaluation: Option<CardEvaluation>,
    /// RFC 3339.
    pub exported_at: String,
    /// E.g. `"agent 7 of hospital-a"`.
    pub exported_by: String,
    pub medsplit_version: String,
    /// The ONNX graph's inputs.
    pub inputs: Vec<CardTensor>,
    /// The ONNX graph's outputs.
    pub outputs: Vec<CardTensor>,
    /// The exported files with their checksums (filled when they are written).
    pub files: Vec<CardFile>,
}

/// The name of the ONNX input holding the beat window.
pub const INPUT_BEAT: &str = "beat";
/// The name of the ONNX input holding the side features (only when the model has some).
pub const INPUT_FEATURES: &str = "features";
/// The names of the ONNX outputs.
pub const OUTPUT_LOGITS: &str = "logits";
pub const OUTPUT_PROBABILITIES: &str = "probabilities";

impl ModelCard {
    /// A card for a model of `spec`, without checksums (`files` empty) and with this build's
    /// version; classes, inputs and outputs follow from the spec.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job_id: i64,
        spec: JobSpec,
        hospitals: Vec<String>,
        rounds: u32,
        evaluation: Option<CardEvaluation>,
        exported_at: String,
        exported_by: String,
    ) -> Self {
        let config = spec.model_config();
        let classes = spec
            .labels
            .class_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        Self {
            format: CARD_FORMAT,
            job_id,
            job_name: spec.name.clone(),
            classes,
            hospitals,
            rounds,
            evaluation,
            exported_at,
            exported_by,
            medsplit_version: env!("CARGO_PKG_VERSION").to_owned(),
            inputs: input_tensors(&spec, &config),
            outputs: output_tensors(&config, &spec),
            files: Vec::new(),
            spec,
        }
    }

    /// The shapes of the network the card describes.
    pub fn model_config(&self) -> ModelConfig {
        self.spec.model_config()
    }

    /// The card as a Markdown document.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let spec = &self.spec;
        let config = self.model_config();
        let _ = writeln!(
            md,
            "# Model card: {} (job {})\n",
            self.job_name, self.job_id
        );
        let _ = writeln!(
            md,
            "A split network trained by MedSplit {} over {} round(s) at {} hospital(s); \
             exported {} by {}.\n",
            self.medsplit_version,
            self.rounds,
            self.hospitals.len(),
            self.exported_at,
            self.exported_by
        );
        let _ = writeln!(md, "## Training\n");
        let _ = writeln!(
            md,
            "- Hospitals, in visiting order: {}",
            self.hospitals.join(", ")
        );
        let _ = writeln!(
            md,
            "- Rounds: {} completed of {}; {} local epoch(s) per visit, batch size {}, seed {}",
            self.rounds, spec.rounds, spec.local_epochs, spec.batch_size, spec.seed
        );
        let _ = writeln!(
            md,
            "- Class weights: {}",
            serde_json::to_string(&spec.class_weights).unwrap_or_default()
        );
        let _ = writeln!(
            md,
            "- Encryption: {}\n",
            if spec.insecure_plaintext {
                "none (plaintext debugging job)"
            } else {
                "cut-layer activations and gradients under homomorphic encryption"
            }
        );
        let _ = writeln!(md, "## Labels\n");
        let _ = writeln!(
            md,
            "Label set `{}`; classes in output order: {}.\n",
            spec.labels,
            self.classes.join(", ")
        );
        let _ = writeln!(md, "## Preprocessing\n");
        let _ = writeln!(md, "{}:\n", spec.preprocessing.describe());
        let _ = writeln!(
            md,
            "```json\n{}\n```\n",
            serde_json::to_string_pretty(&spec.preprocessing).unwrap_or_default()
        );
        let _ = writeln!(md, "## Network\n");
        for (i, b) in config.blocks.iter().enumerate() {
            let _ = writeln!(
                md,
                "- Client block {i}: Conv1d({} channels, kernel {}, padding {}) → LeakyReLU({}) → MaxPool1d({})",
                b.channels,
                b.kernel,
                b.kernel / 2,
                config.leaky_slope,
                b.pool
            );
        }
        let _ = writeln!(
            md,
            "- Cut layer: {} values ({} from the convolutions, channel-major, then {} side feature(s))",
            config.cut_width().0,
            config.conv_width(),
            config.features
        );
        let _ = writeln!(
            md,
            "- Server layer: Linear({} → {})",
            config.cut_width().0,
            config.server_outputs()
        );
        if let Some(tail) = config.tail {
            let _ = writeln!(
                md,
                "- Client tail: LeakyReLU({}) → Linear({tail} → {})",
                config.leaky_slope, config.classes
            );
        }
        let _ = writeln!(md, "- Softmax over the {} classes\n", config.classes);
        let _ = writeln!(md, "## Inputs and outputs (model.onnx)\n");
        let _ = writeln!(md, "| Tensor | Shape | Meaning |\n|---|---|---|");
        for t in self.inputs.iter().chain(&self.outputs) {
            let _ = writeln!(
                md,
                "| `{}` | [{}] | {} |",
                t.name,
                t.shape.join(", "),
                t.description
            );
        }
        md.push('\n');
        let _ = writeln!(md, "## Evaluation\n");
        match &self.evaluation {
            None => {
                let _ = writeln!(md, "No test-set measurement was recorded.\n");
            }
            Some(e) => {
                let _ = writeln!(
                    md,
                    "Round {}, {} ({}).\n",
                    e.round,
                    e.kind,
                    e.kind.describe()
                );
                let _ = writeln!(
                    md,
                    "| Test set | Beats | Accuracy | Majority-class rate | Macro F1 |\n|---|---|---|---|---|"
                );
                let rows = e
                    .hospitals
                    .iter()
                    .map(|h| (h.hospital.as_str(), &h.confusion))
                    .chain([("pooled", &e.pooled)]);
                for (name, c) in rows {
                    let _ = writeln!(
                        md,
                        "| {name} | {} | {:.2} % | {:.2} % | {:.3} |",
                        c.total(),
                        100.0 * c.accuracy(),
                        100.0 * c.majority_rate(),
                        c.macro_f1()
                    );
                }
                let _ = writeln!(md, "\nPooled, per class:\n");
                md.push_str(&class_table(&e.pooled));
                md.push('\n');
            }
        }
        let _ = writeln!(md, "## Files\n");
        if self.files.is_empty() {
            let _ = writeln!(md, "(no checksums recorded)");
        }
        for f in &self.files {
            let _ = writeln!(md, "- `{}`: SHA-256 `{}`", f.name, f.sha256);
        }
        md
    }
}

/// Per-class sensitivity, PPV, F1 and support, then the confusion matrix, as Markdown tables.
pub fn class_table(c: &Confusion) -> String {
    let mut md = String::from("| Class | Se | PPV | F1 | Beats |\n|---|---|---|---|---|\n");
    for (i, name) in c.classes().iter().enumerate() {
        let m = c.class_metrics(i);
        let _ = writeln!(
            md,
            "| {name} | {:.2} % | {:.2} % | {:.3} | {} |",
            100.0 * m.se,
            100.0 * m.ppv,
            m.f1,
            m.support
        );
    }
    let _ = writeln!(
        md,
        "\nConfusion matrix (rows: true class, columns: predicted):\n"
    );
    let _ = writeln!(
        md,
        "| | {} |\n|---|{}",
        c.classes().join(" | "),
        "---|".repeat(c.classes().len())
    );
    for (name, row) in c.classes().iter().zip(c.rows()) {
        let cells: Vec<String> = row.iter().map(u64::to_string).collect();
        let _ = writeln!(md, "| **{name}** | {} |", cells.join(" | "));
    }
    md
}

fn input_tensors(spec: &JobSpec, config: &ModelConfig) -> Vec<CardTensor> {
    let mut inputs = vec![CardTensor {
        name: INPUT_BEAT.into(),
        shape: vec!["N".into(), "1".into(), config.beat_len.to_string()],
        description: format!(
            "the preprocessed beat window: {} samples from {} s before to {} s after the R peak \
             (preprocessing `{}`)",
            config.beat_len,
            spec.preprocessing.before_s,
            spec.preprocessing.after_s,
            spec.preprocessing.describe()
        ),
    }];
    if config.features > 0 {
        let mut names: Vec<&str> = crate::preprocess::RR_FEATURE_NAMES.to_vec();
        if config.features > names.len() {
            names.extend(crate::preprocess::RHYTHM_FEATURE_NAMES);
        }
        inputs.push(CardTensor {
            name: INPUT_FEATURES.into(),
            shape: vec!["N".into(), config.features.to_string()],
            description: format!("the beat's side features: {}", names.join(", ")),
        });
    }
    inputs
}

fn output_tensors(config: &ModelConfig, spec: &JobSpec) -> Vec<CardTensor> {
    let classes = spec.labels.class_names().join(", ");
    vec![
        CardTensor {
            name: OUTPUT_LOGITS.into(),
            shape: vec!["N".into(), config.classes.to_string()],
            description: format!("unnormalised class scores ({classes})"),
        },
        CardTensor {
            name: OUTPUT_PROBABILITIES.into(),
            shape: vec!["N".into(), config.classes.to_string()],
            description: format!("softmax of the logits ({classes})"),
        },
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::ModelName;
    use crate::model::{ConvBlock, ModelConfig};

    /// The shapes the exports are checked on: the presets, and side features with and without
    /// a tail.
    pub(crate) fn shapes() -> Vec<ModelConfig> {
        let mut side = ModelConfig {
            beat_len: 96,
            features: 4,
            blocks: vec![
                ConvBlock {
                    channels: 8,
                    kernel: 9,
                    pool: 2,
                },
                ConvBlock {
                    channels: 6,
                    kernel: 5,
                    pool: 3,
                },
                ConvBlock {
                    channels: 4,
                    kernel: 3,
                    pool: 1,
                },
            ],
            tail: None,
            classes: 5,
            leaky_slope: 0.2,
        };
        let mut shapes: Vec<ModelConfig> = ModelName::ALL.iter().map(|m| m.config()).collect();
        shapes.push(side.clone());
        side.tail = Some(12);
        shapes.push(side);
        shapes.push(spec().model_config());
        shapes
    }

    /// A model of `config` with PyTorch's initialisation from `seed`.
    pub(crate) fn random_model(config: &ModelConfig, seed: u64) -> TrainedModel {
        TrainedModel::initial(config, seed).unwrap()
    }

    fn spec() -> JobSpec {
        serde_json::from_str(
            r#"{"name": "ecg", "hospitals": ["a", "b"], "model": "m1_tail",
                "preprocessing": "inter_patient", "rounds": 3}"#,
        )
        .unwrap()
    }

    fn card() -> ModelCard {
        let classes = ["N", "S", "V", "F", "Q"];
        let a = Confusion::from_pairs(classes, [(0, 0), (0, 0), (2, 2), (1, 0)]).unwrap();
        let b = Confusion::from_pairs(classes, [(0, 0), (2, 0)]).unwrap();
        let pooled = Confusion::pooled([&a, &b]).unwrap().unwrap();
        let mut card = ModelCard::new(
            42,
            spec(),
            vec!["a".into(), "b".into()],
            3,
            Some(CardEvaluation {
                round: 3,
                kind: EvalKind::Patient,
                hospitals: vec![
                    HospitalEvaluation {
                        hospital: "a".into(),
                        confusion: a,
                    },
                    HospitalEvaluation {
                        hospital: "b".into(),
                        confusion: b,
                    },
                ],
                pooled,
            }),
            "2026-12-01T14:00:00Z".into(),
            "agent 7 of a".into(),
        );
        card.files.push(CardFile {
            name: "model.onnx".into(),
            sha256: "ab".repeat(32),
        });
        card
    }

    #[test]
    fn a_card_describes_the_model_and_reads_back() {
        let card = card();
        assert_eq!(card.classes, ["N", "S", "V", "F", "Q"]);
        let names: Vec<&str> = card.inputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, [INPUT_BEAT, INPUT_FEATURES]);
        assert_eq!(card.inputs[1].shape, ["N", "4"]);
        assert!(
            card.inputs[1].description.contains("rr_previous"),
            "{:?}",
            card.inputs[1]
        );
        let config = card.model_config();
        assert_eq!((config.features, config.tail), (4, Some(16)));

        let json = serde_json::to_string_pretty(&card).unwrap();
        let back: ModelCard = serde_json::from_str(&json).unwrap();
        assert_eq!(back, card);

        let md = card.markdown();
        for needle in [
            "# Model card: ecg (job 42)",
            "Hospitals, in visiting order: a, b",
            "Rounds: 3 completed of 3",
            "Label set `aami`; classes in output order: N, S, V, F, Q.",
            "inter_patient",
            "Server layer: Linear(260 → 16)",
            "Client tail: LeakyReLU(0.01) → Linear(16 → 5)",
            "| `beat` | [N, 1, 128] |",
            "| `features` | [N, 4] |",
            "Round 3, patient",
            // a: 3 of 4 right, majority N 2 of 4; pooled: 4 of 6 right, majority N 3 of 6.
            "| a | 4 | 75.00 % | 50.00 % |",
            "| pooled | 6 | 66.67 % | 50.00 % |",
            "| **V** | 1 | 0 | 1 | 0 | 0 |",
            &format!("`model.onnx`: SHA-256 `{}`", "ab".repeat(32)),
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }

    #[test]
    fn trained_models_are_checked() {
        let config = ModelConfig::m1();
        let (c, s) = (
            config.client_parameter_count(),
            config.server_parameter_count(),
        );
        assert!(TrainedModel::new(config.clone(), vec![0.0; c], vec![0.0; s]).is_ok());
        assert_eq!(
            TrainedModel::new(config.clone(), vec![0.0; c], vec![0.0; s - 1]),
            Err(ModelError::ParameterCount {
                expected: s,
                got: s - 1
            })
        );
        let mut bad = vec![0.0; c];
        bad[3] = f32::INFINITY;
        assert_eq!(
            TrainedModel::new(config, bad, vec![0.0; s]),
            Err(ModelError::NonFiniteParameter)
        );
    }
}
