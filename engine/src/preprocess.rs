//! From a raw record to model input rows: the label sets, and the preprocessing a job names so
//! that every hospital cuts its beats the same way.
//!
//! # Pipeline
//!
//! [`extract`] turns one record and its annotations into rows, in this order:
//!
//! 1. **Lead**: the signal named by [`Preprocessing::lead`] (its header description, e.g.
//!    `MLII`), or signal 0 when none is named, in physical units `(digital - baseline) / gain`.
//! 2. **Baseline** ([`Baseline`]): optionally, the baseline estimated by two cascaded median
//!    filters (de Chazal et al. 2004: 200 ms, then 600 ms) is subtracted.
//! 3. **Record normalisation** ([`Normalisation::RecordMinMax`], [`Normalisation::RecordPeak`]).
//! 4. **Beats** ([`BeatSelection`]): which annotations become beats and how windows near the
//!    record's ends are handled. The label of a beat comes from its annotation symbol through
//!    the [`LabelSet`].
//! 5. **Window** of [`Preprocessing::before_s`] seconds before the R peak to
//!    [`Preprocessing::after_s`] after it, **resampled** to [`Preprocessing::beat_len`] samples
//!    ([`Resampling`]), at whatever rate the record was sampled.
//! 6. Optionally the papers' wavelet **denoising** ([`Preprocessing::denoise`]), then the
//!    per-beat normalisation ([`Normalisation::Beat`]).
//! 7. Optionally the patient's **typical beat** (the median of the record's beats, sample by
//!    sample) is subtracted from every beat ([`Template`]).
//! 8. Optionally the **RR-interval features** ([`RrFeatures`], [`rr_features`]) appended after
//!    the waveform: a row is `beat_len` waveform samples then [`Preprocessing::feature_len`]
//!    features.
//!
//! Named presets keep job specs short: [`Preprocessing::papers`] (the split-learning papers'
//! extraction, bit for bit: Table 1 reproduces) and [`Preprocessing::inter_patient`] (baseline
//! removal, every beat, the typical beat subtracted, RR features). In a job spec the preprocessing is either a preset name
//! (`"inter_patient"`) or an object whose missing fields come from its `preset` (default
//! [`Preprocessing::default`]): `{"preset": "inter_patient", "normalisation": "beat"}`.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::api::FieldError;
use crate::data::Dataset;
use crate::wfdb::{self, Annotation, FORMAT_212_INVALID, Record, Resampler, WfdbError};

// ---------------------------------------------------------------------------------------------
// Label sets
// ---------------------------------------------------------------------------------------------

/// Number of classes in either label set.
pub const NUM_CLASSES: usize = 5;

/// Which classes beats are labelled with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSet {
    /// The AAMI EC57 classes of the ECG literature, from the annotation symbols:
    /// N = `N L R e j`, S = `A a J S`, V = `V E`, F = `F`, Q = `/ f Q` (other symbols are not
    /// beats).
    #[default]
    Aami,
    /// The split-learning papers' five symbols N, L, R, A, V (class = position); other beats
    /// are left out.
    Papers,
}

impl LabelSet {
    /// Both label sets.
    pub const ALL: [LabelSet; 2] = [LabelSet::Aami, LabelSet::Papers];

    /// The JSON name: `aami` or `papers`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aami => "aami",
            Self::Papers => "papers",
        }
    }

    /// Class names in label order.
    pub fn class_names(self) -> [&'static str; NUM_CLASSES] {
        match self {
            Self::Aami => ["N", "S", "V", "F", "Q"],
            Self::Papers => wfdb::CLASS_SYMBOLS,
        }
    }

    /// Number of classes (5 in both sets).
    pub fn num_classes(self) -> usize {
        NUM_CLASSES
    }

    /// The class of an annotation symbol, or `None` when the symbol is not a beat of this set.
    pub fn class_of(self, symbol: &str) -> Option<u8> {
        match self {
            Self::Aami => aami_class(symbol),
            Self::Papers => wfdb::CLASS_SYMBOLS
                .iter()
                .position(|&s| s == symbol)
                .map(|i| i as u8),
        }
    }

    /// The class in this set of a beat labelled `class` in the papers' set (N L R A V): the
    /// papers' beats map into AAMI as N, L, R to N, A to S and V to V. `None` for a class
    /// outside the papers' set.
    pub fn from_papers(self, class: u8) -> Option<u8> {
        let symbol = wfdb::CLASS_SYMBOLS.get(usize::from(class))?;
        self.class_of(symbol)
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The AAMI class of a symbol (N 0, S 1, V 2, F 3, Q 4).
fn aami_class(symbol: &str) -> Option<u8> {
    match symbol {
        "N" | "L" | "R" | "e" | "j" => Some(0),
        "A" | "a" | "J" | "S" => Some(1),
        "V" | "E" => Some(2),
        "F" => Some(3),
        "/" | "f" | "Q" => Some(4),
        _ => None,
    }
}

/// Whether an annotation symbol marks a heartbeat (any AAMI class). RR intervals run between
/// consecutive beats of this kind; rhythm, noise and other annotations are not beats.
pub fn is_beat(symbol: &str) -> bool {
    aami_class(symbol).is_some()
}

// ---------------------------------------------------------------------------------------------
// Preprocessing
// ---------------------------------------------------------------------------------------------

/// Which annotations become beats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BeatSelection {
    /// The papers' rules: the record's first and last annotations are dropped; of the rest,
    /// every annotation but the first and the last whose symbol is in the label set becomes a
    /// beat if its window fits inside the record and between its two neighbouring annotations
    /// (of any kind).
    Papers,
    /// Every annotation whose symbol is in the label set; near the record's ends the window is
    /// completed by repeating the first or last sample.
    All,
}

/// How the window is brought to `beat_len` samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resampling {
    /// The papers' way: the `round(before_s·fs) + 1 + round(after_s·fs)` samples around the peak
    /// are resampled as `scipy.signal.resample` does (FFT, periodic).
    Fourier,
    /// `beat_len` points evenly spaced in time from `-before_s` (inclusive) to `after_s`
    /// (exclusive), each a Lanczos-3 (windowed sinc) interpolation of the signal, the kernel
    /// widened by the decimation factor when there are fewer output than input samples (so it
    /// also low-passes against aliasing). Gives the same beat at any sampling rate.
    Lanczos,
}

/// Baseline-wander removal.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Baseline {
    /// No baseline removal.
    None,
    /// Subtract the baseline estimated by a median filter of `first_s` seconds followed by one
    /// of `second_s` seconds (each rounded to an odd number of samples; the signal is extended
    /// by repeating its end samples). De Chazal et al. use 0.2 s (removes QRS and P waves) and
    /// 0.6 s (removes T waves).
    Median { first_s: f64, second_s: f64 },
}

/// How sample values are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalisation {
    /// Per record, min-max over the whole lead: `(x - min) / (max - min)`, in `[0, 1]` (the
    /// papers').
    RecordMinMax,
    /// Per record, divided by the patient's typical QRS amplitude: the median over the
    /// record's beats of the largest `|x|` within 50 ms of the annotated R peak. A typical beat
    /// then peaks near ±1 and an ectopic beat keeps its size relative to the patient's normal
    /// beats. Meant to follow baseline removal.
    RecordPeak,
    /// Per beat: zero mean and unit standard deviation over the beat's `beat_len` samples (a
    /// flat beat is only centred).
    Beat,
}

/// Whether the patient's typical beat is taken out of every beat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// The beat as cut.
    #[default]
    None,
    /// Every waveform sample minus the median of that sample over all the record's beats (of
    /// the label set): the patient's typical beat. What remains is how a beat differs from the
    /// patient's usual one, so the usual beat of a patient with a bundle-branch block looks
    /// like any patient's usual beat. It uses no labels: a new patient's record is treated the
    /// same way.
    Subtract,
}

