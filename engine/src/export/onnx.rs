//! The whole network as one ONNX graph of standard operators (opset 13):
//!
//! ```text
//! beat [N, 1, L] → per block: Conv(pads k/2) → LeakyRelu → MaxPool(pool, stride pool)
//!   → Flatten(axis 1)  (channel-major, as the cut layer)
//!   → Concat(·, features [N, F], axis 1)    (only when F > 0)
//!   → Gemm(server.linear)                    (transB: weights stored [out, in], as PyTorch)
//!   → LeakyRelu → Gemm(client.tail)          (only with a tail)
//!   = logits [N, classes] → Softmax(axis 1) = probabilities [N, classes]
//! ```
//!
//! The initializers carry the names of the safetensors file ([`super::tensors`]). The protobuf
//! is written by hand: the few messages of `onnx.proto` the graph needs, each field as its
//! number and wire type say.

use super::{
    INPUT_BEAT, INPUT_FEATURES, ModelCard, OUTPUT_LOGITS, OUTPUT_PROBABILITIES, TrainedModel,
    tensors,
};

/// The operator set the graph uses.
pub const OPSET: i64 = 13;
/// The ONNX IR version that goes with opset 13.
const IR_VERSION: i64 = 7;

/// `TensorProto.DataType.FLOAT`.
const FLOAT: i64 = 1;

/// The model as ONNX bytes; `card` gives the documentation strings.
pub fn to_onnx(model: &TrainedModel, card: &ModelCard) -> Vec<u8> {
    let config = &model.config;
    let mut graph = Message::default();
    let mut nodes = Vec::new();
    let mut x = INPUT_BEAT.to_owned();
    let slope = config.leaky_slope as f32;
    for (i, b) in config.blocks.iter().enumerate() {
        let p = |s: &str| format!("client.convs.{i}.{s}");
        let pad = (b.kernel / 2) as i64;
        nodes.push(node(
            "Conv",
            &[&x, &p("weight"), &p("bias")],
            &p("conv"),
            vec![
                ints("kernel_shape", &[b.kernel as i64]),
                ints("pads", &[pad, pad]),
                ints("strides", &[1]),
                ints("dilations", &[1]),
                int("group", 1),
            ],
        ));
        nodes.push(node(
            "LeakyRelu",
            &[&p("conv")],
            &p("activation"),
            vec![float("alpha", slope)],
        ));
        nodes.push(node(
            "MaxPool",
            &[&p("activation")],
            &p("pool"),
            vec![
                ints("kernel_shape", &[b.pool as i64]),
                ints("strides", &[b.pool as i64]),
            ],
        ));
        x = p("pool");
    }
    nodes.push(node("Flatten", &[&x], "client.flat", vec![int("axis", 1)]));
    let mut cut = "client.flat";
    if config.features > 0 {
        nodes.push(node(
            "Concat",
            &["client.flat", INPUT_FEATURES],
            "cut",
            vec![int("axis", 1)],
        ));
        cut = "cut";
    }
    let gemm = |input: &str, prefix: &str, output: &str| {
        node(
            "Gemm",
            &[
                input,
                &format!("{prefix}.weight"),
                &format!("{prefix}.bias"),
            ],
            output,
            vec![int("transB", 1)],
        )
    };
    if config.tail.is_some() {
        nodes.push(gemm(cut, "server.linear", "server.outputs"));
        nodes.push(node(
            "LeakyRelu",
            &["server.outputs"],
            "client.tail.activation",
            vec![float("alpha", slope)],
        ));
        nodes.push(gemm("client.tail.activation", "client.tail", OUTPUT_LOGITS));
    } else {
        nodes.push(gemm(cut, "server.linear", OUTPUT_LOGITS));
    }
    nodes.push(node(
        "Softmax",
        &[OUTPUT_LOGITS],
        OUTPUT_PROBABILITIES,
        vec![int("axis", 1)],
    ));
    for n in &nodes {
        graph.message(1, n);
    }
    graph.string(2, &format!("medsplit_job_{}", card.job_id));
    for t in tensors::named_tensors(model) {
        let mut tensor = Message::default();
        for d in &t.shape {
            tensor.int64(1, *d as i64);
        }
        tensor.int64(2, FLOAT);
        tensor.string(8, &t.name);
        let raw: Vec<u8> = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensor.bytes(9, &raw);
        graph.message(5, &tensor);
    }
    graph.string(
        10,
        &format!(
            "MedSplit job {} ({}): classes {}",
            card.job_id,
            card.job_name,
            card.classes.join(", ")
        ),
    );
    for t in &card.inputs {
        graph.message(11, &value_info(&t.name, &t.shape, &t.description));
    }
    for t in &card.outputs {
        graph.message(12, &value_info(&t.name, &t.shape, &t.description));
    }

    let mut model_proto = Message::default();
    model_proto.int64(1, IR_VERSION);
    model_proto.string(2, "medsplit");
    model_proto.string(3, &card.medsplit_version);
    model_proto.string(
        6,
        &format!(
            "MedSplit split network of job {} ({}); see model-card.md",
            card.job_id, card.job_name
        ),
    );
    model_proto.message(7, &graph);
    let mut opset = Message::default();
    opset.string(1, "");
    opset.int64(2, OPSET);
    model_proto.message(8, &opset);
    model_proto.0
}

