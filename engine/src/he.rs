//! Homomorphic encryption of the cut layer: GLWE over tfhe's `core_crypto`, with coefficient packing.
//!
//! # Parameters
//! GLWE dimension, polynomial size, noise distribution and key distribution are those of tfhe's
//! 128-bit parameter set [`PARAMETER_SET`] (`V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`):
//! k = 1, N = 2048, q = 2^64, noise TUniform(2^17), binary secret key (what shortint generates
//! for that set). We only use its GLWE part; there is no bootstrapping and no key switching, so
//! no evaluation key ever leaves the client.
//!
//! # Packing (N = 2048, cut width D ≤ N, lanes L = ⌊N / D⌋, batch chunk of n ≤ L samples)
//! C below is the server layer's output count: the logits, or the width of the client's tail.
//! * Forward upload: `A(X) = Σ_b Σ_i a_b[i]·X^{L·i + b}` (one ciphertext per chunk).
//!   The server multiplies by `P_g(X) = Σ_k X^{k·n}·(w_{0,j} − Σ_{i≥1} w_{i,j}·X^{N − L·i})` with
//!   `j = g·G + k`, `G = L / n` logits per output ciphertext; coefficient `k·n + b` of the product
//!   is `⟨a_b, w_j⟩`, every other coefficient is discarded. Only the first `G·n` bodies come back.
//! * Backward upload: all of a chunk's `n·C` values of dJ/dlogits in one ciphertext (chunks of
//!   more than `⌊N / C⌋` samples use one upload per `⌊N / C⌋`), laid out for feature tiles of
//!   width `r` with `C·n·r ≤ N`: `U(X) = Σ_b Σ_j g_{b,j}·X^{r·b + j·T}`, `T = n·r`. The cut is
//!   cut into `m = ⌈D / ⌊N / (C·n)⌋⌉` tiles of `r = ⌈D / m⌉` features; for tile t the server
//!   multiplies U by `V_t(X) = Σ_j Σ_{i in t} w_{i,j}·X^{(i − t·r) − j·T}`. Coefficient
//!   `r·b + (i − t·r)` of the product is `Σ_j g_{b,j}·w_{i,j} = dJ/da_b[i]`; the products of
//!   `g_{b,j}` with `w_{i,j'}`, `j' ≠ j`, land a non-zero multiple of T away, in `[T, N)`
//!   (as `C·T ≤ N`). One output per tile; only its first `r·(n − 1) + |t|` bodies come back.
//!   Uploads cost a whole body each and outputs a whole mask, so one upload and m outputs
//!   (M1 at batch 4: 1 and 3) move fewer bytes than one upload per logit group into a single
//!   output would (3 and 1).
//! * Both only need `L·D ≤ N` and `C ≤ N` (every exponent above stays below N, unwanted
//!   products land on discarded coefficients), so any cut width up to N packs; one that
//!   divides N wastes no lane.
//!
//! # Scales and noise budget (checked by the tests below)
//! | quantity                      | scale            | bound it must respect                      |
//! |-------------------------------|------------------|--------------------------------------------|
//! | activation `a`                | 2^36             | rounding error 2^-37                       |
//! | server weight `w`             | 2^20             | rounding error 2^-21 per weight            |
//! | logit `⟨a, w⟩ + bias`         | 2^56             | no wrap-around for \|logit\| < 2^7         |
//! | gradient `dJ/dlogit`          | 2^40             | rounding error 2^-41                       |
//! | input gradient `dJ/da`        | 2^60             | no wrap-around for \|dJ/da\| < 2^3         |
//!
//! Errors on a decrypted logit (in units of 2^64, std. deviations unless stated):
//! 1. fresh noise TUniform(17): σ = 2^17/√3 ≈ 2^16.2 per coefficient;
//! 2. upload body rounded to [`UPLOAD_LOG_MODULUS`] = 46 bits: uniform in ±2^17, σ ≈ 2^16.2;
//!    (1)+(2) give σ ≈ 2^16.7, multiplied by the weights: σ ≈ 2^16.7 · 2^20 · ‖w_j‖₂;
//! 3. FFT (f64) error of the ciphertext × weight product: it grows with the integer operand, so
//!    the weights are split into 10-bit limbs (see `Limbs`); that leaves ≈ 2^32, far below (1)+(2)
//!    (without the split it would be ≈ 2^40 and dominate);
//! 4. modulus switch of the returned ciphertext to [`DOWNLOAD_LOG_MODULUS`] = 32 bits: the mask
//!    rounding (±2^31 uniform, σ = 2^31/√3) times the ~N/2 ones of the binary key gives
//!    σ ≈ 2^31 · √(N/2) / √3 ≈ 2^35.2, the body rounding adds 2^30.2.
//!
//! With ‖w_j‖₂ ≤ 4 (the trained M1 layer sits near 1) this is σ ≈ 2^38.7 + 2^35.2 → ≈ 2^38.8 on a
//! 2^56 scale: 2^-17.2 ≈ 7·10^-6 in logit units, so ten standard deviations stay below 1e-4.
//! The bound depends on the weight norm alone, not on D or C: it holds for every shape a job may
//! have (D ≤ 2048, C ≤ 64, `model::MAX_CUT`, `model::MAX_SERVER_OUTPUTS`; tested below at the
//! extremes).
//! Input gradients (scale 2^60): every coefficient of a gradient upload carries noise and meets
//! every weight of a tile, so (1)+(2) are multiplied by the tile's part of the matrix, at most
//! the whole of it: 2^16.7 · 2^20 · ‖W‖_F (≤ 2^38.7 for ‖W‖_F ≤ 4), plus (4) once per output: σ ≈ 2^38.8 → 2^-21.2 ≈ 4·10^-7 in gradient units. With 30 bits, (4)
//! was 4× larger and measurably pulled 10-epoch Adam trajectories away from the plaintext ones
//! (docs/benchmarks.md); 32 bits cost 3 % more traffic. ‖W‖_F grows with C: at ‖w_j‖₂ = 4 for
//! all 64 outputs it is 32, σ ≈ 2^41.7 → 2^-18.3 ≈ 3·10^-6, still far below the 1e-4 tested.
//! The FFT rounding never touches encryption: the body is computed exactly with an NTT.

use std::fmt;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;
use tfhe::core_crypto::commons::math::random::{DynamicDistribution, Seed};
use tfhe::core_crypto::fft_impl::common::modulus_switch;
use tfhe::core_crypto::fft_impl::fft64::c64;
use tfhe::core_crypto::fft_impl::fft64::math::fft::Fft;
use tfhe::core_crypto::fft_impl::fft64::math::polynomial::FourierPolynomial;
use tfhe::core_crypto::prelude::compressed_modulus_switched_glwe_ciphertext::CompressedModulusSwitchedGlweCiphertext;
use tfhe::core_crypto::prelude::packed_integers::PackedIntegers;
use tfhe::core_crypto::prelude::*;

use tfhe::shortint::parameters::ClassicPBSParameters;
use tfhe_ntt::native_binary64::Plan32;

/// tfhe's 128-bit parameter set whose GLWE dimension, polynomial size, noise and key
/// distributions this module uses.
pub const PARAMETER_SET: ClassicPBSParameters =
    tfhe::shortint::parameters::v1_8::V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128;

