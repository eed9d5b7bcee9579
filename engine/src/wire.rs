//! Wire messages between a hospital's client half and the coordinator's server half.
//!
//! Binary, little-endian, versioned: `[version u8][tag u8][body]`. Every vector is prefixed by
//! its u32 length, checked against the bytes that remain before anything is allocated, so a
//! garbled or truncated frame gives a [`WireError`], never a panic or a huge allocation.
//!
//! What the coordinator sees: in `split-he`, ciphertexts of activations and of dJ/dlogits, and
//! the batch-summed gradient of its own layer; in `split`, plaintext activations and gradients.

use crate::he::{DownloadCiphertext, POLYNOMIAL_SIZE, UploadCiphertext};

/// Protocol version carried by every message.
pub const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    #[error("{what} is out of range: {value}")]
    OutOfRange { what: &'static str, value: u64 },
}

/// Client → server.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientMessage {
    /// Cut-layer activations of a batch. `train` tells the server to expect the backward message.
    Forward {
        train: bool,
        batch: u16,
        activations: Activations,
    },
    /// The gradient of the batch's logits.
    Backward(Gradients),
    /// With frozen client layers (a job with `train_client: false`): the cut-layer activations of
    /// a batch, with the batch-summed gradient of the server layer from the last training batch
    /// (if one is pending), which the server applies before this batch's forward pass. The
    /// server answers `Logits` and expects no backward message.
    FrozenForward {
        batch: u16,
        activations: Activations,
        update: Option<LayerGradient>,
    },
    /// With frozen client layers: the gradient of the last training batch, at the end of a
    /// visit; answered by `Updated`.
    Update(LayerGradient),
}

/// The batch-summed gradient of the server layer, as only the client can compute it (from the
/// activations and dJ/doutputs): weight `[cut, outputs]` row-major, bias `[outputs]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGradient {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Activations {
    /// `[B, cut]` row-major.
    Plain(Vec<f32>),
    /// One ciphertext per chunk of at most `lanes` samples.
    Encrypted(Vec<UploadCiphertext>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Gradients {
    /// dJ/dlogits `[B, classes]`.
    Plain(Vec<f32>),
    /// Enc(dJ/dlogits), grouped per chunk, and the batch-summed gradient of the server layer
    /// (`[cut, classes]` weight, `[classes]` bias) that only the client can compute.
    Encrypted {
        uploads: Vec<UploadCiphertext>,
        weight_grad: Vec<f32>,
        bias_grad: Vec<f32>,
    },
}

/// Server → client.
#[derive(Clone, Debug, PartialEq)]
pub enum ServerMessage {
    Logits(Outputs),
    InputGradients(Outputs),
    /// The update of a `ClientMessage::Update` is applied.
    Updated,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outputs {
    Plain(Vec<f32>),
    Encrypted(Vec<DownloadCiphertext>),
}

/// The kind of an encoded client message (its tag), for counting what the server receives;
/// `None` for bytes that are not one of this version's.
pub fn client_kind(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [VERSION, 1, ..] => Some("Forward"),
        [VERSION, 2, ..] => Some("Backward"),
        [VERSION, 3, ..] => Some("FrozenForward"),
        [VERSION, 4, ..] => Some("Update"),
        _ => None,
    }
}

/// The kind of an encoded server message (its tag).
pub fn server_kind(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [VERSION, 1, ..] => Some("Logits"),
        [VERSION, 2, ..] => Some("InputGradients"),
        [VERSION, 3, ..] => Some("Updated"),
        _ => None,
    }
}

