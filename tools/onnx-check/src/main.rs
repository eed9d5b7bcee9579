//! `medsplit-onnx-check CASE_DIR…`: runs each case's `model.onnx` with tract on its inputs and
//! writes the outputs beside them.
//!
//! A case directory holds `model.onnx`, `shape.txt` (`N L F`: beats, beat length, side
//! features), `beat.f32` (`[N, 1, L]`, little-endian) and, when F > 0, `features.f32`
//! (`[N, F]`). Written: `logits.f32` and `probabilities.f32` (`[N, classes]`), the graph's two
//! outputs in order.

use std::path::Path;

use anyhow::{Context, bail};
use tract_onnx::prelude::*;

fn read_f32(path: &Path) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn write_f32(path: &Path, values: &[f32]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| path.display().to_string())
}

fn run(dir: &Path) -> anyhow::Result<()> {
    let shape = std::fs::read_to_string(dir.join("shape.txt"))?;
    let dims: Vec<usize> = shape
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [n, l, f] = dims[..] else {
        bail!("shape.txt: expected N L F, got {shape:?}")
    };
    let mut model = tract_onnx::onnx().model_for_path(dir.join("model.onnx"))?;
    model.set_input_fact(0, f32::fact([n, 1, l]).into())?;
    let mut inputs: TVec<TValue> =
        tvec![Tensor::from_shape(&[n, 1, l], &read_f32(&dir.join("beat.f32"))?)?.into()];
    if f > 0 {
        model.set_input_fact(1, f32::fact([n, f]).into())?;
        inputs.push(Tensor::from_shape(&[n, f], &read_f32(&dir.join("features.f32"))?)?.into());
    }
    let plan = model.into_optimized()?.into_runnable()?;
    let outputs = plan.run(inputs)?;
    if outputs.len() != 2 {
        bail!("expected 2 outputs, got {}", outputs.len());
    }
    for (name, value) in ["logits", "probabilities"].iter().zip(outputs.iter()) {
        let view = value.to_plain_array_view::<f32>()?;
        let values: Vec<f32> = view.iter().copied().collect();
        write_f32(&dir.join(format!("{name}.f32")), &values)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    if dirs.is_empty() {
        bail!("usage: medsplit-onnx-check CASE_DIR...");
    }
    for dir in &dirs {
        run(Path::new(dir)).with_context(|| dir.clone())?;
    }
    Ok(())
}