/// Polynomial size N of [`PARAMETER_SET`].
pub const POLYNOMIAL_SIZE: usize = 2048;
/// log2 of the fixed-point scale of cut-layer activations.
pub const ACTIVATION_SCALE_LOG: u32 = 36;
/// log2 of the fixed-point scale of the server's weights.
pub const WEIGHT_SCALE_LOG: u32 = 20;
/// log2 of the fixed-point scale of dJ/dlogits.
pub const GRADIENT_SCALE_LOG: u32 = 40;
/// Bits kept of each uploaded body coefficient (the 18 dropped bits sit under the noise).
pub const UPLOAD_LOG_MODULUS: usize = 46;
/// Bits kept of each returned mask and body coefficient after modulus switching.
pub const DOWNLOAD_LOG_MODULUS: usize = 32;

const GLWE_SIZE: GlweSize = GlweSize(2);

/// Errors from malformed ciphertexts or shapes that do not fit the packing.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeError {
    #[error("cut width {cut} must be 1 to the polynomial size {POLYNOMIAL_SIZE}, with outputs")]
    CutWidth { cut: usize },
    #[error("{classes} server outputs: the packing holds 1 to {POLYNOMIAL_SIZE}")]
    Outputs { classes: usize },
    #[error("a chunk holds 1 to {lanes} samples, got {got}")]
    ChunkSize { lanes: usize, got: usize },
    #[error("expected {expected} values, got {got}")]
    ValueCount { expected: usize, got: usize },
    #[error("expected {expected} ciphertexts, got {got}")]
    CiphertextCount { expected: usize, got: usize },
    #[error("ciphertext carries {got} packed words, expected {expected}")]
    PackedLength { expected: usize, got: usize },
    #[error("ciphertext declares {bodies} bodies, expected {expected}")]
    Bodies { expected: usize, bodies: usize },
    #[error("ciphertext declares a {got}-bit modulus, expected {expected}")]
    LogModulus { expected: usize, got: usize },
    #[error("value {value} is not finite or exceeds the packing range ±{limit}")]
    OutOfRange { value: f64, limit: f64 },
}

/// Packing geometry of one split model: cut width D and class count C on N = 2048.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packing {
    cut: usize,
    classes: usize,
    lanes: usize,
}

impl Packing {
    pub fn new(cut: usize, classes: usize) -> Result<Self, HeError> {
        if cut == 0 || cut > POLYNOMIAL_SIZE {
            return Err(HeError::CutWidth { cut });
        }
        if classes == 0 || classes > POLYNOMIAL_SIZE {
            return Err(HeError::Outputs { classes });
        }
        Ok(Self {
            cut,
            classes,
            lanes: POLYNOMIAL_SIZE / cut,
        })
    }

    /// Samples one ciphertext carries (L = N / D).
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// Logits per output ciphertext for a chunk of `n` samples.
    fn per_group(&self, n: usize) -> usize {
        self.lanes / n
    }

    /// Output ciphertexts of the forward pass of a chunk of `n` samples.
    pub fn groups(&self, n: usize) -> usize {
        self.classes.div_ceil(self.per_group(n))
    }

    /// Samples one backward upload carries (its `n·C` values fit N coefficients).
    fn upload_samples(&self) -> usize {
        POLYNOMIAL_SIZE / self.classes
    }

    /// Gradient uploads of the backward pass of a chunk of `n` samples (1 unless `n·C > N`).
    pub fn backward_uploads(&self, n: usize) -> usize {
        n.div_ceil(self.upload_samples())
    }

    /// Layout of backward upload `u` of a chunk of `n` samples.
    fn tiles(&self, n: usize, u: usize) -> Tiles {
        let first = u * self.upload_samples();
        let samples = self.upload_samples().min(n - first);
        let count = self
            .cut
            .div_ceil(POLYNOMIAL_SIZE / (self.classes * samples));
        Tiles {
            first,
            samples,
            width: self.cut.div_ceil(count),
            count,
        }
    }

    /// Every backward upload of a chunk with its layout, in order.
    fn all_tiles(&self, n: usize) -> impl Iterator<Item = Tiles> + use<> {
        let p = *self;
        (0..self.backward_uploads(n)).map(move |u| p.tiles(n, u))
    }

    /// Output ciphertexts of the backward pass of a chunk of `n` samples (one per tile).
    pub fn backward_outputs(&self, n: usize) -> usize {
        self.all_tiles(n).map(|t| t.count).sum()
    }

    /// Bodies the client needs from each backward output of a chunk of `n` samples, in order.
    pub fn backward_output_bodies(&self, n: usize) -> Vec<usize> {
        self.all_tiles(n)
            .flat_map(|t| (0..t.count).map(move |o| t.bodies(self.cut, o)))
            .collect()
    }

    /// Sizes of the chunks a batch of `batch` samples is cut into.
    pub fn chunks(&self, batch: usize) -> impl Iterator<Item = usize> + use<> {
        let lanes = self.lanes;
        (0..batch.div_ceil(lanes)).map(move |c| lanes.min(batch - c * lanes))
    }

    fn check_chunk(&self, n: usize) -> Result<(), HeError> {
        if n == 0 || n > self.lanes {
            return Err(HeError::ChunkSize {
                lanes: self.lanes,
                got: n,
            });
        }
        Ok(())
    }

    fn logits_in_group(&self, n: usize, g: usize) -> std::ops::Range<usize> {
        let per = self.per_group(n);
        g * per..((g + 1) * per).min(self.classes)
    }

    /// Plaintext polynomial of a chunk's activations.
    ///
    /// # Shapes
    /// `activations`: `[n, D]` row-major. Returns N coefficients.
    pub fn encode_activations(&self, activations: &[f32], n: usize) -> Result<Vec<u64>, HeError> {
        self.check_chunk(n)?;
        expect_len(activations.len(), n * self.cut)?;
        let mut poly = vec![0u64; POLYNOMIAL_SIZE];
        for (b, row) in activations.chunks_exact(self.cut).enumerate() {
            for (i, &a) in row.iter().enumerate() {
                poly[self.lanes * i + b] = to_fixed(a as f64, ACTIVATION_SCALE_LOG)?;
            }
        }
        Ok(poly)
    }

    /// Plaintext polynomial of backward upload `u` of a chunk's dJ/dlogits.
    ///
    /// # Shapes
    /// `grads`: `[n, C]` row-major. Returns N coefficients.
    pub fn encode_gradients(&self, grads: &[f32], n: usize, u: usize) -> Result<Vec<u64>, HeError> {
        self.check_chunk(n)?;
        expect_len(grads.len(), n * self.classes)?;
        if u >= self.backward_uploads(n) {
            return Err(HeError::CiphertextCount {
                expected: self.backward_uploads(n),
                got: u + 1,
            });
        }
        let t = self.tiles(n, u);
        let mut poly = vec![0u64; POLYNOMIAL_SIZE];
        for b in 0..t.samples {
            for j in 0..self.classes {
                poly[t.width * b + j * t.stride()] = to_fixed(
                    grads[(t.first + b) * self.classes + j] as f64,
                    GRADIENT_SCALE_LOG,
                )?;
            }
        }
        Ok(poly)
    }