/// A `NodeProto`.
fn node(op: &str, inputs: &[&str], output: &str, attributes: Vec<Message>) -> Message {
    let mut m = Message::default();
    for i in inputs {
        m.string(1, i);
    }
    m.string(2, output);
    m.string(3, output);
    m.string(4, op);
    for a in &attributes {
        m.message(5, a);
    }
    m
}

/// `AttributeProto.AttributeType` values.
const ATTR_FLOAT: i64 = 1;
const ATTR_INT: i64 = 2;
const ATTR_INTS: i64 = 7;

fn int(name: &str, value: i64) -> Message {
    let mut m = Message::default();
    m.string(1, name);
    m.int64(3, value);
    m.int64(20, ATTR_INT);
    m
}

fn float(name: &str, value: f32) -> Message {
    let mut m = Message::default();
    m.string(1, name);
    m.fixed32(2, value.to_bits());
    m.int64(20, ATTR_FLOAT);
    m
}

fn ints(name: &str, values: &[i64]) -> Message {
    let mut m = Message::default();
    m.string(1, name);
    for v in values {
        m.int64(8, *v);
    }
    m.int64(20, ATTR_INTS);
    m
}

/// A `ValueInfoProto` of a float tensor; a dimension that is not a number is symbolic.
fn value_info(name: &str, shape: &[String], doc: &str) -> Message {
    let mut dims = Message::default();
    for d in shape {
        let mut dim = Message::default();
        match d.parse::<i64>() {
            Ok(v) => dim.int64(1, v),
            Err(_) => dim.string(2, d),
        }
        dims.message(1, &dim);
    }
    let mut tensor = Message::default();
    tensor.int64(1, FLOAT);
    tensor.message(2, &dims);
    let mut ty = Message::default();
    ty.message(1, &tensor);
    let mut m = Message::default();
    m.string(1, name);
    m.message(2, &ty);
    m.string(3, doc);
    m
}

/// A protobuf message being written: fields appended in order.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire_type: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire_type));
    }

    /// Wire type 0; negative values take ten bytes, as protobuf's int64 does.
    fn int64(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }

    fn fixed32(&mut self, field: u32, v: u32) {
        self.key(field, 5);
        self.0.extend(v.to_le_bytes());
    }

    /// Wire type 2.
    fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend(v);
    }

    fn string(&mut self, field: u32, v: &str) {
        self.bytes(field, v.as_bytes());
    }

    fn message(&mut self, field: u32, m: &Message) {
        self.bytes(field, &m.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_follow_the_protobuf_encoding() {
        // The examples of the protobuf encoding guide: 1 → 01, 150 → 96 01; field 1 varint 150
        // → 08 96 01; field 2 string "testing" → 12 07 74 65 73 74 69 6e 67.
        let mut m = Message::default();
        m.varint(1);
        m.varint(150);
        m.int64(1, 150);
        m.string(2, "testing");
        assert_eq!(
            m.0,
            [
                0x01, 0x96, 0x01, 0x08, 0x96, 0x01, 0x12, 0x07, b't', b'e', b's', b't', b'i', b'n',
                b'g'
            ]
        );
        let mut m = Message::default();
        m.int64(1, -1);
        assert_eq!(m.0.len(), 11);
        assert_eq!(m.0[10], 0x01);
    }
}