/// RR-interval side features (see [`rr_features`] for exact definitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RrFeatures {
    /// Intervals averaged for the local RR feature.
    pub local_beats: usize,
    /// Two more features of the current rhythm ([`RHYTHM_FEATURE_NAMES`], [`rhythm_features`]):
    /// how premature the beat is against the local rhythm, and how irregular that rhythm is.
    #[serde(default)]
    pub rhythm: bool,
}

/// Number of RR features per beat: previous, next, local, record.
pub const RR_FEATURES: usize = 4;
/// Names of the RR features, in row order.
pub const RR_FEATURE_NAMES: [&str; RR_FEATURES] =
    ["rr_previous", "rr_next", "rr_local", "rr_record_s"];
/// Number of rhythm features ([`RrFeatures::rhythm`]), after the RR features.
pub const RHYTHM_FEATURES: usize = 2;
/// Names of the rhythm features, in row order.
pub const RHYTHM_FEATURE_NAMES: [&str; RHYTHM_FEATURES] = ["rr_ratio", "rr_irregularity"];

/// How beats are cut from a record and turned into model input rows. Serialises as a full
/// object; deserialises from a preset name or an object whose missing fields come from its
/// `preset` (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Preprocessing {
    /// The signal's header description (e.g. `"MLII"`, compared ignoring case); `None` takes
    /// signal 0. A record without such a signal is an error naming its signals.
    pub lead: Option<String>,
    /// Seconds of signal before the R peak.
    pub before_s: f64,
    /// Seconds of signal after the R peak.
    pub after_s: f64,
    /// Waveform samples per beat after resampling.
    pub beat_len: usize,
    pub beats: BeatSelection,
    pub resampling: Resampling,
    pub baseline: Baseline,
    pub normalisation: Normalisation,
    /// The papers' wavelet denoising of the resampled beat (bior4.4, soft threshold).
    pub denoise: bool,
    /// RR-interval features after the waveform, or none.
    pub rr: Option<RrFeatures>,
    /// Subtract the patient's typical beat ([`Template`]); absent in a job spec: none.
    pub template: Template,
}

/// The named presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// [`Preprocessing::papers`].
    Papers,
    /// [`Preprocessing::inter_patient`].
    InterPatient,
}

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::Papers, Preset::InterPatient];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Papers => "papers",
            Self::InterPatient => "inter_patient",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    pub fn preprocessing(self) -> Preprocessing {
        match self {
            Self::Papers => Preprocessing::papers(),
            Self::InterPatient => Preprocessing::inter_patient(),
        }
    }
}

impl Default for Preprocessing {
    /// The papers' preset (what the M1 model and the papers' beat files take).
    fn default() -> Self {
        Self::papers()
    }
}

impl Preprocessing {
    /// The split-learning papers' extraction, exactly (`shared/data/mitbih/regenerate.py`):
    /// lead 0, no baseline removal, min-max per record, a window of 100 samples at 360 Hz
    /// (100/360 s) either side of the peak under the papers' window rules, Fourier resampling
    /// to 128, wavelet denoising, no side features.
    pub fn papers() -> Self {
        let half = wfdb::HALF_WINDOW as f64 / 360.0;
        Self {
            lead: None,
            before_s: half,
            after_s: half,
            beat_len: wfdb::BEAT_LEN,
            beats: BeatSelection::Papers,
            resampling: Resampling::Fourier,
            baseline: Baseline::None,
            normalisation: Normalisation::RecordMinMax,
            denoise: true,
            rr: None,
            template: Template::None,
        }
    }

    /// For models that must hold up on new patients: lead MLII, baseline removed (median
    /// filters of 0.2 s and 0.6 s), every beat, a window of 0.25 s before to 0.45 s after the
    /// peak (P wave to T wave) resampled to 128 samples with Lanczos interpolation, scaled by
    /// the patient's typical QRS amplitude, the patient's typical beat subtracted
    /// ([`Template::Subtract`]), and the four RR features (local average over 10 intervals).
    /// Chosen by patient-wise cross-validation inside DS1 (docs/benchmarks.md).
    pub fn inter_patient() -> Self {
        Self {
            lead: Some("MLII".to_owned()),
            before_s: 0.25,
            after_s: 0.45,
            beat_len: 128,
            beats: BeatSelection::All,
            resampling: Resampling::Lanczos,
            baseline: Baseline::Median {
                first_s: 0.2,
                second_s: 0.6,
            },
            normalisation: Normalisation::RecordPeak,
            denoise: false,
            rr: Some(RrFeatures {
                local_beats: 10,
                rhythm: false,
            }),
            template: Template::Subtract,
        }
    }

    /// The preset this equals, if any.
    pub fn preset(&self) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.preprocessing() == *self)
    }

    /// Side features per row after the waveform.
    pub fn feature_len(&self) -> usize {
        match self.rr {
            None => 0,
            Some(RrFeatures { rhythm: false, .. }) => RR_FEATURES,
            Some(RrFeatures { rhythm: true, .. }) => RR_FEATURES + RHYTHM_FEATURES,
        }
    }

    /// Values per row: `beat_len + feature_len`.
    pub fn row_len(&self) -> usize {
        self.beat_len + self.feature_len()
    }

    /// A short description for logs and error messages: the preset name, or `custom (...)`.
    pub fn describe(&self) -> String {
        match self.preset() {
            Some(p) => p.as_str().to_owned(),
            None => format!(
                "custom ({} samples from {} s before to {} s after the peak{})",
                self.beat_len,
                self.before_s,
                self.after_s,
                match (self.rr.is_some(), self.template) {
                    (true, Template::Subtract) => ", typical beat subtracted, RR features",
                    (false, Template::Subtract) => ", typical beat subtracted",
                    (true, Template::None) => ", RR features",
                    (false, Template::None) => "",
                }
            ),
        }
    }

    /// The most samples per beat a job may ask for.
    pub const MAX_BEAT_LEN: usize = 4096;
    /// The longest window on either side of the peak, and the longest median filter, seconds.
    pub const MAX_SECONDS: f64 = 10.0;
    /// The most intervals the local RR average may span.
    pub const MAX_LOCAL_BEATS: usize = 1000;

    /// Checks every field; the error names the field (relative to the preprocessing object).
    pub fn validate(&self) -> Result<(), FieldError> {
        if let Some(lead) = &self.lead
            && (lead.trim().is_empty() || lead.len() > 64)
        {
            return Err(FieldError::new(
                "lead",
                "must be a signal description of 1 to 64 characters, or null for signal 0",
            ));
        }
        if !(1..=Self::MAX_BEAT_LEN).contains(&self.beat_len) {
            return Err(FieldError::new(
                "beat_len",
                format!(
                    "must be between 1 and {}, got {}",
                    Self::MAX_BEAT_LEN,
                    self.beat_len
                ),
            ));
        }
        let seconds = |field: &str, value: f64, zero_ok: bool| {
            let ok = value.is_finite()
                && value <= Self::MAX_SECONDS
                && (value > 0.0 || (zero_ok && value == 0.0));
            if ok {
                Ok(())
            } else {
                Err(FieldError::new(
                    field,
                    format!(
                        "must be a number of seconds in {}{}, got {value}",
                        if zero_ok { "[0, " } else { "(0, " },
                        Self::MAX_SECONDS
                    ) + "]",
                ))
            }
        };
        seconds("before_s", self.before_s, true)?;
        seconds("after_s", self.after_s, true)?;
        if self.before_s + self.after_s <= 0.0 {
            return Err(FieldError::new(
                "after_s",
                "the window must be longer than 0 s (before_s + after_s > 0)",
            ));
        }
        if let Baseline::Median { first_s, second_s } = self.baseline {
            seconds("baseline.median.first_s", first_s, false)?;
            seconds("baseline.median.second_s", second_s, false)?;
        }
        if let Some(rr) = self.rr
            && !(1..=Self::MAX_LOCAL_BEATS).contains(&rr.local_beats)
        {
            return Err(FieldError::new(
                "rr.local_beats",
                format!(
                    "must be between 1 and {}, got {}",
                    Self::MAX_LOCAL_BEATS,
                    rr.local_beats
                ),
            ));
        }
        Ok(())
    }
}