    /// Bodies the client needs from forward output `g` of a chunk of `n` samples.
    pub fn forward_output_bodies(&self, n: usize, g: usize) -> usize {
        self.logits_in_group(n, g).len() * n
    }

    /// Logits from the decrypted forward outputs of one chunk.
    ///
    /// # Shapes
    /// `phases[g]`: the first bodies of output g. Returns `[n, C]` row-major.
    pub fn decode_logits(&self, phases: &[Vec<u64>], n: usize) -> Result<Vec<f32>, HeError> {
        self.check_chunk(n)?;
        if phases.len() != self.groups(n) {
            return Err(HeError::CiphertextCount {
                expected: self.groups(n),
                got: phases.len(),
            });
        }
        let mut logits = vec![0f32; n * self.classes];
        for (g, phase) in phases.iter().enumerate() {
            expect_len(phase.len(), self.forward_output_bodies(n, g))?;
            let first = self.logits_in_group(n, g).start;
            for j in self.logits_in_group(n, g) {
                for b in 0..n {
                    logits[b * self.classes + j] = from_fixed(
                        phase[(j - first) * n + b],
                        ACTIVATION_SCALE_LOG + WEIGHT_SCALE_LOG,
                    ) as f32;
                }
            }
        }
        Ok(logits)
    }

    /// dJ/da from the decrypted backward outputs of one chunk.
    ///
    /// # Shapes
    /// `phases[k]`: the first bodies of output k ([`Self::backward_output_bodies`]).
    /// Returns `[n, D]` row-major.
    pub fn decode_input_gradients(
        &self,
        phases: &[Vec<u64>],
        n: usize,
    ) -> Result<Vec<f32>, HeError> {
        self.check_chunk(n)?;
        let bodies = self.backward_output_bodies(n);
        if phases.len() != bodies.len() {
            return Err(HeError::CiphertextCount {
                expected: bodies.len(),
                got: phases.len(),
            });
        }
        for (phase, &len) in phases.iter().zip(&bodies) {
            expect_len(phase.len(), len)?;
        }
        let mut grads = vec![0f32; n * self.cut];
        let mut phases = phases.iter();
        for t in self.all_tiles(n) {
            for o in 0..t.count {
                let phase = phases.next().expect("counted above");
                for b in 0..t.samples {
                    for (local, i) in t.features(self.cut, o).enumerate() {
                        grads[(t.first + b) * self.cut + i] = from_fixed(
                            phase[t.width * b + local],
                            GRADIENT_SCALE_LOG + WEIGHT_SCALE_LOG,
                        ) as f32;
                    }
                }
            }
        }
        Ok(grads)
    }

    /// Weight polynomial `P_g` of forward output `g` (integers, two's complement).
    fn forward_weights(&self, weights: &[i64], n: usize, g: usize) -> Vec<u64> {
        let mut poly = vec![0u64; POLYNOMIAL_SIZE];
        let first = self.logits_in_group(n, g).start;
        for j in self.logits_in_group(n, g) {
            let shift = (j - first) * n;
            poly[shift] = weights[j] as u64;
            for i in 1..self.cut {
                poly[POLYNOMIAL_SIZE - self.lanes * i + shift] =
                    weights[i * self.classes + j].wrapping_neg() as u64;
            }
        }
        poly
    }

    /// Weight polynomial `V_t` of tile `o` of backward upload `u` (integers, two's complement).
    fn backward_weights(&self, weights: &[i64], n: usize, u: usize, o: usize) -> Vec<u64> {
        let t = self.tiles(n, u);
        let mut poly = vec![0u64; POLYNOMIAL_SIZE];
        for (local, i) in t.features(self.cut, o).enumerate() {
            for j in 0..self.classes {
                let w = weights[i * self.classes + j];
                if j == 0 {
                    poly[local] = w as u64;
                } else {
                    poly[POLYNOMIAL_SIZE - j * t.stride() + local] = w.wrapping_neg() as u64;
                }
            }
        }
        poly
    }
}

/// The layout of one backward upload: samples `first..first + samples` of a chunk, the cut in
/// `count` tiles of `width` features (the last may be narrower), `C·samples·width ≤ N`.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    first: usize,
    samples: usize,
    width: usize,
    count: usize,
}

impl Tiles {
    /// T: the distance between two logits' coefficients in the upload.
    fn stride(&self) -> usize {
        self.samples * self.width
    }

    fn features(&self, cut: usize, o: usize) -> std::ops::Range<usize> {
        o * self.width..((o + 1) * self.width).min(cut)
    }

    /// The prefix of tile `o`'s product that holds its input gradients.
    fn bodies(&self, cut: usize, o: usize) -> usize {
        self.width * (self.samples - 1) + self.features(cut, o).len()
    }
}

fn expect_len(got: usize, expected: usize) -> Result<(), HeError> {
    if got != expected {
        return Err(HeError::ValueCount { expected, got });
    }
    Ok(())
}

/// Rounds `x·2^scale_log` to a two's-complement torus element; refuses values that would wrap.
fn to_fixed(x: f64, scale_log: u32) -> Result<u64, HeError> {
    let limit = 2f64.powi(62 - scale_log as i32);
    if !x.is_finite() || x.abs() >= limit {
        return Err(HeError::OutOfRange { value: x, limit });
    }
    // Round half away from zero; the cast truncates (and compiles to one instruction).
    let y = x * 2f64.powi(scale_log as i32);
    Ok((y + 0.5f64.copysign(y)) as i64 as u64)
}

fn from_fixed(v: u64, scale_log: u32) -> f64 {
    v as i64 as f64 / 2f64.powi(scale_log as i32)
}

/// A seeded GLWE ciphertext as uploaded: the mask is regenerated from `seed` (ChaCha12, see
/// `expand_mask`), the body is kept to its [`UPLOAD_LOG_MODULUS`] high bits and bit-packed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadCiphertext {
    pub seed: u128,
    pub body: Vec<u64>,
}

impl UploadCiphertext {
    /// Packed words of a valid body.
    pub const BODY_WORDS: usize = (POLYNOMIAL_SIZE * UPLOAD_LOG_MODULUS).div_ceil(64);
}

/// A modulus-switched GLWE ciphertext as returned: mask and the first `bodies` body coefficients,
/// each rounded to `log_modulus` bits and bit-packed (tfhe's `CompressedModulusSwitchedGlweCiphertext`
/// layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadCiphertext {
    pub log_modulus: u8,
    pub bodies: u16,
    pub packed: Vec<u64>,
}

impl DownloadCiphertext {
    fn values(&self) -> usize {
        POLYNOMIAL_SIZE + self.bodies as usize
    }

    fn expected_words(&self) -> usize {
        (self.values() * self.log_modulus as usize).div_ceil(64)
    }
}

/// Unpacks `count` values of `bits` bits, low bits first (tfhe's `PackedIntegers` layout).
fn unpack(words: &[u64], bits: usize, count: usize) -> Vec<u64> {
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    (0..count)
        .map(|i| {
            let start = i * bits;
            let (block, offset) = (start / 64, start % 64);
            let mut v = words[block] >> offset;
            if offset + bits > 64 {
                v |= words[block + 1] << (64 - offset);
            }
            v & mask
        })
        .collect()
}

