//! The parameters as named tensors in PyTorch's layout, and as a safetensors file.
//!
//! | Name | Shape |
//! |---|---|
//! | `client.convs.{i}.weight` | `[c_out, c_in, kernel]` |
//! | `client.convs.{i}.bias` | `[c_out]` |
//! | `server.linear.weight` | `[server_outputs, cut]` |
//! | `server.linear.bias` | `[server_outputs]` |
//! | `client.tail.weight` | `[classes, tail]` (with a tail) |
//! | `client.tail.bias` | `[classes]` (with a tail) |
//!
//! Linear weights are `[out, in]` as in `torch.nn.Linear`; MedSplit holds them `[in, out]`.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::TrainedModel;
use crate::model::{ModelConfig, ModelError};

/// One parameter tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Errors reading a safetensors file back.
#[derive(Debug, thiserror::Error)]
pub enum TensorsError {
    #[error("not a safetensors file: {0}")]
    Format(String),
    #[error("tensor {0} is missing")]
    Missing(String),
    #[error("tensor {name}: expected float32 of shape {expected:?}, got {dtype} of shape {got:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        dtype: String,
        got: Vec<usize>,
    },
    #[error("unexpected tensor {0} (the model card's network has no such parameter)")]
    Unexpected(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// `[rows, cols]` row-major → `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// The model's parameters in PyTorch's names and layout, in graph order.
pub fn named_tensors(model: &TrainedModel) -> Vec<NamedTensor> {
    layout(&model.config)
        .into_iter()
        .map(|slot| {
            let half = if slot.server {
                &model.server
            } else {
                &model.client
            };
            let values = &half[slot.offset..slot.offset + slot.len()];
            let values = match slot.transposed {
                Some((rows, cols)) => transpose(values, rows, cols),
                None => values.to_vec(),
            };
            NamedTensor {
                name: slot.name,
                shape: slot.shape,
                values,
            }
        })
        .collect()
}

/// Where a named tensor lies in [`TrainedModel`]'s vectors.
struct Slot {
    name: String,
    /// PyTorch's shape.
    shape: Vec<usize>,
    server: bool,
    offset: usize,
    /// MedSplit's `[in, out]` of a linear weight, stored transposed.
    transposed: Option<(usize, usize)>,
}

impl Slot {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

fn layout(config: &ModelConfig) -> Vec<Slot> {
    /// Appends a slot at `*offset` and moves the offset past it.
    fn push(
        slots: &mut Vec<Slot>,
        offset: &mut usize,
        name: String,
        shape: Vec<usize>,
        server: bool,
        transposed: Option<(usize, usize)>,
    ) {
        let slot = Slot {
            name,
            shape,
            server,
            offset: *offset,
            transposed,
        };
        *offset += slot.len();
        slots.push(slot);
    }
    let mut slots = Vec::new();
    let mut offset = 0;
    let mut c_in = 1;
    for (i, b) in config.blocks.iter().enumerate() {
        let (weight, bias) = (
            format!("client.convs.{i}.weight"),
            format!("client.convs.{i}.bias"),
        );
        push(
            &mut slots,
            &mut offset,
            weight,
            vec![b.channels, c_in, b.kernel],
            false,
            None,
        );
        push(&mut slots, &mut offset, bias, vec![b.channels], false, None);
        c_in = b.channels;
    }
    let (cut, out) = (config.cut_width().0, config.server_outputs());
    let mut server_offset = 0;
    let (weight, bias) = ("server.linear.weight".into(), "server.linear.bias".into());
    push(
        &mut slots,
        &mut server_offset,
        weight,
        vec![out, cut],
        true,
        Some((cut, out)),
    );
    push(&mut slots, &mut server_offset, bias, vec![out], true, None);
    if let Some(width) = config.tail {
        let (weight, bias) = ("client.tail.weight".into(), "client.tail.bias".into());
        let shape = vec![config.classes, width];
        push(
            &mut slots,
            &mut offset,
            weight,
            shape,
            false,
            Some((width, config.classes)),
        );
        push(
            &mut slots,
            &mut offset,
            bias,
            vec![config.classes],
            false,
            None,
        );
    }
    slots
}

/// The parameters as a safetensors file (float32, little-endian), with `metadata` in its
/// header (e.g. the job and the format).
pub fn to_safetensors(model: &TrainedModel, metadata: HashMap<String, String>) -> Vec<u8> {
    let tensors = named_tensors(model);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors.iter().zip(&bytes).map(|(t, b)| {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b).expect("shape fits the data");
        (t.name.clone(), view)
    });
    safetensors::serialize(views, Some(metadata)).expect("float32 tensors serialise")
}

/// A model of shapes `config` read from a safetensors file: every parameter must be there with
/// its shape, and no other tensor.
pub fn from_safetensors(config: &ModelConfig, bytes: &[u8]) -> Result<TrainedModel, TensorsError> {
    config.validate()?;
    let file = SafeTensors::deserialize(bytes).map_err(|e| TensorsError::Format(e.to_string()))?;
    let slots = layout(config);
    for name in file.names() {
        if !slots.iter().any(|s| s.name == name) {
            return Err(TensorsError::Unexpected(name.to_owned()));
        }
    }
    let mut client = vec![0.0; config.client_parameter_count()];
    let mut server = vec![0.0; config.server_parameter_count()];
    for slot in &slots {
        let view = file
            .tensor(&slot.name)
            .map_err(|_| TensorsError::Missing(slot.name.clone()))?;
        if view.dtype() != Dtype::F32 || view.shape() != slot.shape.as_slice() {
            return Err(TensorsError::Shape {
                name: slot.name.clone(),
                expected: slot.shape.clone(),
                dtype: format!("{:?}", view.dtype()),
                got: view.shape().to_vec(),
            });
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // Back to MedSplit's layout: a PyTorch `[out, in]` weight becomes `[in, out]`.
        let values = match slot.transposed {
            Some((rows, cols)) => transpose(&values, cols, rows),
            None => values,
        };
        let half = if slot.server {
            &mut server
        } else {
            &mut client
        };
        half[slot.offset..slot.offset + slot.len()].copy_from_slice(&values);
    }
    Ok(TrainedModel::new(config.clone(), client, server)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::{random_model, shapes};

    #[test]
    fn safetensors_round_trip_in_pytorch_layout() {
        for config in shapes() {
            let model = random_model(&config, 11);
            let bytes = to_safetensors(&model, HashMap::from([("job".into(), "5".into())]));
            assert_eq!(from_safetensors(&config, &bytes).unwrap(), model);

            let file = SafeTensors::deserialize(&bytes).unwrap();
            let (cut, out) = (config.cut_width().0, config.server_outputs());
            let w = file.tensor("server.linear.weight").unwrap();
            assert_eq!(w.shape(), [out, cut]);
            // PyTorch's [out, in]: element (o, i) is MedSplit's (i, o).
            let (o, i) = (out - 1, 3);
            let at = (o * cut + i) * 4;
            let value = f32::from_le_bytes(w.data()[at..at + 4].try_into().unwrap());
            assert_eq!(value, model.server[i * out + o]);
            let conv = file.tensor("client.convs.0.weight").unwrap();
            assert_eq!(
                conv.shape(),
                [config.blocks[0].channels, 1, config.blocks[0].kernel]
            );
            assert_eq!(
                file.tensor("client.tail.weight").is_ok(),
                config.tail.is_some()
            );
            let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(meta.metadata().as_ref().unwrap()["job"], "5");
        }
    }

    #[test]
    fn a_file_of_other_shapes_is_refused_by_name() {
        let m1 = crate::model::ModelConfig::m1();
        let wide = crate::model::ModelConfig::m1_wide();
        let bytes = to_safetensors(&random_model(&wide, 1), HashMap::new());
        let err = from_safetensors(&m1, &bytes).unwrap_err();
        assert!(
            matches!(&err, TensorsError::Shape { name, .. } if name == "client.convs.1.weight"),
            "{err}"
        );
        let mut tail = m1.clone();
        tail.tail = Some(16);
        let bytes = to_safetensors(&random_model(&tail, 1), HashMap::new());
        let err = from_safetensors(&m1, &bytes).unwrap_err().to_string();
        assert!(err.contains("client.tail"), "{err}");
        assert!(from_safetensors(&m1, b"garbage").is_err());
    }
}