/// The fields of a preprocessing object in a job spec, every one optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialPreprocessing {
    preset: Option<Preset>,
    #[serde(default, deserialize_with = "present")]
    lead: Option<Option<String>>,
    before_s: Option<f64>,
    after_s: Option<f64>,
    beat_len: Option<usize>,
    beats: Option<BeatSelection>,
    resampling: Option<Resampling>,
    baseline: Option<Baseline>,
    normalisation: Option<Normalisation>,
    denoise: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    rr: Option<Option<RrFeatures>>,
    template: Option<Template>,
}

/// A field that may be given as `null`: `Some(None)` when it is, `None` when it is absent.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl PartialPreprocessing {
    fn complete(self) -> Preprocessing {
        let base = self
            .preset
            .map_or_else(Preprocessing::default, Preset::preprocessing);
        Preprocessing {
            lead: self.lead.unwrap_or(base.lead),
            before_s: self.before_s.unwrap_or(base.before_s),
            after_s: self.after_s.unwrap_or(base.after_s),
            beat_len: self.beat_len.unwrap_or(base.beat_len),
            beats: self.beats.unwrap_or(base.beats),
            resampling: self.resampling.unwrap_or(base.resampling),
            baseline: self.baseline.unwrap_or(base.baseline),
            normalisation: self.normalisation.unwrap_or(base.normalisation),
            denoise: self.denoise.unwrap_or(base.denoise),
            rr: self.rr.unwrap_or(base.rr),
            template: self.template.unwrap_or(base.template),
        }
    }
}

impl<'de> Deserialize<'de> for Preprocessing {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PreprocessingVisitor;

        impl<'de> Visitor<'de> for PreprocessingVisitor {
            type Value = Preprocessing;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a preset name (\"papers\" or \"inter_patient\") or a preprocessing object",
                )
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Preprocessing, E> {
                Preset::parse(name)
                    .map(Preset::preprocessing)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "unknown preprocessing preset {name:?}; expected \"papers\" or \
                             \"inter_patient\""
                        ))
                    })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Preprocessing, A::Error> {
                PartialPreprocessing::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(PartialPreprocessing::complete)
            }
        }

        deserializer.deserialize_any(PreprocessingVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// RR features
// ---------------------------------------------------------------------------------------------

/// The RR features of every beat of a record, given its beats' R-peak samples in time order.
///
/// With `r_1 < ... < r_n` the peak times in seconds (`sample / fs`), `RR_i = r_i - r_(i-1)` and
/// the record's mean interval `m = (r_n - r_1) / (n - 1)` (the mean of all its RR intervals),
/// beat `i` gets, in this order ([`RR_FEATURE_NAMES`]):
///
/// 0. `rr_previous` = `RR_i / m`: time since the previous beat, relative to the record's
///    mean (below 1 for a premature beat). The first beat, which has no previous beat, gets
///    its `rr_next`.
/// 1. `rr_next` = `RR_(i+1) / m`: time to the next beat (above 1 after a compensatory
///    pause). The last beat gets its `rr_previous`.
/// 2. `rr_local` = the mean of the last `local_beats` intervals ending at beat `i`
///    (`RR_(i-L+1) .. RR_i`, fewer at the start of the record) divided by `m`: the current
///    rhythm. The first beat gets its `rr_previous`.
/// 3. `rr_record_s` = `m` in seconds: the patient's mean RR interval (60 / mean heart rate).
///
/// The first three are near 1 for a regular rhythm; the fourth is typically 0.5 to 1.3. A
/// record with fewer than two beats has no intervals: its beats get 1, 1, 1, 1.
///
/// # Shapes
/// `peaks`: `[n]`; returns `[n]` rows of [`RR_FEATURES`].
pub fn rr_features(peaks: &[u64], fs: f64, local_beats: usize) -> Vec<[f64; RR_FEATURES]> {
    let n = peaks.len();
    if n < 2 {
        return vec![[1.0; RR_FEATURES]; n];
    }
    let time = |i: usize| peaks[i] as f64 / fs;
    let mean = (time(n - 1) - time(0)) / (n - 1) as f64;
    // A record whose beats all share one sample has no time scale; keep the ratios finite.
    let scale = if mean > 0.0 { mean } else { 1.0 };
    // intervals[j] = RR_(j+1) in 0-based beats: the interval ending at beat j + 1.
    let intervals: Vec<f64> = (1..n).map(|i| time(i) - time(i - 1)).collect();
    let mut prefix = Vec::with_capacity(n);
    prefix.push(0.0);
    for &rr in &intervals {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + rr);
    }
    let local_beats = local_beats.max(1);
    (0..n)
        .map(|i| {
            let previous = if i == 0 {
                intervals[0]
            } else {
                intervals[i - 1]
            };
            let next = if i + 1 == n {
                intervals[n - 2]
            } else {
                intervals[i]
            };
            let local = if i == 0 {
                previous
            } else {
                let first = i.saturating_sub(local_beats);
                (prefix[i] - prefix[first]) / (i - first) as f64
            };
            [previous / scale, next / scale, local / scale, mean]
        })
        .collect()
}