/// The client's GLWE secret key and the generators it encrypts with. It has no serialized form:
/// no wire message can carry it.
///
/// ```compile_fail
/// fn serializable<T: serde::Serialize>() {}
/// serializable::<medsplit_engine::he::ClientKey>();
/// ```
pub struct ClientKey {
    key: GlweSecretKeyOwned<u64>,
    key_fourier: Vec<c64>,
    ntt: Plan32,
    fft: Fft,
    buffers: ComputationBuffers,
    /// Seeds of the masks and the encryption noise: ChaCha12 keyed from the OS entropy.
    randomness: ChaCha12Rng,
    /// Pads made ahead of time by [`ClientKey::prepare`], each used by one encryption.
    pads: Vec<Pad>,
}

/// The part of an encryption that does not depend on the message: a fresh mask seed and
/// `mask·s + e`. As secret as the key (body − pad is the message); used once, never sent.
struct Pad {
    seed: u128,
    body: Vec<u64>,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<secret>)")
    }
}

impl ClientKey {
    /// A fresh key from the operating system's entropy.
    pub fn generate() -> Self {
        let key_seed = new_seeder().seed();
        Self::with_key_seed(key_seed)
    }

    /// A key derived from `seed` (mask and noise seeds still come from the OS): for tests that
    /// need a reproducible key.
    pub fn from_seed(seed: u128) -> Self {
        Self::with_key_seed(Seed(seed))
    }

    fn with_key_seed(key_seed: Seed) -> Self {
        let params = PARAMETER_SET;
        assert_eq!(params.polynomial_size.0, POLYNOMIAL_SIZE);
        assert_eq!(params.glwe_dimension.0 + 1, GLWE_SIZE.0);
        let mut secret = SecretRandomGenerator::<DefaultRandomGenerator>::new(key_seed);
        let key = allocate_and_generate_new_binary_glwe_secret_key(
            params.glwe_dimension,
            params.polynomial_size,
            &mut secret,
        );
        let (fft, mut buffers) = fft_with_scratch();
        let key_fourier = fourier(&fft, &mut buffers, key.as_ref(), Read::Integer);
        let mut seeder = new_seeder();
        let mut entropy = [0u8; 32];
        entropy[..16].copy_from_slice(&seeder.seed().0.to_le_bytes());
        entropy[16..].copy_from_slice(&seeder.seed().0.to_le_bytes());
        Self {
            key,
            key_fourier,
            ntt: Plan32::try_new(POLYNOMIAL_SIZE).expect("N = 2048 has NTT roots"),
            fft,
            buffers,
            randomness: ChaCha12Rng::from_seed(entropy),
            pads: Vec::new(),
        }
    }

    /// Makes pads until `count` are ready: the message-independent part of the next `count`
    /// encryptions (mask expansion, the mask·s product, the noise: ~80 % of an encryption), so
    /// that it can run while the server computes. Optional: [`ClientKey::encrypt`] makes its
    /// own pad when none is ready.
    pub fn prepare(&mut self, count: usize) {
        while self.pads.len() < count {
            let pad = self.pad();
            self.pads.push(pad);
        }
    }

    fn pad(&mut self) -> Pad {
        let seed = (self.randomness.next_u64() as u128) << 64 | self.randomness.next_u64() as u128;
        let mask = expand_mask(seed);
        let mut body = vec![0u64; POLYNOMIAL_SIZE];
        self.ntt
            .negacyclic_polymul(&mut body, &mask, self.key.as_ref());
        let bound_log2 = noise_bound_log2();
        for b in &mut body {
            *b = b.wrapping_add(t_uniform(&mut self.randomness, bound_log2));
        }
        Pad { seed, body }
    }

    /// Encrypts one plaintext polynomial as a seeded ciphertext. The body is computed exactly:
    /// `round₄₆(mask·s + m + e)` with the product mask·s taken modulo 2^64 by an NTT.
    pub fn encrypt(&mut self, plaintext: &[u64]) -> UploadCiphertext {
        assert_eq!(plaintext.len(), POLYNOMIAL_SIZE, "plaintext length");
        let Pad { seed, body } = match self.pads.pop() {
            Some(pad) => pad,
            None => self.pad(),
        };
        let switched: Vec<u64> = body
            .iter()
            .zip(plaintext)
            .map(|(&b, &m)| {
                modulus_switch(b.wrapping_add(m), CiphertextModulusLog(UPLOAD_LOG_MODULUS))
            })
            .collect();
        let packed = PackedIntegers::pack(&switched, CiphertextModulusLog(UPLOAD_LOG_MODULUS));
        UploadCiphertext {
            seed,
            body: packed.packed_coeffs().to_vec(),
        }
    }

    /// Decrypts a returned ciphertext: the phases of its first `bodies` coefficients.
    pub fn decrypt(&mut self, ct: &DownloadCiphertext, bodies: usize) -> Result<Vec<u64>, HeError> {
        if ct.bodies as usize != bodies {
            return Err(HeError::Bodies {
                expected: bodies,
                bodies: ct.bodies as usize,
            });
        }
        if ct.log_modulus as usize != DOWNLOAD_LOG_MODULUS {
            return Err(HeError::LogModulus {
                expected: DOWNLOAD_LOG_MODULUS,
                got: ct.log_modulus as usize,
            });
        }
        if ct.packed.len() != ct.expected_words() {
            return Err(HeError::PackedLength {
                expected: ct.expected_words(),
                got: ct.packed.len(),
            });
        }
        let shift = 64 - DOWNLOAD_LOG_MODULUS;
        let values: Vec<u64> = unpack(&ct.packed, DOWNLOAD_LOG_MODULUS, ct.values())
            .into_iter()
            .map(|v| v << shift)
            .collect();
        let (mask, body) = values.split_at(POLYNOMIAL_SIZE);
        let mut product_fourier = fourier(&self.fft, &mut self.buffers, mask, Read::Torus);
        for (f, k) in product_fourier.iter_mut().zip(&self.key_fourier) {
            *f *= *k;
        }
        // `add_backward_as_torus` (into a zeroed output) has SIMD conversions;
        // `backward_as_torus` converts one scalar at a time.
        let mut product = vec![0u64; POLYNOMIAL_SIZE];
        self.fft.as_view().add_backward_as_torus(
            Polynomial::from_container(product.as_mut_slice()),
            FourierPolynomial {
                data: product_fourier.as_slice(),
            },
            self.buffers.stack(),
        );
        Ok(body
            .iter()
            .zip(&product)
            .map(|(&b, &p)| b.wrapping_sub(p))
            .collect())
    }
}

/// How the FFT reads a polynomial's coefficients.
#[derive(Clone, Copy)]
enum Read {
    /// As torus elements (ciphertexts).
    Torus,
    /// As signed integers (keys and weights).
    Integer,
}

/// tfhe's f64 FFT for N = 2048 with scratch space for either direction.
fn fft_with_scratch() -> (Fft, ComputationBuffers) {
    let fft = Fft::new(PolynomialSize(POLYNOMIAL_SIZE));
    let mut buffers = ComputationBuffers::new();
    let view = fft.as_view();
    buffers.resize(
        view.forward_scratch()
            .or(view.backward_scratch())
            .unaligned_bytes_required(),
    );
    (fft, buffers)
}

