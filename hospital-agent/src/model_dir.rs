//! An exported model's directory:
//!
//! | File | Holds |
//! |---|---|
//! | `model.onnx` | the whole network, one ONNX graph of standard operators |
//! | `model.safetensors` | the parameters with PyTorch-style names |
//! | `model-card.json` | the [`ModelCard`], with both files' SHA-256 |
//! | `model-card.md` | the card for people |
//!
//! Nothing in it is secret (the hospitals' data never enters it); the files are written 0644.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use medsplit_engine::export::tensors::{self, TensorsError};
use medsplit_engine::export::{CardFile, ModelCard, TrainedModel, onnx};
use sha2::{Digest, Sha256};

pub const ONNX_FILE: &str = "model.onnx";
pub const SAFETENSORS_FILE: &str = "model.safetensors";
pub const CARD_FILE: &str = "model-card.json";
pub const CARD_MARKDOWN_FILE: &str = "model-card.md";

#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is not empty: choose an empty or new directory (or overwrite it on purpose)",
        .0.display()
    )]
    NotEmpty(PathBuf),
    #[error("{}: not a model card: {source}", path.display())]
    Card {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the model card describes format {0}; this MedSplit reads format 1")]
    Format(u32),
    #[error("the model's shapes {model} differ from the card's network {card}")]
    Shapes { model: String, card: String },
    #[error("the model card lists no checksum for {0}")]
    Unlisted(&'static str),
    #[error("{}: its SHA-256 is {got}, the model card says {expected}: the file was changed or damaged", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        got: String,
    },
    #[error("{}: {source}", path.display())]
    Tensors { path: PathBuf, source: TensorsError },
}

/// SHA-256 as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `model` and its `card` into `dir` (created if missing), filling the card's checksums.
/// A directory that already holds anything is refused unless `overwrite`.
pub fn write(
    dir: &Path,
    model: &TrainedModel,
    card: &mut ModelCard,
    overwrite: bool,
) -> Result<(), ModelDirError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ModelDirError::Io { path, source }
    };
    if model.config != card.model_config() {
        return Err(ModelDirError::Shapes {
            model: format!("{:?}", model.config),
            card: format!("{:?}", card.model_config()),
        });
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let occupied = std::fs::read_dir(dir).map_err(io(dir))?.next().is_some();
    if occupied && !overwrite {
        return Err(ModelDirError::NotEmpty(dir.to_owned()));
    }
    let graph = onnx::to_onnx(model, card);
    let metadata = HashMap::from([
        ("format".to_owned(), "medsplit-1".to_owned()),
        ("job_id".to_owned(), card.job_id.to_string()),
        ("job_name".to_owned(), card.job_name.clone()),
        ("classes".to_owned(), card.classes.join(",")),
    ]);
    let weights = tensors::to_safetensors(model, metadata);
    card.files = vec![
        CardFile {
            name: ONNX_FILE.into(),
            sha256: sha256_hex(&graph),
        },
        CardFile {
            name: SAFETENSORS_FILE.into(),
            sha256: sha256_hex(&weights),
        },
    ];
    let json = serde_json::to_vec_pretty(card).expect("a card serialises");
    for (name, bytes) in [
        (ONNX_FILE, graph.as_slice()),
        (SAFETENSORS_FILE, &weights),
        (CARD_FILE, &json),
        (CARD_MARKDOWN_FILE, card.markdown().as_bytes()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    Ok(())
}

/// Reads an exported model back: the card, both files checked against its checksums, and the
/// parameters from the safetensors file in the shapes the card's spec gives.
pub fn read(dir: &Path) -> Result<(TrainedModel, ModelCard), ModelDirError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path)
            .map(|bytes| (path.clone(), bytes))
            .map_err(|source| ModelDirError::Io { path, source })
    };
    let (card_path, card_bytes) = read(CARD_FILE)?;
    let card: ModelCard =
        serde_json::from_slice(&card_bytes).map_err(|source| ModelDirError::Card {
            path: card_path,
            source,
        })?;
    if card.format != medsplit_engine::export::CARD_FORMAT {
        return Err(ModelDirError::Format(card.format));
    }
    let mut weights = None;
    for name in [ONNX_FILE, SAFETENSORS_FILE] {
        let expected = card
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or(ModelDirError::Unlisted(name))?;
        let (path, bytes) = read(name)?;
        let got = sha256_hex(&bytes);
        if got != expected.sha256 {
            return Err(ModelDirError::Checksum {
                path,
                expected: expected.sha256.clone(),
                got,
            });
        }
        if name == SAFETENSORS_FILE {
            weights = Some((path, bytes));
        }
    }
    let (path, bytes) = weights.expect("read above");
    let model = tensors::from_safetensors(&card.model_config(), &bytes)
        .map_err(|source| ModelDirError::Tensors { path, source })?;
    Ok((model, card))
}