/// The rhythm features of every beat of a record ([`RrFeatures::rhythm`]), given its beats'
/// R-peak samples in time order. With `RR_i` and the local mean `L_i` (the mean of the last
/// `local_beats` intervals ending at beat `i`) as in [`rr_features`], beat `i` gets:
///
/// 0. `rr_ratio` = `RR_i / L_i`: below 1 for a beat that comes early in the current rhythm,
///    whatever the patient's heart rate (1 for the first beat).
/// 1. `rr_irregularity` = the mean of `|RR_j - RR_(j-1)|` over the same window, divided by
///    `L_i`: near 0 in a steady rhythm, large in atrial fibrillation, where an early beat is
///    the rule rather than a sign of an ectopic beat (0 while there are fewer than two
///    intervals).
///
/// # Shapes
/// `peaks`: `[n]`; returns `[n]` rows of [`RHYTHM_FEATURES`].
pub fn rhythm_features(peaks: &[u64], fs: f64, local_beats: usize) -> Vec<[f64; RHYTHM_FEATURES]> {
    let n = peaks.len();
    if n < 2 {
        return vec![[1.0, 0.0]; n];
    }
    let intervals: Vec<f64> = peaks
        .windows(2)
        .map(|w| (w[1] as f64 - w[0] as f64) / fs)
        .collect();
    let local_beats = local_beats.max(1);
    (0..n)
        .map(|i| {
            if i == 0 {
                return [1.0, 0.0];
            }
            // Intervals RR_(first+1) ..= RR_i are intervals[first..i].
            let first = i.saturating_sub(local_beats);
            let window = &intervals[first..i];
            let local = window.iter().sum::<f64>() / window.len() as f64;
            if local <= 0.0 {
                return [1.0, 0.0];
            }
            let changes: Vec<f64> = window.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
            let irregularity = if changes.is_empty() {
                0.0
            } else {
                changes.iter().sum::<f64>() / changes.len() as f64 / local
            };
            [intervals[i - 1] / local, irregularity]
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Signal processing
// ---------------------------------------------------------------------------------------------

/// Odd number of samples nearest to `seconds` at `fs`.
fn odd_window(seconds: f64, fs: f64) -> usize {
    2 * ((seconds * fs / 2.0).round() as usize) + 1
}

/// A running median of `width` (odd) samples, the signal extended by repeating its end samples.
///
/// Keeps a histogram of the window's values and walks the median's value as samples enter and
/// leave, so the cost per sample is the distance the median moves (a few values for an ECG),
/// not the window width.
///
/// # Shapes
/// `x`: `[n]`; returns `[n]`.
pub fn median_filter(x: &[i32], width: usize) -> Vec<i32> {
    let n = x.len();
    if n == 0 || width <= 1 {
        return x.to_vec();
    }
    let half = width / 2;
    let (lo, hi) = x
        .iter()
        .fold((i32::MAX, i32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let mut counts = vec![0u32; (hi - lo) as usize + 1];
    let bin = |v: i32| (v - lo) as usize;
    let at = |i: isize| x[i.clamp(0, n as isize - 1) as usize];
    for i in -(half as isize)..=half as isize {
        counts[bin(at(i))] += 1;
    }
    // `median` is a bin; `below` counts the window's values in bins under it. The median bin
    // is the one where `below <= rank < below + counts[median]`.
    let rank = half as u32;
    let mut median = 0usize;
    let mut below = 0u32;
    while below + counts[median] <= rank {
        below += counts[median];
        median += 1;
    }
    let mut out = Vec::with_capacity(n);
    out.push(lo + median as i32);
    for i in 1..n as isize {
        let incoming = bin(at(i + half as isize));
        let outgoing = bin(at(i - half as isize - 1));
        counts[incoming] += 1;
        if incoming < median {
            below += 1;
        }
        counts[outgoing] -= 1;
        if outgoing < median {
            below -= 1;
        }
        while below > rank {
            median -= 1;
            below -= counts[median];
        }
        while below + counts[median] <= rank {
            below += counts[median];
            median += 1;
        }
        out.push(lo + median as i32);
    }
    out
}

/// Lanczos-3 interpolation at fixed offsets from a centre sample: one set of taps per output
/// sample, computed once per sampling rate.
struct Lanczos {
    /// Per output sample: the input offset (from the peak) of the first tap, and the weights.
    taps: Vec<(isize, Vec<f64>)>,
}

impl Lanczos {
    const LOBES: f64 = 3.0;

    /// Output sample `k` of `beat_len` is at `-before_s + k · (before_s + after_s) / beat_len`
    /// seconds from the peak.
    fn new(fs: f64, before_s: f64, after_s: f64, beat_len: usize) -> Self {
        let step = (before_s + after_s) / beat_len as f64;
        // Input samples per output sample; above 1 the kernel is widened to low-pass.
        let stretch = (fs * step).max(1.0);
        let reach = Self::LOBES * stretch;
        let taps = (0..beat_len)
            .map(|k| {
                let centre = (-before_s + k as f64 * step) * fs;
                let first = (centre - reach).ceil() as isize;
                let last = (centre + reach).floor() as isize;
                let mut weights: Vec<f64> = (first..=last)
                    .map(|j| lanczos((j as f64 - centre) / stretch))
                    .collect();
                let sum: f64 = weights.iter().sum();
                if sum.abs() > 1e-12 {
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
                (first, weights)
            })
            .collect();
        Self { taps }
    }

    /// The beat around sample `peak` of `x` (indices outside `x` repeat its end samples).
    fn apply(&self, x: &[f64], peak: usize, out: &mut Vec<f64>) {
        let last = x.len() as isize - 1;
        out.clear();
        for (first, weights) in &self.taps {
            let start = peak as isize + first;
            let inside = start >= 0 && start + weights.len() as isize - 1 <= last;
            let value = if inside {
                let window = &x[start as usize..start as usize + weights.len()];
                window.iter().zip(weights).map(|(v, w)| v * w).sum()
            } else {
                weights
                    .iter()
                    .enumerate()
                    .map(|(m, w)| w * x[(start + m as isize).clamp(0, last) as usize])
                    .sum()
            };
            out.push(value);
        }
    }
}

/// `sinc(x) · sinc(x / 3)` for `|x| < 3`, else 0.
fn lanczos(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    if x.abs() >= Lanczos::LOBES {
        return 0.0;
    }
    let px = std::f64::consts::PI * x;
    Lanczos::LOBES * px.sin() * (px / Lanczos::LOBES).sin() / (px * px)
}

/// Zero mean, unit standard deviation (only centred when flat).
fn standardise(beat: &mut [f64]) {
    let n = beat.len() as f64;
    let mean = beat.iter().sum::<f64>() / n;
    let var = beat.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let std = var.sqrt();
    let scale = if std > 1e-12 { 1.0 / std } else { 1.0 };
    for v in beat {
        *v = (*v - mean) * scale;
    }
}

/// Subtracts from the waveform part (the first `beat_len` values) of every row of `rows` the
/// median over the rows of each sample ([`Template::Subtract`]).
///
/// # Shapes
/// `rows`: `[beats, row_len]`, `row_len >= beat_len`.
fn subtract_typical_beat(rows: &mut [f32], row_len: usize, beat_len: usize) {
    let beats = rows.len() / row_len;
    if beats == 0 {
        return;
    }
    let mut column = Vec::with_capacity(beats);
    let typical: Vec<f32> = (0..beat_len)
        .map(|j| {
            column.clear();
            column.extend(rows.chunks_exact(row_len).map(|r| r[j]));
            *column.select_nth_unstable_by(beats / 2, f32::total_cmp).1
        })
        .collect();
    for row in rows.chunks_exact_mut(row_len) {
        for (v, t) in row[..beat_len].iter_mut().zip(&typical) {
            *v -= t;
        }
    }
}

/// Median of `values` (the upper one for an even count); `None` when empty.
fn median_of(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

// ---------------------------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------------------------

/// The index of the lead `p` asks for in `record`.
fn lead_index(record: &Record, lead: Option<&str>) -> Result<usize, WfdbError> {
    let signals = &record.header.signals;
    let Some(name) = lead else {
        return if signals.is_empty() {
            Err(extraction_error(record, "the record has no signals".into()))
        } else {
            Ok(0)
        };
    };
    signals
        .iter()
        .position(|s| s.description.trim().eq_ignore_ascii_case(name.trim()))
        .ok_or_else(|| {
            let found: Vec<&str> = signals.iter().map(|s| s.description.as_str()).collect();
            extraction_error(
                record,
                format!("has no signal described {name:?} (its signals: {found:?})"),
            )
        })
}

fn extraction_error(record: &Record, message: String) -> WfdbError {
    WfdbError::Extraction {
        record: record.name().to_owned(),
        message,
    }
}

/// Every beat of `record` under `p` and `labels`, with its R-peak sample: one patient named
/// after the record, rows of `p.row_len()` values (see the [module docs](self) for the
/// pipeline), beats in annotation order.
///
/// # Shapes
/// A dataset of `[beats, beat_len + feature_len]` rows; the peaks are `[beats]`.
pub fn extract(
    record: &Record,
    annotations: &[Annotation],
    p: &Preprocessing,
    labels: LabelSet,
) -> Result<(Dataset, Vec<u64>), WfdbError> {
    p.validate()
        .map_err(|e| WfdbError::InvalidArgument(format!("preprocessing.{e}")))?;
    let fs = record.header.sampling_frequency;
    let lead = lead_index(record, p.lead.as_deref())?;
    let (digital, spec) = (&record.signals[lead], &record.header.signals[lead]);
    if let Some(position) = digital.iter().position(|&d| d == FORMAT_212_INVALID) {
        return Err(extraction_error(
            record,
            format!(
                "lead {lead} sample {position} is the invalid-sample value {FORMAT_212_INVALID}; \
                 min-max normalisation needs every sample"
            ),
        ));
    }
    let mut signal: Vec<f64> = match p.baseline {
        Baseline::None => digital
            .iter()
            .map(|&d| wfdb::to_physical(d, spec))
            .collect(),
        Baseline::Median { first_s, second_s } => {
            let wide: Vec<i32> = digital.iter().map(|&d| i32::from(d)).collect();
            let first = median_filter(&wide, odd_window(first_s, fs));
            let baseline = median_filter(&first, odd_window(second_s, fs));
            wide.iter()
                .zip(&baseline)
                .map(|(&d, &b)| f64::from(d - b) / spec.gain)
                .collect()
        }
    };

    // Beat annotations (for RR intervals and the QRS amplitude), and which of them are beats of
    // the label set.
    let beat_annotations: Vec<usize> = annotations
        .iter()
        .enumerate()
        .filter(|(_, a)| is_beat(a.symbol))
        .map(|(i, _)| i)
        .collect();

    match p.normalisation {
        Normalisation::RecordMinMax => {
            let (min, max) = signal
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            // No NaN is possible here: gains are finite and non-zero, and an empty lead gives
            // +-inf.
            if max <= min {
                return Err(extraction_error(
                    record,
                    format!("lead {lead} is empty or constant; it cannot be min-max normalised"),
                ));
            }
            let range = max - min;
            signal.iter_mut().for_each(|v| *v = (*v - min) / range);
        }
        Normalisation::RecordPeak => {
            let reach = (0.05 * fs).round() as usize;
            let amplitudes = beat_annotations
                .iter()
                .map(|&i| annotations[i].sample as usize)
                .filter(|&peak| peak < signal.len())
                .map(|peak| {
                    let end = (peak + reach).min(signal.len() - 1);
                    signal[peak.saturating_sub(reach)..=end]
                        .iter()
                        .fold(0.0_f64, |m, v| m.max(v.abs()))
                })
                .collect();
            let amplitude = median_of(amplitudes).unwrap_or(0.0);
            if amplitude > 0.0 {
                signal.iter_mut().for_each(|v| *v /= amplitude);
            }
        }
        Normalisation::Beat => {}
    }

    let before = (p.before_s * fs).round() as usize;
    let after = (p.after_s * fs).round() as usize;
    let len = signal.len();
    let candidates: Vec<(usize, u8)> = match p.beats {
        BeatSelection::Papers => {
            // `ann.sample[1:-1]`: the record's first and last annotations are never used, and
            // of those left the first and the last only serve as neighbours.
            (2..annotations.len().saturating_sub(2))
                .filter_map(|i| {
                    let class = labels.class_of(annotations[i].symbol)?;
                    let (left, peak, right) = (
                        i128::from(annotations[i - 1].sample),
                        i128::from(annotations[i].sample),
                        i128::from(annotations[i + 1].sample),
                    );
                    let (before, after) = (before as i128, after as i128);
                    let fits = peak - before >= 0
                        && peak - before >= left
                        && peak + after < len as i128 // `<= len(s) - 1` in regenerate.py
                        && peak + after <= right;
                    fits.then_some((i, class))
                })
                .collect()
        }
        BeatSelection::All => annotations
            .iter()
            .enumerate()
            .filter(|(_, a)| a.sample < len as u64)
            .filter_map(|(i, a)| Some((i, labels.class_of(a.symbol)?)))
            .collect(),
    };

    let rr = p.rr.map(|rr| {
        let peaks: Vec<u64> = beat_annotations
            .iter()
            .map(|&i| annotations[i].sample)
            .collect();
        let rhythm = rr
            .rhythm
            .then(|| rhythm_features(&peaks, fs, rr.local_beats));
        (rr_features(&peaks, fs, rr.local_beats), rhythm)
    });
    let row_len = p.row_len();
    let mut rows = Vec::with_capacity(candidates.len() * row_len);
    let mut classes = Vec::with_capacity(candidates.len());
    let mut peaks = Vec::with_capacity(candidates.len());
    enum Cutter {
        Fourier(Resampler),
        Lanczos(Lanczos),
    }
    let cutter = match p.resampling {
        Resampling::Fourier => Cutter::Fourier(Resampler::new(before + after + 1, p.beat_len)),
        Resampling::Lanczos => Cutter::Lanczos(Lanczos::new(fs, p.before_s, p.after_s, p.beat_len)),
    };
    let mut window = Vec::with_capacity(before + after + 1);
    let mut beat = Vec::with_capacity(p.beat_len);
    for (index, class) in candidates {
        let peak = annotations[index].sample as usize;
        match &cutter {
            Cutter::Lanczos(l) => l.apply(&signal, peak, &mut beat),
            Cutter::Fourier(fourier) => {
                let start = peak as isize - before as isize;
                let end = peak + after;
                if start >= 0 && end < len {
                    beat = fourier.apply(&signal[start as usize..=end]);
                } else {
                    window.clear();
                    window.extend(
                        (start..=end as isize)
                            .map(|t| signal[t.clamp(0, len as isize - 1) as usize]),
                    );
                    beat = fourier.apply(&window);
                }
            }
        }
        if p.denoise {
            beat = wfdb::denoise(&beat);
        }
        if p.normalisation == Normalisation::Beat {
            standardise(&mut beat);
        }
        rows.extend(beat.iter().map(|&v| v as f32));
        if let Some((features, rhythm)) = &rr {
            // Every label-set symbol is a beat symbol, so the annotation is in the list.
            let position = beat_annotations.partition_point(|&i| i < index);
            rows.extend(features[position].iter().map(|&v| v as f32));
            if let Some(rhythm) = rhythm {
                rows.extend(rhythm[position].iter().map(|&v| v as f32));
            }
        }
        classes.push(class);
        peaks.push(annotations[index].sample);
    }
    if p.template == Template::Subtract {
        subtract_typical_beat(&mut rows, row_len, p.beat_len);
    }
    let beats = classes.len();
    let names = if beats == 0 {
        Vec::new()
    } else {
        vec![record.name().to_owned()]
    };
    let dataset = Dataset::with_features(rows, classes, p.beat_len, p.feature_len(), NUM_CLASSES)?
        .with_patients(vec![0; beats], names)?;
    Ok((dataset, peaks))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    use super::*;
    use crate::wfdb::{annotation_symbol, parse_header};

    const RAW_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/mitdb-raw");
    use crate::wfdb::{DS1, DS2};

    fn raw_dir() -> Option<PathBuf> {
        let dir = PathBuf::from(RAW_DIR);
        if dir.join("100.hea").is_file() {
            Some(dir)
        } else {
            println!("skipping: ../shared/data/mitdb-raw not found");
            None
        }
    }

    fn ann(sample: u64, code: u8) -> Annotation {
        Annotation {
            sample,
            code,
            symbol: annotation_symbol(code),
            subtype: 0,
            chan: 0,
            num: 0,
            aux: None,
        }
    }

    /// A one-signal record named `name` sampled at `fs`, lead described `description`.
    fn record(name: &str, fs: f64, description: &str, digital: Vec<i16>) -> Record {
        let text = format!(
            "{name} 1 {fs} {}\n{name}.dat 212 200 11 1024 0 0 0 {description}\n",
            digital.len()
        );
        let header = parse_header(Path::new("syn.hea"), &text).expect("header");
        Record::from_parts(header, vec![digital]).expect("record")
    }

    /// The papers' extraction as it was written before the general pipeline: the reference the
    /// `papers` preset must reproduce bit for bit.
    fn papers_reference(
        record: &Record,
        annotations: &[Annotation],
    ) -> (Vec<f32>, Vec<u8>, Vec<u64>) {
        let lead = &record.signals[0];
        let spec = &record.header.signals[0];
        let physical: Vec<f64> = lead.iter().map(|&d| wfdb::to_physical(d, spec)).collect();
        let (min, max) = physical
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let range = max - min;
        let normalised: Vec<f64> = physical.iter().map(|&v| (v - min) / range).collect();
        let signal_len = normalised.len() as i128;
        let half = wfdb::HALF_WINDOW as i128;
        let inner = annotations
            .get(1..annotations.len().saturating_sub(1))
            .unwrap_or_default();
        let resampler = Resampler::new(wfdb::WINDOW_LEN, wfdb::BEAT_LEN);
        let (mut samples, mut labels, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
        for neighbours in inner.windows(3) {
            let (previous, current, next) = (&neighbours[0], &neighbours[1], &neighbours[2]);
            let Some(class) = wfdb::CLASS_SYMBOLS
                .iter()
                .position(|&s| s == current.symbol)
            else {
                continue;
            };
            let (left, peak, right) = (
                i128::from(previous.sample),
                i128::from(current.sample),
                i128::from(next.sample),
            );
            let fits = peak - half >= 0
                && peak - half >= left
                && peak + half < signal_len
                && peak + half <= right;
            if !fits {
                continue;
            }
            let start = (peak - half) as usize;
            let window = &normalised[start..start + wfdb::WINDOW_LEN];
            let beat = wfdb::denoise(&resampler.apply(window));
            samples.extend(beat.iter().map(|&v| v as f32));
            labels.push(class as u8);
            peaks.push(current.sample);
        }
        (samples, labels, peaks)
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// A continuous synthetic ECG sampled at `fs`: P-QRS-T beats at `peaks_s` (seconds), the
    /// classes' shapes by symbol, on a slow baseline wander. Values in digital units (200/mV).
    fn synthetic_ecg(fs: f64, seconds: f64, beats: &[(f64, &str)]) -> Vec<i16> {
        let n = (seconds * fs).round() as usize;
        (0..n)
            .map(|i| {
                let t = i as f64 / fs;
                let mut mv = 0.3 * (std::f64::consts::TAU * 0.2 * t).sin();
                for &(peak, symbol) in beats {
                    let waves: &[(f64, f64, f64)] = match symbol {
                        "V" => &[(1.4, 0.0, 0.03), (-0.6, 0.07, 0.03), (-0.4, 0.28, 0.06)],
                        _ => &[
                            (0.15, -0.2, 0.025),
                            (-0.1, -0.035, 0.012),
                            (1.0, 0.0, 0.013),
                            (-0.25, 0.035, 0.012),
                            (0.3, 0.25, 0.05),
                        ],
                    };
                    for &(amplitude, centre, width) in waves {
                        let z = (t - peak - centre) / width;
                        mv += amplitude * (-0.5 * z * z).exp();
                    }
                }
                (1024.0 + 200.0 * mv).round() as i16
            })
            .collect()
    }

    /// Beats at multiples of 0.5 s, so that every peak is a whole sample at 128, 250 and 360 Hz.
    const RHYTHM: [(f64, &str); 9] = [
        (1.0, "N"),
        (2.0, "N"),
        (3.0, "N"),
        (3.5, "A"),
        (4.5, "N"),
        (5.5, "N"),
        (6.0, "V"),
        (7.5, "N"),
        (8.5, "N"),
    ];

    fn rhythm_annotations(fs: f64) -> Vec<Annotation> {
        let code = |symbol: &str| {
            (0..50)
                .find(|&c| annotation_symbol(c) == symbol)
                .expect("code")
        };
        let mut annotations = vec![ann(0, 28)]; // a rhythm annotation ("+"), not a beat
        annotations.extend(
            RHYTHM
                .iter()
                .map(|&(t, symbol)| ann((t * fs).round() as u64, code(symbol))),
        );
        annotations
    }

    #[test]
    fn label_sets_map_symbols_as_aami_and_the_papers_define_them() {
        for (symbols, class) in [("NLRej", 0), ("AaJS", 1), ("VE", 2), ("F", 3), ("/fQ", 4)] {
            for symbol in symbols.chars() {
                assert_eq!(
                    LabelSet::Aami.class_of(&symbol.to_string()),
                    Some(class),
                    "{symbol}"
                );
                assert!(is_beat(&symbol.to_string()));
            }
        }
        for symbol in ["+", "~", "|", "x", "!", "\"", "[", "]", "p", "t", ""] {
            assert_eq!(LabelSet::Aami.class_of(symbol), None, "{symbol:?}");
            assert!(!is_beat(symbol));
        }
        assert_eq!(LabelSet::Papers.class_names(), ["N", "L", "R", "A", "V"]);
        assert_eq!(LabelSet::Aami.class_names(), ["N", "S", "V", "F", "Q"]);
        for (i, symbol) in ["N", "L", "R", "A", "V"].iter().enumerate() {
            assert_eq!(LabelSet::Papers.class_of(symbol), Some(i as u8));
        }
        assert_eq!(LabelSet::Papers.class_of("F"), None);
        assert_eq!(LabelSet::Papers.class_of("j"), None);
        let into_aami: Vec<Option<u8>> = (0..6).map(|c| LabelSet::Aami.from_papers(c)).collect();
        assert_eq!(
            into_aami,
            [Some(0), Some(0), Some(0), Some(1), Some(2), None]
        );
        assert_eq!(LabelSet::Papers.from_papers(3), Some(3));
        assert_eq!(serde_json::to_string(&LabelSet::Aami).unwrap(), "\"aami\"");
        assert_eq!(
            serde_json::from_str::<LabelSet>("\"papers\"").unwrap(),
            LabelSet::Papers
        );
        assert_eq!(LabelSet::default(), LabelSet::Aami);
    }

    #[test]
    fn preprocessing_deserialises_from_a_preset_or_an_object() {
        let parse = |json: &str| serde_json::from_str::<Preprocessing>(json);
        assert_eq!(parse("\"papers\"").unwrap(), Preprocessing::papers());
        assert_eq!(
            parse("\"inter_patient\"").unwrap(),
            Preprocessing::inter_patient()
        );
        let custom =
            parse(r#"{"preset": "inter_patient", "normalisation": "beat", "rr": null}"#).unwrap();
        assert_eq!(custom.normalisation, Normalisation::Beat);
        assert_eq!((custom.rr, custom.feature_len()), (None, 0));
        assert_eq!(custom.before_s, 0.25);
        assert_eq!(custom.preset(), None);
        assert!(
            custom.describe().starts_with("custom"),
            "{}",
            custom.describe()
        );
        // Without a preset, missing fields come from the default (the papers').
        let defaulted = parse(r#"{"rr": {"local_beats": 5}}"#).unwrap();
        assert_eq!(
            defaulted.rr,
            Some(RrFeatures {
                local_beats: 5,
                rhythm: false
            })
        );
        assert_eq!(defaulted.beat_len, Preprocessing::papers().beat_len);
        let lead_zero = parse(r#"{"preset": "inter_patient", "lead": null}"#).unwrap();
        assert_eq!(lead_zero.lead, None);
        let median =
            parse(r#"{"baseline": {"median": {"first_s": 0.1, "second_s": 0.3}}}"#).unwrap();
        assert_eq!(
            median.baseline,
            Baseline::Median {
                first_s: 0.1,
                second_s: 0.3
            }
        );
        // A full object round-trips.
        for p in [
            Preprocessing::papers(),
            Preprocessing::inter_patient(),
            custom,
        ] {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(parse(&json).unwrap(), p, "{json}");
        }
        for (json, needle) in [
            ("\"fancy\"", "unknown preprocessing preset \"fancy\""),
            (r#"{"window": 3}"#, "unknown field `window`"),
            (r#"{"preset": "fancy"}"#, "fancy"),
            (r#"{"beats": "some"}"#, "some"),
            ("3", "a preset name"),
        ] {
            let err = parse(json).expect_err(json).to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn preprocessing_validation_names_the_field() {
        assert!(Preprocessing::papers().validate().is_ok());
        assert!(Preprocessing::inter_patient().validate().is_ok());
        let check = |change: fn(&mut Preprocessing), field: &str| {
            let mut p = Preprocessing::inter_patient();
            change(&mut p);
            let err = p.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
        };
        check(|p| p.beat_len = 0, "beat_len");
        check(|p| p.beat_len = 5000, "beat_len");
        check(|p| p.before_s = -0.1, "before_s");
        check(|p| p.before_s = f64::NAN, "before_s");
        check(|p| p.after_s = 11.0, "after_s");
        check(
            |p| {
                p.before_s = 0.0;
                p.after_s = 0.0;
            },
            "after_s",
        );
        check(
            |p| {
                p.baseline = Baseline::Median {
                    first_s: 0.0,
                    second_s: 0.6,
                }
            },
            "baseline.median.first_s",
        );
        check(
            |p| {
                p.rr = Some(RrFeatures {
                    local_beats: 0,
                    rhythm: false,
                })
            },
            "rr.local_beats",
        );
        check(|p| p.lead = Some(" ".into()), "lead");
    }

    #[test]
    fn rr_features_of_a_hand_made_rhythm() {
        // 100 Hz: beats at 1, 2, 3, 3.5 (premature), 5 (pause), 6 s.
        let peaks = [100, 200, 300, 350, 500, 600];
        let features = rr_features(&peaks, 100.0, 2);
        // Intervals 1, 1, 0.5, 1.5, 1 s; mean (6 - 1) / 5 = 1 s.
        let expected = [
            [1.0, 1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0, 1.0],
            [1.0, 0.5, 1.0, 1.0],
            [0.5, 1.5, 0.75, 1.0],
            [1.5, 1.0, 1.0, 1.0],
            [1.0, 1.0, 1.25, 1.0],
        ];
        for (i, (got, want)) in features.iter().zip(&expected).enumerate() {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-12, "beat {i}: {got:?} != {want:?}");
            }
        }
        // The same rhythm at 250 Hz and twice as fast: ratios unchanged, the mean halves.
        let fast: Vec<u64> = peaks.iter().map(|p| p * 2).collect();
        for (got, want) in rr_features(&fast, 400.0, 2).iter().zip(&expected) {
            assert!((got[0] - want[0]).abs() < 1e-12 && (got[2] - want[2]).abs() < 1e-12);
            assert!((got[3] - 0.5).abs() < 1e-12, "{got:?}");
        }
        assert_eq!(rr_features(&[42], 360.0, 10), vec![[1.0; 4]]);
        assert!(rr_features(&[], 360.0, 10).is_empty());
        assert!(
            rr_features(&[5, 5, 5], 360.0, 10)
                .iter()
                .flatten()
                .all(|v| v.is_finite())
        );
    }

    #[test]
    fn rhythm_features_of_a_steady_and_an_irregular_rhythm() {
        let fs = 100.0;
        // Steady at 1 s, then a beat 0.5 s early: its ratio is 0.5, the irregularity shows.
        let steady: Vec<u64> = vec![0, 100, 200, 300, 400, 450];
        let f = rhythm_features(&steady, fs, 3);
        assert_eq!(f[0], [1.0, 0.0]);
        assert!(
            (f[3][0] - 1.0).abs() < 1e-12 && f[3][1].abs() < 1e-12,
            "{:?}",
            f[3]
        );
        // Beat 5: window RR 1, 1, 0.5 (mean 5/6); changes 0, 0.5 (mean 0.25).
        let local = 2.5 / 3.0;
        assert!((f[5][0] - 0.5 / local).abs() < 1e-12, "{:?}", f[5]);
        assert!((f[5][1] - 0.25 / local).abs() < 1e-12, "{:?}", f[5]);
        // Fewer than two beats: neutral values.
        assert_eq!(rhythm_features(&[7], fs, 3), vec![[1.0, 0.0]]);
        // In rows: after the four RR features.
        let record = record("rh", 360.0, "MLII", synthetic_ecg(360.0, 10.0, &RHYTHM));
        let mut p = Preprocessing::inter_patient();
        p.rr = Some(RrFeatures {
            local_beats: 10,
            rhythm: true,
        });
        let (beats, _) = extract(&record, &rhythm_annotations(360.0), &p, LabelSet::Aami).unwrap();
        assert_eq!(beats.feature_len(), RR_FEATURES + RHYTHM_FEATURES);
        let times: Vec<u64> = RHYTHM.iter().map(|&(t, _)| (t * 360.0) as u64).collect();
        let want = rhythm_features(&times, 360.0, 10);
        for (i, w) in want.iter().enumerate() {
            let got = &beats.features(i)[RR_FEATURES..];
            assert!(
                (f64::from(got[0]) - w[0]).abs() < 1e-6 && (f64::from(got[1]) - w[1]).abs() < 1e-6
            );
        }
        let parsed: Preprocessing = serde_json::from_str(
            r#"{"preset": "inter_patient", "rr": {"local_beats": 10, "rhythm": true}}"#,
        )
        .unwrap();
        assert_eq!(parsed, p);
    }

    #[test]
    fn extracted_rows_carry_rr_features_of_beats_only() {
        let fs = 360.0;
        let digital = synthetic_ecg(fs, 10.0, &RHYTHM);
        let record = record("rr", fs, "MLII", digital);
        let mut annotations = rhythm_annotations(fs);
        // A noise annotation between beats: neither a beat nor an RR boundary.
        annotations.insert(5, ann((4.0 * fs) as u64, 14));
        let p = Preprocessing::inter_patient();
        let (beats, peaks) = extract(&record, &annotations, &p, LabelSet::Aami).unwrap();
        assert_eq!(beats.len(), RHYTHM.len());
        assert_eq!((beats.beat_len(), beats.feature_len()), (128, RR_FEATURES));
        assert_eq!(beats.labels(), &[0, 0, 0, 1, 0, 0, 2, 0, 0]);
        assert_eq!(beats.patient_names(), &["rr".to_owned()]);
        assert_eq!(peaks[3], (3.5 * fs) as u64);
        let times: Vec<u64> = RHYTHM.iter().map(|&(t, _)| (t * fs) as u64).collect();
        let expected = rr_features(&times, fs, 10);
        for (i, want) in expected.iter().enumerate() {
            let got = beats.features(i);
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-6,
                    "beat {i}: {got:?} vs {want:?}"
                );
            }
        }
        // The premature A beat: 0.5 s after a beat in a rhythm averaging 7.5 / 8 s.
        let a = beats.features(3);
        assert!((f64::from(a[0]) - 0.5 / (7.5 / 8.0)).abs() < 1e-6, "{a:?}");
        assert!((f64::from(a[3]) - 7.5 / 8.0).abs() < 1e-6, "{a:?}");
    }

    #[test]
    fn beats_are_the_same_at_any_sampling_rate() {
        // The beats as cut (the typical beat left in, so the R peak can be found below).
        let p = Preprocessing {
            template: Template::None,
            ..Preprocessing::inter_patient()
        };
        let cut = |fs: f64| {
            // Peaks on whole samples at every rate (annotations are whole samples).
            let rhythm: Vec<(f64, &str)> = RHYTHM
                .iter()
                .map(|&(t, symbol)| ((t * fs).round() / fs, symbol))
                .collect();
            let record = record("rate", fs, "MLII", synthetic_ecg(fs, 10.0, &rhythm));
            extract(&record, &rhythm_annotations(fs), &p, LabelSet::Aami)
                .unwrap()
                .0
        };
        let reference = cut(360.0);
        assert_eq!(reference.len(), RHYTHM.len());
        for fs in [128.0, 250.0, 257.0, 500.0] {
            let other = cut(fs);
            assert_eq!(other.len(), reference.len(), "{fs} Hz");
            assert_eq!(other.labels(), reference.labels());
            let mut worst = 0.0f32;
            for i in 0..reference.len() {
                for (a, b) in reference.row(i).iter().zip(other.row(i)) {
                    worst = worst.max((a - b).abs());
                }
            }
            println!("{fs} Hz vs 360 Hz: largest difference {worst:.4} (R peak = 1)");
            assert!(worst < 0.05, "{fs} Hz: rows differ by up to {worst}");
        }
        // The beat is the signal: the R peak at its index, near 1 after normalisation.
        let r = (0.25 / 0.7 * 128.0_f64).round() as usize;
        let beat = reference.beat(0);
        let top = beat
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap();
        assert!(top.abs_diff(r) <= 1, "peak at {top}, expected {r}");
        assert!((beat[top] - 1.0).abs() < 0.1, "peak {}", beat[top]);
    }

    #[test]
    fn papers_preset_reproduces_the_papers_extraction_bit_for_bit() {
        let fs = 360.0;
        let digital: Vec<i16> = (0..4000)
            .map(|t| {
                let t = t as f64;
                (1024.0 + 300.0 * (0.05 * t).sin() + 80.0 * (0.31 * t).cos()).round() as i16
            })
            .collect();
        let record = record("syn", fs, "MLII", digital);
        let annotations: Vec<Annotation> = [
            (50, 28),
            (300, 1),
            (600, 1),
            (700, 5),
            (800, 8),
            (950, 2),
            (1049, 3),
            (1300, 14),
            (1500, 3),
            (1700, 6),
            (1850, 2),
            (2300, 11),
            (2600, 5),
            (3850, 1),
            (3990, 1),
            (3995, 1),
        ]
        .iter()
        .map(|&(s, c)| ann(s, c))
        .collect();
        let check = |record: &Record, annotations: &[Annotation]| {
            let (rows, labels, peaks) = papers_reference(record, annotations);
            let (beats, got_peaks) = extract(
                record,
                annotations,
                &Preprocessing::papers(),
                LabelSet::Papers,
            )
            .unwrap();
            assert_eq!(got_peaks, peaks, "{}", record.name());
            assert_eq!(beats.labels(), labels.as_slice());
            assert_eq!(bits(beats.rows()), bits(&rows), "{}", record.name());
            assert_eq!(beats.feature_len(), 0);
            // And through the older entry point.
            assert_eq!(wfdb::extract_beats(record, annotations).unwrap(), beats);
            beats.len()
        };
        assert_eq!(check(&record, &annotations), 7);
        let Some(dir) = raw_dir() else { return };
        let mut total = 0;
        for name in ["100", "208", "232"] {
            let record = wfdb::read_record(&dir, name).unwrap();
            let annotations = wfdb::read_annotations(&dir.join(format!("{name}.atr"))).unwrap();
            total += check(&record, &annotations);
        }
        assert_eq!(total, 6561);
    }

    #[test]
    fn median_filter_matches_a_direct_median() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as i32 % 200 - 100
        };
        for (len, width) in [(1, 5), (7, 3), (50, 9), (300, 73), (10, 31), (40, 1)] {
            let x: Vec<i32> = (0..len).map(|_| next()).collect();
            let got = median_filter(&x, width);
            let half = (width / 2) as isize;
            let expected: Vec<i32> = (0..len as isize)
                .map(|i| {
                    let mut window: Vec<i32> = (i - half..=i + half)
                        .map(|j| x[j.clamp(0, len as isize - 1) as usize])
                        .collect();
                    window.sort();
                    window[window.len() / 2]
                })
                .collect();
            assert_eq!(got, expected, "len {len}, width {width}");
        }
        assert!(median_filter(&[], 5).is_empty());
        assert_eq!(odd_window(0.2, 360.0), 73);
        assert_eq!(odd_window(0.6, 360.0), 217);
        assert_eq!(odd_window(0.2, 128.0), 27);
    }

    #[test]
    fn normalisations_and_leads() {
        let fs = 360.0;
        let record = record("lead", fs, "V1", synthetic_ecg(fs, 10.0, &RHYTHM));
        let annotations = rhythm_annotations(fs);
        let err = extract(
            &record,
            &annotations,
            &Preprocessing::inter_patient(),
            LabelSet::Aami,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("record lead") && err.contains("\"MLII\"") && err.contains("V1"),
            "{err}"
        );
        let p = Preprocessing {
            lead: Some("v1".into()),
            normalisation: Normalisation::Beat,
            template: Template::None,
            ..Preprocessing::inter_patient()
        };
        let (beats, _) = extract(&record, &annotations, &p, LabelSet::Aami).unwrap();
        for i in 0..beats.len() {
            let beat: Vec<f64> = beats.beat(i).iter().map(|&v| f64::from(v)).collect();
            let mean = beat.iter().sum::<f64>() / beat.len() as f64;
            let var = beat.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / beat.len() as f64;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
        // Every beat under `all`, even one whose window runs past the record's start.
        let mut early = annotations.clone();
        early.insert(1, ann(20, 1));
        let (beats, peaks) = extract(&record, &early, &p, LabelSet::Aami).unwrap();
        assert_eq!((beats.len(), peaks[0]), (RHYTHM.len() + 1, 20));
        // Papers labels leave out what is not N L R A V; AAMI keeps F.
        let mut fusion = annotations.clone();
        fusion[2] = ann(fusion[2].sample, 6);
        let count = |labels| extract(&record, &fusion, &p, labels).unwrap().0.len();
        assert_eq!((count(LabelSet::Aami), count(LabelSet::Papers)), (9, 8));
    }

    #[test]
    fn the_typical_beat_is_the_sample_wise_median_and_is_subtracted() {
        let fs = 360.0;
        let record = record("tmpl", fs, "MLII", synthetic_ecg(fs, 10.0, &RHYTHM));
        let annotations = rhythm_annotations(fs);
        let subtracted = Preprocessing::inter_patient();
        let plain = Preprocessing {
            template: Template::None,
            ..subtracted.clone()
        };
        let (a, _) = extract(&record, &annotations, &plain, LabelSet::Aami).unwrap();
        let (b, _) = extract(&record, &annotations, &subtracted, LabelSet::Aami).unwrap();
        assert_eq!((a.len(), a.row_len()), (b.len(), b.row_len()));
        for j in 0..a.beat_len() {
            let mut column: Vec<f32> = (0..a.len()).map(|i| a.beat(i)[j]).collect();
            column.sort_by(f32::total_cmp);
            let median = column[a.len() / 2];
            for i in 0..a.len() {
                assert!(
                    (b.beat(i)[j] - (a.beat(i)[j] - median)).abs() < 1e-6,
                    "{i} {j}"
                );
            }
        }
        // The side features are left as they were.
        assert_eq!(a.features(3), b.features(3));
        // The inter_patient preset subtracts it; a job spec can leave it out.
        let p: Preprocessing =
            serde_json::from_str(r#"{"preset": "inter_patient", "template": "none"}"#).unwrap();
        assert_eq!(p, plain);
        assert_eq!(p.preset(), None);
        let papers: Preprocessing =
            serde_json::from_str(r#"{"preset": "papers", "template": "subtract"}"#).unwrap();
        assert!(
            papers.describe().contains("typical beat subtracted"),
            "{}",
            papers.describe()
        );
        let err = serde_json::from_str::<Preprocessing>(r#"{"template": "mean"}"#).unwrap_err();
        assert!(err.to_string().contains("mean"), "{err}");
    }

    #[test]
    fn ds1_and_ds2_have_the_published_aami_beat_counts() {
        let Some(dir) = raw_dir() else { return };
        let p = Preprocessing::inter_patient();
        for (name, records, expected) in [
            ("DS1", DS1, [45_866, 944, 3_788, 415, 8]),
            ("DS2", DS2, [44_259, 1_837, 3_221, 388, 7]),
        ] {
            let started = Instant::now();
            let data = wfdb::load_records_with(&dir, &records, &p, LabelSet::Aami).unwrap();
            let seconds = started.elapsed().as_secs_f64();
            assert_eq!(data.class_counts(), expected, "{name}");
            assert_eq!(data.len(), expected.iter().sum::<usize>());
            assert_eq!(data.patient_names(), records.map(str::to_owned).as_slice());
            assert_eq!(data.row_len(), 128 + RR_FEATURES);
            assert!(data.rows().iter().all(|v| v.is_finite()));
            println!(
                "{name}: {} beats {:?} (N S V F Q) from {} records, extracted in {seconds:.2} s",
                data.len(),
                data.class_counts(),
                records.len()
            );
        }
    }
}