/// Forward negacyclic FFT of `poly` into a fresh Fourier polynomial (N/2 complex values).
fn fourier(fft: &Fft, buffers: &mut ComputationBuffers, poly: &[u64], read: Read) -> Vec<c64> {
    let mut out = vec![c64::default(); POLYNOMIAL_SIZE / 2];
    let fourier = FourierPolynomial {
        data: out.as_mut_slice(),
    };
    let view = fft.as_view();
    match read {
        Read::Torus => {
            view.forward_as_torus(fourier, Polynomial::from_container(poly), buffers.stack())
        }
        Read::Integer => {
            view.forward_as_integer(fourier, Polynomial::from_container(poly), buffers.stack())
        }
    };
    out
}

/// log2 of the TUniform bound of [`PARAMETER_SET`]'s GLWE noise (17).
fn noise_bound_log2() -> u32 {
    match PARAMETER_SET.glwe_noise_distribution {
        DynamicDistribution::TUniform(t) => t.bound_log2(),
        DynamicDistribution::Gaussian(_) => unreachable!("the parameter set uses TUniform noise"),
    }
}

/// One sample of TUniform(2^b), drawn exactly as tfhe draws it: b + 2 random bits r, then
/// `(r >> 1) + (r & 1) − 2^b`, so every value in (−2^b, 2^b) has probability 2^-(b+1) and ±2^b
/// have 2^-(b+2).
fn t_uniform(rng: &mut ChaCha12Rng, bound_log2: u32) -> u64 {
    debug_assert!(bound_log2 + 2 <= 32);
    let r = (rng.next_u32() & ((1u32 << (bound_log2 + 2)) - 1)) as u64;
    ((r >> 1) + (r & 1)).wrapping_sub(1 << bound_log2)
}

/// Domain separation of mask expansion: the ChaCha12 key is the 128-bit seed and this label.
const MASK_DOMAIN: &[u8; 16] = b"medsplit-mask-v1";

/// The uniform GLWE mask of a seeded ciphertext: the ChaCha12 keystream under (seed, domain)
/// (ChaCha12 is `rand`'s standard CSPRNG; it is several times faster than tfhe's byte-wise AES-CTR).
/// Client and server expand the same seed to the same mask; the seed is public.
fn expand_mask(seed: u128) -> Vec<u64> {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&seed.to_le_bytes());
    key[16..].copy_from_slice(MASK_DOMAIN);
    let mut rng = ChaCha12Rng::from_seed(key);
    (0..POLYNOMIAL_SIZE).map(|_| rng.next_u64()).collect()
}

/// The server's side: ciphertext × plaintext-polynomial products in the Fourier domain.
/// Weight polynomials are transformed once per weight update (per chunk size) and reused by
/// every batch until the next update.
pub struct ServerHe {
    packing: Packing,
    fft: Fft,
    buffers: ComputationBuffers,
    weights: Vec<i64>,
    bias: Vec<u64>,
    /// Per chunk size n: forward weight polynomials (per output) and backward ones (per upload,
    /// per tile) in the Fourier domain.
    transforms: Vec<Option<Transforms>>,
}

/// The weight polynomials of one chunk size: per forward output, and per backward upload per tile.
type Transforms = (Vec<Limbs>, Vec<Vec<Limbs>>);

/// Bits of the low limb of the weight split that keeps the FFT error small (see [`Limbs`]).
const LIMB_BITS: u32 = 10;

/// A polynomial in the Fourier domain as two limbs.
///
/// The f64 FFT loses precision in proportion to the size of the integer operand: a product of a
/// torus polynomial x with weights of 2^20 leaves ~2^40 of error (units of 2^-64). Writing
/// `w = w_hi·2^10 + w_lo` with |w_lo| ≤ 2^9 and using the exact torus identity
/// `x·w = x·w_lo + (2^10·x)·w_hi` keeps both integer operands below 2^10: for a weight
/// polynomial the limbs are `[w_lo, w_hi]`, for a ciphertext polynomial `[x, 2^10·x]`.
type Limbs = [Vec<c64>; 2];

impl ServerHe {
    pub fn new(packing: Packing) -> Self {
        let (fft, buffers) = fft_with_scratch();
        Self {
            packing,
            fft,
            buffers,
            weights: Vec::new(),
            bias: Vec::new(),
            transforms: vec![None; packing.lanes + 1],
        }
    }

    /// Installs new plaintext weights; the Fourier transforms are redone lazily.
    ///
    /// # Shapes
    /// `weights`: `[D, C]` row-major (burn's `Linear` layout), `bias`: `[C]`.
    pub fn set_weights(&mut self, weights: &[f32], bias: &[f32]) -> Result<(), HeError> {
        expect_len(weights.len(), self.packing.cut * self.packing.classes)?;
        expect_len(bias.len(), self.packing.classes)?;
        self.weights = weights
            .iter()
            .map(|&w| to_fixed(w as f64, WEIGHT_SCALE_LOG).map(|v| v as i64))
            .collect::<Result<_, _>>()?;
        self.bias = bias
            .iter()
            .map(|&b| to_fixed(b as f64, ACTIVATION_SCALE_LOG + WEIGHT_SCALE_LOG))
            .collect::<Result<_, _>>()?;
        self.transforms.iter_mut().for_each(|t| *t = None);
        Ok(())
    }

    /// Transforms the weights for chunks of `n` samples now rather than at the next product
    /// (after a weight update, while the client computes).
    pub fn prepare(&mut self, n: usize) -> Result<(), HeError> {
        self.packing.check_chunk(n)?;
        self.ensure_transforms(n);
        Ok(())
    }

    fn ensure_transforms(&mut self, n: usize) {
        if self.transforms[n].is_none() {
            let groups = self.packing.groups(n);
            let mut transform = |poly: Vec<u64>| -> Limbs {
                let half = 1i64 << (LIMB_BITS - 1);
                let lo: Vec<u64> = poly
                    .iter()
                    .map(|&w| (((w as i64 + half) & ((1 << LIMB_BITS) - 1)) - half) as u64)
                    .collect();
                let hi: Vec<u64> = poly
                    .iter()
                    .zip(&lo)
                    .map(|(&w, &l)| ((w as i64 - l as i64) >> LIMB_BITS) as u64)
                    .collect();
                [lo, hi].map(|limb| fourier(&self.fft, &mut self.buffers, &limb, Read::Integer))
            };
            let fwd = (0..groups)
                .map(|g| transform(self.packing.forward_weights(&self.weights, n, g)))
                .collect();
            let packing = self.packing;
            let bwd = (0..packing.backward_uploads(n))
                .map(|u| {
                    (0..packing.tiles(n, u).count)
                        .map(|o| transform(packing.backward_weights(&self.weights, n, u, o)))
                        .collect()
                })
                .collect();
            self.transforms[n] = Some((fwd, bwd));
        }
    }