impl ClientMessage {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Self::Forward {
                train,
                batch,
                activations,
            } => {
                w.u8(1);
                w.u8(*train as u8);
                w.u16(*batch);
                w.activations(activations);
            }
            Self::Backward(Gradients::Plain(v)) => {
                w.u8(2);
                w.u8(0);
                w.f32s(v);
            }
            Self::Backward(Gradients::Encrypted {
                uploads,
                weight_grad,
                bias_grad,
            }) => {
                w.u8(2);
                w.u8(1);
                w.uploads(uploads);
                w.f32s(weight_grad);
                w.f32s(bias_grad);
            }
            Self::FrozenForward {
                batch,
                activations,
                update,
            } => {
                w.u8(3);
                w.u16(*batch);
                w.activations(activations);
                match update {
                    None => w.u8(0),
                    Some(g) => {
                        w.u8(1);
                        w.layer_gradient(g);
                    }
                }
            }
            Self::Update(g) => {
                w.u8(4);
                w.layer_gradient(g);
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes)?;
        let message = match r.u8()? {
            1 => {
                let train = r.bool()?;
                let batch = r.u16()?;
                let activations = r.activations()?;
                Self::Forward {
                    train,
                    batch,
                    activations,
                }
            }
            2 => Self::Backward(match r.u8()? {
                0 => Gradients::Plain(r.f32s()?),
                1 => Gradients::Encrypted {
                    uploads: r.uploads()?,
                    weight_grad: r.f32s()?,
                    bias_grad: r.f32s()?,
                },
                tag => {
                    return Err(WireError::UnknownTag {
                        what: "gradients",
                        tag,
                    });
                }
            }),
            3 => {
                let batch = r.u16()?;
                let activations = r.activations()?;
                let update = match r.bool()? {
                    false => None,
                    true => Some(r.layer_gradient()?),
                };
                Self::FrozenForward {
                    batch,
                    activations,
                    update,
                }
            }
            4 => Self::Update(r.layer_gradient()?),
            tag => {
                return Err(WireError::UnknownTag {
                    what: "client message",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(message)
    }
}

impl ServerMessage {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        let (tag, outputs) = match self {
            Self::Logits(o) => (1, o),
            Self::InputGradients(o) => (2, o),
            Self::Updated => {
                w.u8(3);
                return w.0;
            }
        };
        w.u8(tag);
        match outputs {
            Outputs::Plain(v) => {
                w.u8(0);
                w.f32s(v);
            }
            Outputs::Encrypted(cts) => {
                w.u8(1);
                w.u32(cts.len() as u32);
                for ct in cts {
                    w.u8(ct.log_modulus);
                    w.u16(ct.bodies);
                    w.u64s(&ct.packed);
                }
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes)?;
        let tag = r.u8()?;
        if tag == 3 {
            r.finish()?;
            return Ok(Self::Updated);
        }
        let outputs = match r.u8()? {
            0 => Outputs::Plain(r.f32s()?),
            1 => {
                let count = r.len(1 + 2 + 4)?;
                let mut cts = Vec::with_capacity(count);
                for _ in 0..count {
                    let log_modulus = r.u8()?;
                    let bodies = r.u16()?;
                    if bodies as usize > POLYNOMIAL_SIZE {
                        return Err(WireError::OutOfRange {
                            what: "bodies",
                            value: bodies as u64,
                        });
                    }
                    cts.push(DownloadCiphertext {
                        log_modulus,
                        bodies,
                        packed: r.u64s()?,
                    });
                }
                Outputs::Encrypted(cts)
            }
            tag => {
                return Err(WireError::UnknownTag {
                    what: "outputs",
                    tag,
                });
            }
        };
        let message = match tag {
            1 => Self::Logits(outputs),
            2 => Self::InputGradients(outputs),
            tag => {
                return Err(WireError::UnknownTag {
                    what: "server message",
                    tag,
                });
            }
        };
        r.finish()?;
        Ok(message)
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn new() -> Self {
        Self(vec![VERSION])
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.u32(v.len() as u32);
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
    fn u64s(&mut self, v: &[u64]) {
        self.u32(v.len() as u32);
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
    fn activations(&mut self, activations: &Activations) {
        match activations {
            Activations::Plain(v) => {
                self.u8(0);
                self.f32s(v);
            }
            Activations::Encrypted(cts) => {
                self.u8(1);
                self.uploads(cts);
            }
        }
    }
    fn layer_gradient(&mut self, g: &LayerGradient) {
        self.f32s(&g.weight);
        self.f32s(&g.bias);
    }
    fn uploads(&mut self, cts: &[UploadCiphertext]) {
        self.u32(cts.len() as u32);
        for ct in cts {
            self.0.extend_from_slice(&ct.seed.to_le_bytes());
            self.u64s(&ct.body);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Self { bytes, offset: 0 };
        match r.u8()? {
            VERSION => Ok(r),
            v => Err(WireError::Version(v)),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let rest = self.bytes.len() - self.offset;
        if rest < n {
            return Err(WireError::Truncated {
                offset: self.offset,
                needed: n - rest,
            });
        }
        let out = &self.bytes[self.offset..self.offset + n];
        self.offset += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::OutOfRange {
                what: "flag",
                value: v as u64,
            }),
        }
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A length prefix for items of at least `item_size` bytes each, checked against what remains.
    fn len(&mut self, item_size: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        let rest = self.bytes.len() - self.offset;
        if n.saturating_mul(item_size) > rest {
            return Err(WireError::Truncated {
                offset: self.offset,
                needed: n * item_size - rest,
            });
        }
        Ok(n)
    }

    fn f32s(&mut self) -> Result<Vec<f32>, WireError> {
        let n = self.len(4)?;
        Ok(self
            .take(4 * n)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    fn u64s(&mut self) -> Result<Vec<u64>, WireError> {
        let n = self.len(8)?;
        Ok(self
            .take(8 * n)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    fn activations(&mut self) -> Result<Activations, WireError> {
        match self.u8()? {
            0 => Ok(Activations::Plain(self.f32s()?)),
            1 => Ok(Activations::Encrypted(self.uploads()?)),
            tag => Err(WireError::UnknownTag {
                what: "activations",
                tag,
            }),
        }
    }
    fn layer_gradient(&mut self) -> Result<LayerGradient, WireError> {
        Ok(LayerGradient {
            weight: self.f32s()?,
            bias: self.f32s()?,
        })
    }
    fn uploads(&mut self) -> Result<Vec<UploadCiphertext>, WireError> {
        let n = self.len(16 + 4)?;
        (0..n)
            .map(|_| {
                Ok(UploadCiphertext {
                    seed: u128::from_le_bytes(self.array()?),
                    body: self.u64s()?,
                })
            })
            .collect()
    }

    fn finish(self) -> Result<(), WireError> {
        match self.bytes.len() - self.offset {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encoded samples of every message shape, each with whether it is a client message.
    fn samples() -> Vec<(Vec<u8>, bool)> {
        let upload = UploadCiphertext {
            seed: 42,
            body: vec![1, 2, 3],
        };
        let download = DownloadCiphertext {
            log_modulus: 30,
            bodies: 4,
            packed: vec![9; 5],
        };
        let client = vec![
            ClientMessage::Forward {
                train: true,
                batch: 4,
                activations: Activations::Plain(vec![1.5; 8]),
            }
            .encode(),
            ClientMessage::Forward {
                train: false,
                batch: 2,
                activations: Activations::Encrypted(vec![upload.clone(), upload.clone()]),
            }
            .encode(),
            ClientMessage::Backward(Gradients::Plain(vec![-0.25; 10])).encode(),
            ClientMessage::Backward(Gradients::Encrypted {
                uploads: vec![upload.clone()],
                weight_grad: vec![0.5; 6],
                bias_grad: vec![0.1; 2],
            })
            .encode(),
            ClientMessage::FrozenForward {
                batch: 1,
                activations: Activations::Encrypted(vec![upload]),
                update: Some(LayerGradient {
                    weight: vec![0.25; 6],
                    bias: vec![-1.0; 2],
                }),
            }
            .encode(),
            ClientMessage::FrozenForward {
                batch: 2,
                activations: Activations::Plain(vec![0.5; 4]),
                update: None,
            }
            .encode(),
            ClientMessage::Update(LayerGradient {
                weight: vec![2.0; 4],
                bias: vec![1.0; 2],
            })
            .encode(),
        ];
        let server = vec![
            ServerMessage::Logits(Outputs::Encrypted(vec![download.clone(), download])).encode(),
            ServerMessage::InputGradients(Outputs::Plain(vec![3.0; 3])).encode(),
            ServerMessage::Updated.encode(),
        ];
        client
            .into_iter()
            .map(|b| (b, true))
            .chain(server.into_iter().map(|b| (b, false)))
            .collect()
    }

    fn decode(bytes: &[u8], client: bool) -> Result<(), WireError> {
        if client {
            ClientMessage::decode(bytes).map(|_| ())
        } else {
            ServerMessage::decode(bytes).map(|_| ())
        }
    }

    #[test]
    fn every_message_has_its_kind() {
        let kinds: Vec<_> = samples()
            .iter()
            .map(|(b, client)| match client {
                true => client_kind(b),
                false => server_kind(b),
            })
            .collect();
        let expected = [
            "Forward",
            "Forward",
            "Backward",
            "Backward",
            "FrozenForward",
            "FrozenForward",
            "Update",
            "Logits",
            "InputGradients",
            "Updated",
        ];
        assert_eq!(kinds, expected.map(Some));
        assert_eq!(client_kind(&[VERSION, 9]), None);
        assert_eq!(client_kind(&[VERSION + 1, 1]), None);
        assert_eq!(server_kind(&[]), None);
    }

    #[test]
    fn messages_round_trip() {
        let up = UploadCiphertext {
            seed: u128::MAX - 3,
            body: vec![7, 8],
        };
        let m = ClientMessage::Backward(Gradients::Encrypted {
            uploads: vec![up],
            weight_grad: vec![1.0, -2.0],
            bias_grad: vec![0.5],
        });
        assert_eq!(ClientMessage::decode(&m.encode()), Ok(m));
        let s = ServerMessage::Logits(Outputs::Encrypted(vec![DownloadCiphertext {
            log_modulus: 30,
            bodies: 40,
            packed: vec![1, 2, 3],
        }]));
        assert_eq!(ServerMessage::decode(&s.encode()), Ok(s));
        let f = ClientMessage::FrozenForward {
            batch: 3,
            activations: Activations::Plain(vec![1.0, 2.0, 3.0]),
            update: Some(LayerGradient {
                weight: vec![0.5],
                bias: vec![-0.5],
            }),
        };
        assert_eq!(ClientMessage::decode(&f.encode()), Ok(f));
        assert_eq!(
            ServerMessage::decode(&ServerMessage::Updated.encode()),
            Ok(ServerMessage::Updated)
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (bytes, client) in samples() {
            assert!(decode(&bytes, client).is_ok());
            for cut in 0..bytes.len() {
                assert!(
                    decode(&bytes[..cut], client).is_err(),
                    "prefix of {cut} bytes accepted"
                );
            }
        }
    }

    #[test]
    fn garbled_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (bytes, client) in samples() {
            for _ in 0..500 {
                let mut b = bytes.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                let _ = decode(&b, client);
            }
        }
        let huge_len = [VERSION, 2, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            ClientMessage::decode(&huge_len),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(ClientMessage::decode(&[9, 1]), Err(WireError::Version(9)));
        assert_eq!(
            ClientMessage::decode(&[VERSION, 7]),
            Err(WireError::UnknownTag {
                what: "client message",
                tag: 7
            })
        );
        let mut extra = ClientMessage::Backward(Gradients::Plain(vec![])).encode();
        extra.push(0);
        assert_eq!(
            ClientMessage::decode(&extra),
            Err(WireError::TrailingBytes(1))
        );
    }
}