    /// Mask and body of an uploaded ciphertext in the Fourier domain.
    fn load(&mut self, ct: &UploadCiphertext) -> Result<[Limbs; 2], HeError> {
        if ct.body.len() != UploadCiphertext::BODY_WORDS {
            return Err(HeError::PackedLength {
                expected: UploadCiphertext::BODY_WORDS,
                got: ct.body.len(),
            });
        }
        let mask = expand_mask(ct.seed);
        let body: Vec<u64> = unpack(&ct.body, UPLOAD_LOG_MODULUS, POLYNOMIAL_SIZE)
            .into_iter()
            .map(|v| v << (64 - UPLOAD_LOG_MODULUS))
            .collect();
        Ok([mask, body].map(|poly| {
            let shifted: Vec<u64> = poly.iter().map(|&x| x << LIMB_BITS).collect();
            [poly, shifted].map(|limb| fourier(&self.fft, &mut self.buffers, &limb, Read::Torus))
        }))
    }

    /// Encrypted logits of one chunk: one output per logit group.
    pub fn forward(
        &mut self,
        upload: &UploadCiphertext,
        n: usize,
    ) -> Result<Vec<DownloadCiphertext>, HeError> {
        self.packing.check_chunk(n)?;
        let input = self.load(upload)?;
        self.ensure_transforms(n);
        let packing = self.packing;
        let (fwd, _) = self.transforms[n].as_ref().expect("ensured above");
        Ok(fwd
            .iter()
            .enumerate()
            .map(|(g, w)| {
                let first = packing.logits_in_group(n, g).start;
                let bias: Vec<(usize, u64)> = packing
                    .logits_in_group(n, g)
                    .flat_map(|j| (0..n).map(move |b| ((j - first) * n + b, j)))
                    .map(|(c, j)| (c, self.bias[j]))
                    .collect();
                let bodies = packing.forward_output_bodies(n, g);
                accumulate(&self.fft, &mut self.buffers, &[(&input, w)], bodies, &bias)
            })
            .collect())
    }

    /// Encrypted dJ/da of one chunk from its gradient uploads: one output per tile.
    pub fn backward(
        &mut self,
        uploads: &[UploadCiphertext],
        n: usize,
    ) -> Result<Vec<DownloadCiphertext>, HeError> {
        self.packing.check_chunk(n)?;
        let expected = self.packing.backward_uploads(n);
        if uploads.len() != expected {
            return Err(HeError::CiphertextCount {
                expected,
                got: uploads.len(),
            });
        }
        let inputs = uploads
            .iter()
            .map(|u| self.load(u))
            .collect::<Result<Vec<_>, _>>()?;
        self.ensure_transforms(n);
        let (_, bwd) = self.transforms[n].as_ref().expect("ensured above");
        let bodies = self.packing.backward_output_bodies(n);
        let products = inputs
            .iter()
            .zip(bwd)
            .flat_map(|(input, tiles)| tiles.iter().map(move |w| (input, w)));
        Ok(products
            .zip(bodies)
            .map(|((input, w), bodies)| {
                accumulate(&self.fft, &mut self.buffers, &[(input, w)], bodies, &[])
            })
            .collect())
    }
}

/// Σ_t inputs[t] ⊗ weights[t], mod-switched, keeping `bodies` bodies; `bias` (coefficient, value)
/// is added to the body before switching.
fn accumulate(
    fft: &Fft,
    buffers: &mut ComputationBuffers,
    terms: &[(&[Limbs; 2], &Limbs)],
    bodies: usize,
    bias: &[(usize, u64)],
) -> DownloadCiphertext {
    let mut glwe = GlweCiphertext::new(
        0u64,
        GLWE_SIZE,
        PolynomialSize(POLYNOMIAL_SIZE),
        CiphertextModulus::new_native(),
    );
    let view = fft.as_view();
    // `add_backward_as_torus` (into the zeroed output) has SIMD conversions; `backward_as_torus`
    // converts one scalar at a time.
    let mut acc = vec![c64::default(); POLYNOMIAL_SIZE / 2];
    for (part, out) in glwe.as_mut().chunks_exact_mut(POLYNOMIAL_SIZE).enumerate() {
        acc.fill(c64::default());
        for (ct, w) in terms {
            for limb in 0..2 {
                for ((a, x), y) in acc.iter_mut().zip(&ct[part][limb]).zip(&w[limb]) {
                    *a += *x * *y;
                }
            }
        }
        view.add_backward_as_torus(
            Polynomial::from_container(out),
            FourierPolynomial {
                data: acc.as_slice(),
            },
            buffers.stack(),
        );
    }
    let body = &mut glwe.as_mut()[POLYNOMIAL_SIZE..];
    for &(c, v) in bias {
        body[c] = body[c].wrapping_add(v);
    }
    let compressed = CompressedModulusSwitchedGlweCiphertext::compress(
        &glwe,
        CiphertextModulusLog(DOWNLOAD_LOG_MODULUS),
        LweCiphertextCount(bodies),
    );
    DownloadCiphertext {
        log_modulus: DOWNLOAD_LOG_MODULUS as u8,
        bodies: bodies as u16,
        packed: compressed.packed_integers().packed_coeffs().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn uniform(rng: &mut ChaCha8Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(lo..hi)).collect()
    }

    /// f64 reference: logits `[n, C]` = a `[n, D]` · w `[D, C]` + bias.
    fn reference_logits(a: &[f32], w: &[f32], bias: &[f32], d: usize, c: usize) -> Vec<f64> {
        a.chunks_exact(d)
            .flat_map(|row| {
                (0..c).map(move |j| {
                    bias[j] as f64
                        + row
                            .iter()
                            .enumerate()
                            .map(|(i, &x)| x as f64 * w[i * c + j] as f64)
                            .sum::<f64>()
                })
            })
            .collect()
    }

    /// f64 reference: dJ/da `[n, D]` = g `[n, C]` · wᵀ.
    fn reference_input_grads(g: &[f32], w: &[f32], d: usize, c: usize) -> Vec<f64> {
        g.chunks_exact(c)
            .flat_map(|row| {
                (0..d).map(move |i| {
                    row.iter()
                        .enumerate()
                        .map(|(j, &x)| x as f64 * w[i * c + j] as f64)
                        .sum::<f64>()
                })
            })
            .collect()
    }

    fn max_error(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len(), "lengths differ");
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
    }

    fn roundtrip(cut: usize, classes: usize, n: usize, weight_range: f32, seed: u64) -> (f64, f64) {
        let packing = Packing::new(cut, classes).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Post-LeakyReLU, post-max-pool activations of M1 are mostly in [0, 3].
        let a = uniform(&mut rng, n * cut, -0.05, 3.0);
        let w = uniform(&mut rng, cut * classes, -weight_range, weight_range);
        let bias = uniform(&mut rng, classes, -0.5, 0.5);
        let g = uniform(&mut rng, n * classes, -0.25, 0.25);

        let mut key = ClientKey::from_seed(seed as u128);
        let mut server = ServerHe::new(packing);
        server.set_weights(&w, &bias).unwrap();

        let upload = key.encrypt(&packing.encode_activations(&a, n).unwrap());
        let outputs = server.forward(&upload, n).unwrap();
        assert_eq!(outputs.len(), packing.groups(n));
        let phases: Vec<Vec<u64>> = outputs
            .iter()
            .enumerate()
            .map(|(g, ct)| {
                key.decrypt(ct, packing.forward_output_bodies(n, g))
                    .unwrap()
            })
            .collect();
        let logits = packing.decode_logits(&phases, n).unwrap();
        let logit_err = max_error(&logits, &reference_logits(&a, &w, &bias, cut, classes));

        // The gradient uploads use pads made ahead of time (the forward upload made its own).
        key.prepare(packing.backward_uploads(n));
        let uploads: Vec<_> = (0..packing.backward_uploads(n))
            .map(|u| key.encrypt(&packing.encode_gradients(&g, n, u).unwrap()))
            .collect();
        assert!(key.pads.is_empty(), "every prepared pad is used once");
        let outputs = server.backward(&uploads, n).unwrap();
        assert_eq!(outputs.len(), packing.backward_outputs(n));
        let phases: Vec<Vec<u64>> = outputs
            .iter()
            .zip(packing.backward_output_bodies(n))
            .map(|(ct, bodies)| key.decrypt(ct, bodies).unwrap())
            .collect();
        let da = packing.decode_input_gradients(&phases, n).unwrap();
        let grad_err = max_error(&da, &reference_input_grads(&g, &w, cut, classes));
        (logit_err, grad_err)
    }

    #[test]
    fn encrypted_linear_layer_matches_f64_reference() {
        for (cut, n) in [(256, 1), (256, 3), (256, 4), (256, 8), (512, 2), (512, 4)] {
            // Initial weights (±1/√D) and trained-size weights (±0.5).
            for range in [1.0 / (cut as f32).sqrt(), 0.5] {
                let (logit_err, grad_err) = roundtrip(cut, 5, n, range, (cut * 10 + n) as u64);
                eprintln!(
                    "cut {cut} n {n} |w|<{range:.3}: logits {logit_err:.2e}, dJ/da {grad_err:.2e}"
                );
                assert!(
                    logit_err <= 1e-4,
                    "logit error {logit_err:e} (cut {cut}, n {n})"
                );
                assert!(
                    grad_err <= 1e-4,
                    "dJ/da error {grad_err:e} (cut {cut}, n {n})"
                );
            }
        }
    }

    #[test]
    fn every_allowed_shape_packs_within_the_budget() {
        // Cut widths that do not divide N, the widest cut, the most server outputs, a chunk
        // filling every lane; weights at the documented norm bound ‖w_j‖₂ = 4.
        for (cut, classes, n) in [
            (2048, 5, 1),
            (1500, 64, 1),
            (1023, 2, 2),
            (260, 5, 7),
            (260, 32, 4),
            (68, 12, 30),
            (17, 64, 120),
            (3, 2, 682),
        ] {
            let range = 4.0 * 3f32.sqrt() / (cut as f32).sqrt();
            let packing = Packing::new(cut, classes).unwrap();
            assert_eq!(packing.lanes(), POLYNOMIAL_SIZE / cut);
            let (logit_err, grad_err) = roundtrip(cut, classes, n, range, (cut + classes) as u64);
            eprintln!("cut {cut} C {classes} n {n}: logits {logit_err:.2e}, dJ/da {grad_err:.2e}");
            assert!(
                logit_err <= 1e-4,
                "logit error {logit_err:e} ({cut}, {classes}, {n})"
            );
            assert!(
                grad_err <= 1e-4,
                "dJ/da error {grad_err:e} ({cut}, {classes}, {n})"
            );
        }
    }

    #[test]
    fn noise_stays_within_the_documented_budget() {
        // Zero activations and bias isolate the noise: every decrypted logit is pure error.
        let (cut, classes, n) = (256, 5, 8);
        let packing = Packing::new(cut, classes).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let w = uniform(&mut rng, cut * classes, -0.25, 0.25);
        let norm = (0..classes)
            .map(|j| {
                (0..cut)
                    .map(|i| (w[i * classes + j] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .fold(0.0, f64::max);
        let mut key = ClientKey::from_seed(1);
        let mut server = ServerHe::new(packing);
        server.set_weights(&w, &[0.0; 5]).unwrap();
        let mut errors = Vec::new();
        for i in 0..20 {
            // Half the uploads with a pad made ahead of time: both paths carry the same noise.
            if i % 2 == 0 {
                key.prepare(1);
            }
            let upload = key.encrypt(&packing.encode_activations(&vec![0.0; n * cut], n).unwrap());
            for (g, ct) in server.forward(&upload, n).unwrap().iter().enumerate() {
                let phase = key
                    .decrypt(ct, packing.forward_output_bodies(n, g))
                    .unwrap();
                errors.extend(phase.iter().map(|&v| v as i64 as f64));
            }
        }
        let sigma = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt();
        // Documented budget: fresh noise + upload rounding (σ 2^16.7 per coefficient, times the
        // scaled weight norm) and the download modulus switch (σ 2^35.2 + 2^30.2).
        let input = 2f64.powf(16.7) * 2f64.powi(WEIGHT_SCALE_LOG as i32) * norm;
        let switch = 2f64.powf(35.2) + 2f64.powf(30.2);
        let budget = (input * input + switch * switch).sqrt();
        eprintln!(
            "noise σ = 2^{:.2}, budget 2^{:.2}",
            sigma.log2(),
            budget.log2()
        );
        assert!(
            sigma <= 1.25 * budget,
            "σ 2^{:.2} above budget 2^{:.2}",
            sigma.log2(),
            budget.log2()
        );
        assert!(
            sigma >= budget / 4.0,
            "σ 2^{:.2} implausibly low: noise missing?",
            sigma.log2()
        );
        let max = errors.iter().fold(0f64, |m, e| m.max(e.abs()));
        assert!(
            max / 2f64.powi(56) < 1e-4,
            "max logit error {:e}",
            max / 2f64.powi(56)
        );
    }

    #[test]
    fn backward_noise_stays_within_the_documented_budget() {
        // Zero gradients isolate the noise: every decrypted dJ/da is pure error. A chunk of 4
        // on M1's shape: one upload, three tiles.
        let (cut, classes, n) = (256, 5, 4);
        let packing = Packing::new(cut, classes).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let w = uniform(&mut rng, cut * classes, -0.25, 0.25);
        let frobenius = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut key = ClientKey::from_seed(2);
        let mut server = ServerHe::new(packing);
        server.set_weights(&w, &[0.0; 5]).unwrap();
        let mut errors = Vec::new();
        for _ in 0..10 {
            let upload = key.encrypt(&packing.encode_gradients(&[0.0; 20], n, 0).unwrap());
            let outputs = server.backward(&[upload], n).unwrap();
            for (ct, bodies) in outputs.iter().zip(packing.backward_output_bodies(n)) {
                let phase = key.decrypt(ct, bodies).unwrap();
                errors.extend(phase.iter().map(|&v| v as i64 as f64));
            }
        }
        let sigma = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt();
        // Documented budget: σ 2^16.7 per upload coefficient times the scaled norm of the
        // tile's weights (each tile holds about a third of ‖W‖_F²), plus the modulus switch.
        let input = 2f64.powf(16.7) * 2f64.powi(WEIGHT_SCALE_LOG as i32) * frobenius / 3f64.sqrt();
        let switch = 2f64.powf(35.2) + 2f64.powf(30.2);
        let budget = (input * input + switch * switch).sqrt();
        eprintln!(
            "backward noise σ = 2^{:.2}, budget 2^{:.2}",
            sigma.log2(),
            budget.log2()
        );
        assert!(
            sigma <= 1.25 * budget,
            "σ 2^{:.2} above budget",
            sigma.log2()
        );
        assert!(
            sigma >= budget / 4.0,
            "σ 2^{:.2} implausibly low",
            sigma.log2()
        );
        let max = errors.iter().fold(0f64, |m, e| m.max(e.abs())) / 2f64.powi(60);
        assert!(max < 1e-5, "max dJ/da error {max:e}");
    }

    #[test]
    fn unpacking_matches_tfhe_packing() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for bits in [30usize, 46, 64, 7] {
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let values: Vec<u64> = (0..2100).map(|_| rng.random::<u64>() & max).collect();
            let packed = PackedIntegers::pack(&values, CiphertextModulusLog(bits));
            let mine = unpack(packed.packed_coeffs(), bits, values.len());
            assert_eq!(mine, values, "{bits}-bit unpack");
            assert_eq!(packed.unpack::<u64>().collect::<Vec<_>>(), values);
        }
    }

    #[test]
    fn chunks_and_groups_follow_the_lanes() {
        let p = Packing::new(256, 5).unwrap();
        assert_eq!(p.lanes(), 8);
        assert_eq!(p.chunks(4).collect::<Vec<_>>(), vec![4]);
        assert_eq!(p.chunks(19).collect::<Vec<_>>(), vec![8, 8, 3]);
        assert_eq!(
            (p.groups(8), p.groups(4), p.groups(2), p.groups(1)),
            (5, 3, 2, 1)
        );
        // One gradient upload per chunk; the cut in tiles of ⌊N / (C·n)⌋ features at most.
        assert_eq!(
            [8, 4, 2, 1].map(|n| (p.backward_uploads(n), p.backward_outputs(n))),
            [(1, 6), (1, 3), (1, 2), (1, 1)]
        );
        assert_eq!(
            p.backward_output_bodies(4),
            vec![4 * 86, 4 * 86, 3 * 86 + 84]
        );
        // More samples than N / C per chunk: one upload per ⌊N / C⌋ of them.
        let wide = Packing::new(17, 64).unwrap();
        assert_eq!(
            (wide.backward_uploads(120), wide.backward_outputs(120)),
            (4, 68)
        );
        assert_eq!(
            Packing::new(4, 2049),
            Err(HeError::Outputs { classes: 2049 })
        );
        assert_eq!(Packing::new(300, 5).unwrap().lanes(), 6);
        assert_eq!(Packing::new(2049, 5), Err(HeError::CutWidth { cut: 2049 }));
        assert_eq!(Packing::new(0, 5), Err(HeError::CutWidth { cut: 0 }));
        assert_eq!(Packing::new(512, 5).unwrap().lanes(), 4);
    }

    #[test]
    fn malformed_ciphertexts_give_typed_errors() {
        let packing = Packing::new(256, 5).unwrap();
        let mut key = ClientKey::from_seed(9);
        let mut server = ServerHe::new(packing);
        server.set_weights(&vec![0.01; 256 * 5], &[0.0; 5]).unwrap();
        let good = key.encrypt(&packing.encode_activations(&vec![0.5; 4 * 256], 4).unwrap());

        let mut truncated = good.clone();
        truncated.body.pop();
        assert!(matches!(
            server.forward(&truncated, 4),
            Err(HeError::PackedLength { .. })
        ));
        assert!(matches!(
            server.forward(&good, 9),
            Err(HeError::ChunkSize { .. })
        ));
        assert!(matches!(
            server.forward(&good, 0),
            Err(HeError::ChunkSize { .. })
        ));
        assert!(matches!(
            server.backward(&[good.clone(), good.clone()], 4),
            Err(HeError::CiphertextCount {
                expected: 1,
                got: 2
            })
        ));

        let out = server.forward(&good, 4).unwrap().remove(0);
        let bodies = packing.forward_output_bodies(4, 0);
        let mut short = out.clone();
        short.packed.truncate(10);
        assert!(matches!(
            key.decrypt(&short, bodies),
            Err(HeError::PackedLength { .. })
        ));
        let mut lying = out.clone();
        lying.bodies = 2000;
        assert!(matches!(
            key.decrypt(&lying, bodies),
            Err(HeError::Bodies { .. })
        ));
        let mut modulus = out.clone();
        modulus.log_modulus = 64;
        assert!(matches!(
            key.decrypt(&modulus, bodies),
            Err(HeError::LogModulus { .. })
        ));
        // A garbled (but well-sized) ciphertext decrypts to garbage, never panics.
        let mut garbled = out;
        garbled
            .packed
            .iter_mut()
            .for_each(|w| *w = w.rotate_left(13));
        assert!(key.decrypt(&garbled, bodies).is_ok());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let p = Packing::new(256, 5).unwrap();
        let mut a = vec![0.0f32; 256];
        a[3] = f32::NAN;
        assert!(matches!(
            p.encode_activations(&a, 1),
            Err(HeError::OutOfRange { .. })
        ));
        a[3] = 1e9;
        assert!(matches!(
            p.encode_activations(&a, 1),
            Err(HeError::OutOfRange { .. })
        ));
        assert!(matches!(
            p.encode_activations(&a[..10], 1),
            Err(HeError::ValueCount { .. })
        ));
        assert!(p.encode_gradients(&[0.0; 5], 1, 0).is_ok());
        assert!(matches!(
            p.encode_gradients(&[0.0; 5], 1, 1),
            Err(HeError::CiphertextCount {
                expected: 1,
                got: 2
            })
        ));
        assert!(matches!(
            p.encode_gradients(&[f32::INFINITY; 5], 1, 0),
            Err(HeError::OutOfRange { .. })
        ));
    }

    #[test]
    fn noise_is_tfhe_tuniform_17() {
        assert_eq!(noise_bound_log2(), 17);
        let mut rng = ChaCha12Rng::seed_from_u64(2);
        let samples: Vec<i64> = (0..200_000)
            .map(|_| t_uniform(&mut rng, 17) as i64)
            .collect();
        assert!(samples.iter().all(|&x| x.abs() <= 1 << 17));
        let var = samples.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / samples.len() as f64;
        // Variance of TUniform(2^b) is (2^{2b+1} + 1) / 6.
        let expected = (2f64.powi(35) + 1.0) / 6.0;
        assert!(
            (var / expected - 1.0).abs() < 0.02,
            "variance {var} vs {expected}"
        );
        let mean = samples.iter().sum::<i64>() as f64 / samples.len() as f64;
        assert!(mean.abs() < 2f64.powi(17) * 0.01, "mean {mean}");
    }

    #[test]
    fn masks_are_deterministic_per_seed_and_differ_across_seeds() {
        assert_eq!(expand_mask(7), expand_mask(7));
        assert_ne!(expand_mask(7), expand_mask(8));
        let ones: u32 = expand_mask(9).iter().map(|m| m.count_ones()).sum();
        let bits = 64.0 * POLYNOMIAL_SIZE as f64;
        assert!(
            (ones as f64 / bits - 0.5).abs() < 0.01,
            "mask bits are not uniform"
        );
    }

    #[test]
    fn client_key_debug_hides_the_key() {
        assert_eq!(
            format!("{:?}", ClientKey::from_seed(1)),
            "ClientKey(<secret>)"
        );
    }
}
