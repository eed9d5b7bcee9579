//! Raw MIT-BIH Arrhythmia Database records (PhysioNet WFDB format) and the beat extraction of the
//! split-learning papers, so that a hospital agent can train on raw records instead of the
//! pre-cut beat files read by [`crate::data::load_beats`].
//!
//! # The three files of a record
//!
//! A record `100` in directory `dir` is `dir/100.hea`, `dir/100.dat` and `dir/100.atr`.
//!
//! **`.hea` header** (text, one item per line; blank lines and lines starting with `#` are
//! skipped, the `#` lines are kept as [`Header::comments`]):
//!
//! - the *record line*: `name nsig [fs[/counterfreq[(base)]] [nsamp [basetime [basedate]]]]`,
//!   e.g. `100 2 360 650000`: record name, number of signals, sampling frequency (Hz, default
//!   250), samples per signal. Multi-segment records (`name/nseg`) are not supported.
//! - one *signal line* per signal:
//!   `file format[xspf][:skew][+offset] gain[(baseline)][/units] adcres adczero initval checksum
//!   blocksize description`, e.g. `100.dat 212 200 11 1024 995 -22131 0 MLII`. Every field after
//!   the format is optional (each only if the ones before it are present); the description is the
//!   rest of the line and may contain spaces. A gain of 0 or no gain means the WFDB default of
//!   200 adu per unit; the baseline defaults to the ADC zero, the units to `mV`, the resolution
//!   to 12 bits, the initial value to the ADC zero. The checksum is the 16-bit signed
//!   (wrapping) sum of all samples of the signal.
//!
//! Only storage format 212 is supported; any other format is a [`WfdbError::UnsupportedFormat`]
//! naming it. More than one sample per frame (`x2`) and skew (`:n`) are rejected too; a byte
//! offset (`+n`) is honoured.
//!
//! **`.dat` signals, format 212**: the samples of all signals stored in one file are interleaved
//! frame by frame (`s0[0] s1[0] s0[1] s1[1] ...` for two signals), and that sample stream is
//! packed two 12-bit two's-complement samples per 3 bytes: for bytes `b0 b1 b2`, the first sample
//! is `b0 | (b1 & 0x0f) << 8` and the second `b2 | (b1 & 0xf0) << 4`. An odd number of samples
//! ends with a 2-byte group (a third padding byte is accepted). The value −2048 is WFDB's
//! "invalid sample" marker. The reader checks that the file holds exactly the header's sample
//! count (a missing count is derived from the file size) and that every signal's checksum
//! matches the header's.
//!
//! **`.atr` annotations, MIT format**: a stream of 16-bit little-endian words, each a 6-bit code
//! `A` (high bits) and a 10-bit field `I`:
//!
//! - `A` in `1..=49` (0 too): an annotation of that code at `I` samples after the previous one
//!   (plus any pending SKIP); the code maps to a symbol through the WFDB `ecgcodes.h` table
//!   ([`annotation_symbol`]: 1 `N`, 2 `L`, 3 `R`, 5 `V`, 8 `A`, 28 `+`, ...);
//! - `A` = 59 (SKIP): the next 4 bytes are a signed 32-bit interval in PDP-11 order (high
//!   16-bit word first, each word little-endian), added to the next annotation's time;
//! - `A` = 60 (NUM), 61 (SUB), 62 (CHN): set the `num`, `subtype`, `chan` field of the
//!   preceding annotation to `I` (`num` and `chan` carry over to later annotations, as in WFDB);
//! - `A` = 63 (AUX): `I` bytes of auxiliary text follow, padded to an even length;
//! - the word 0 (`A` = 0, `I` = 0) ends the file.
//!
//! # Beat extraction, as the papers did
//!
//! [`extract_beats`] reproduces `shared/data/mitbih/regenerate.py`, the re-implementation of
//! Abuadbba et al.'s preprocessing notebook that produced the MIT-BIH beat set of the
//! split-learning papers (`train.f32` / `test.f32`), up to the final random sampling:
//!
//! 1. Lead 0 (MLII) in physical units, `(digital - baseline) / gain` in `f64`, min-max
//!    normalised over the whole record: `(s - min) / (max - min)`.
//! 2. The first and the last annotation of the record are dropped (`ann.sample[1:-1]`); of what
//!    remains, every annotation except the first and the last is a candidate, and its two
//!    neighbours in that list (any annotation, beat or not) bound its window.
//! 3. A candidate becomes a beat if its symbol is one of `N L R A V` (class = position in
//!    [`CLASS_SYMBOLS`], i.e. N 0, L 1, R 2, A 3, V 4) and its window of ±[`HALF_WINDOW`] samples
//!    (201 samples, R peak in the middle) fits: `peak - 100 >= 0`, `peak - 100 >= previous`,
//!    `peak + 100 <= len - 1` and `peak + 100 <= next`.
//! 4. The 201-sample window is resampled to [`BEAT_LEN`] = 128 samples exactly as
//!    `scipy.signal.resample` does (FFT, keep the bins up to the new Nyquist frequency, the
//!    unpaired bin 64 doubled, inverse FFT, scaled by 128/201).
//! 5. It is then denoised exactly as the notebook's `denoise`: `pywt.wavedec` with the `bior4.4`
//!    wavelet, symmetric signal extension and the default level (3 for 128 samples), soft
//!    thresholding of *every* coefficient array (the approximation too) at
//!    `0.005 * sqrt(2 * log2(128))`, and `pywt.waverec`.
//! 6. The result is stored as `f32`.
//!
//! The papers then drew a class-balanced random sample of these beats with NumPy's generator
//! (seed 2019), which is not reproduced here: [`extract_beats`] returns *every* beat of the
//! record, in annotation order. The papers' records are [`PAPER_RECORDS`]: all 48 minus
//! [`EXCLUDED_RECORDS`] (the paced records 102, 104, 107 and 217, and 114, whose lead 0 is V5).
//! This module's tests (when `shared/data` is present) find every beat-set row drawn from records
//! 100, 208 and 232 among the extracted beats, with the same label and bit-identical samples.
//!
//! This extraction is the `papers` preset of [`crate::preprocess`], which also cuts beats in
//! other ways (windows in seconds at any sampling rate, baseline removal, AAMI labels, RR
//! features): [`load_records_with`].

use std::path::{Component, Path, PathBuf};

use crate::data::{DataError, Dataset};
use crate::preprocess::{self, LabelSet, Preprocessing};

/// The inter-patient split of de Chazal et al. (2004): DS1 trains, DS2 tests; the paced
/// records 102, 104, 107 and 217 are in neither.
pub const DS1: [&str; 22] = [
    "101", "106", "108", "109", "112", "114", "115", "116", "118", "119", "122", "124", "201",
    "203", "205", "207", "208", "209", "215", "220", "223", "230",
];
/// See [`DS1`].
pub const DS2: [&str; 22] = [
    "100", "103", "105", "111", "113", "117", "121", "123", "200", "202", "210", "212", "213",
    "214", "219", "221", "222", "228", "231", "232", "233", "234",
];

/// Samples per extracted beat (the 201-sample window resampled).
pub const BEAT_LEN: usize = 128;
/// Number of beat classes.
pub const NUM_CLASSES: usize = 5;
/// Annotation symbol of each class, in label order: class `i` is `CLASS_SYMBOLS[i]`.
pub const CLASS_SYMBOLS: [&str; NUM_CLASSES] = ["N", "L", "R", "A", "V"];
/// Samples taken on each side of the annotated R peak.
pub const HALF_WINDOW: usize = 100;
/// Samples of the window cut around each R peak before resampling.
pub const WINDOW_LEN: usize = 2 * HALF_WINDOW + 1;
/// The 43 MIT-BIH records the papers used.
pub const PAPER_RECORDS: [u16; 43] = [
    100, 101, 103, 105, 106, 108, 109, 111, 112, 113, 115, 116, 117, 118, 119, 121, 122, 123, 124,
    200, 201, 202, 203, 205, 207, 208, 209, 210, 212, 213, 214, 215, 219, 220, 221, 222, 223, 228,
    230, 231, 232, 233, 234,
];
/// The MIT-BIH records the papers left out (the four paced records and 114).
pub const EXCLUDED_RECORDS: [u16; 5] = [102, 104, 107, 114, 217];
/// The digital value WFDB uses in format 212 for an invalid (missing) sample.
pub const FORMAT_212_INVALID: i16 = -2048;

/// Gain used when the header gives none or 0 (WFDB's `DEFGAIN`).
const DEFAULT_GAIN: f64 = 200.0;
/// Sampling frequency used when the record line gives none (WFDB's `DEFFREQ`).
const DEFAULT_FREQUENCY: f64 = 250.0;
/// ADC resolution used for format 212 when the header gives none or 0.
const DEFAULT_RESOLUTION_212: u32 = 12;

const CODE_SKIP: u8 = 59;
const CODE_NUM: u8 = 60;
const CODE_SUB: u8 = 61;
const CODE_CHN: u8 = 62;
const CODE_AUX: u8 = 63;

/// Everything that can go wrong while reading a WFDB record or extracting its beats.
///
/// Header `line`s are 1-based, as an editor shows them; annotation `offset`s are 0-based byte
/// offsets into the `.atr` file.
#[derive(Debug, thiserror::Error)]
pub enum WfdbError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `.hea` line is malformed or describes something this reader does not support.
    #[error("{}, line {line}: {message}", path.display())]
    Header {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A signal is stored in a format other than 212.
    #[error(
        "{}, line {line}: signal {signal} is stored in WFDB format {format}; only format 212 is \
         supported",
        path.display()
    )]
    UnsupportedFormat {
        path: PathBuf,
        line: usize,
        signal: usize,
        format: String,
    },
    /// A `.dat` file is shorter (truncated) or longer than the header's sample count implies.
    #[error(
        "{}: {message}: expected {expected} bytes, found {found} (header {}, line {line})",
        path.display(),
        header.display()
    )]
    DatLength {
        path: PathBuf,
        header: PathBuf,
        line: usize,
        expected: u64,
        found: u64,
        message: String,
    },
    /// The samples of a signal do not add up to the header's checksum.
    #[error(
        "{}: signal {signal} ({description:?}): the samples sum to checksum {computed}, but the \
         header ({}, line {line}) says {expected}",
        path.display(),
        header.display()
    )]
    Checksum {
        path: PathBuf,
        header: PathBuf,
        line: usize,
        signal: usize,
        description: String,
        expected: i16,
        computed: i16,
    },
    /// A `.atr` file is malformed.
    #[error("{}, byte {offset}: {message}", path.display())]
    Annotation {
        path: PathBuf,
        offset: usize,
        message: String,
    },
    /// A record cannot be turned into beats (no signal, a constant lead, invalid samples).
    #[error("record {record}: {message}")]
    Extraction { record: String, message: String },
    /// A caller-supplied argument is unusable (e.g. a record name with a path separator).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The extracted beats do not form a valid [`Dataset`].
    #[error(transparent)]
    Data(#[from] DataError),
}

/// A parsed `.hea` header of a single-segment record.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Record name from the record line (must equal the name the record was opened by).
    pub record_name: String,
    /// Samples per second per signal.
    pub sampling_frequency: f64,
    /// Samples per signal, if the header gives them (`None` when absent or 0; the reader then
    /// derives the count from the `.dat` size).
    pub num_samples: Option<u64>,
    /// Base time field, verbatim, if present.
    pub base_time: Option<String>,
    /// Base date field, verbatim, if present.
    pub base_date: Option<String>,
    /// One entry per signal, in header order.
    pub signals: Vec<SignalSpec>,
    /// The `#` comment lines, without the `#` and surrounding whitespace.
    pub comments: Vec<String>,
    /// Line number (1-based) of the record line.
    pub record_line: usize,
}

impl Header {
    /// Number of signals.
    pub fn num_signals(&self) -> usize {
        self.signals.len()
    }
}

/// One signal line of a header.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalSpec {
    /// File holding the samples, relative to the record's directory.
    pub file_name: String,
    /// WFDB storage format (always 212 once parsed).
    pub format: u16,
    /// Bytes to skip at the start of the file (`212+offset`), 0 if none.
    pub byte_offset: u64,
    /// ADC units per physical unit (200 if the header gives none or 0).
    pub gain: f64,
    /// Digital value of physical 0 (the ADC zero if the header gives none).
    pub baseline: i32,
    /// Physical units (`mV` if the header gives none).
    pub units: String,
    /// ADC resolution in bits (12 if the header gives none or 0).
    pub adc_resolution: u32,
    /// Digital value of the ADC's zero input (0 if absent).
    pub adc_zero: i32,
    /// Value of the first sample (the ADC zero if absent).
    pub initial_value: i32,
    /// 16-bit signed sum of all samples, if the header gives it.
    pub checksum: Option<i16>,
    /// Block size in bytes (0 if absent).
    pub block_size: u32,
    /// Signal description (e.g. `MLII`), possibly empty.
    pub description: String,
    /// Line number (1-based) of this signal line in the header.
    pub line: usize,
}

/// A record's header and its digital samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The parsed header.
    pub header: Header,
    /// Digital samples (ADC units), one vector per signal in header order.
    ///
    /// # Shapes
    /// `[num_signals][num_samples]`: every inner vector has [`Record::num_samples`] entries.
    pub signals: Vec<Vec<i16>>,
    num_samples: usize,
}

impl Record {
    /// A record from a header and its digital samples (one vector per header signal, all of
    /// the same length, the header's sample count if it gives one).
    ///
    /// # Shapes
    /// `signals`: `[num_signals][num_samples]`.
    pub fn from_parts(header: Header, signals: Vec<Vec<i16>>) -> Result<Self, WfdbError> {
        if signals.len() != header.signals.len() {
            return Err(WfdbError::InvalidArgument(format!(
                "{} sample vectors for {} signals",
                signals.len(),
                header.signals.len()
            )));
        }
        let num_samples = signals.first().map_or(0, Vec::len);
        if signals.iter().any(|s| s.len() != num_samples)
            || header.num_samples.is_some_and(|n| n != num_samples as u64)
        {
            return Err(WfdbError::InvalidArgument(format!(
                "signals of {:?} samples for a header of {:?}",
                signals.iter().map(Vec::len).collect::<Vec<_>>(),
                header.num_samples
            )));
        }
        Ok(Self {
            header,
            signals,
            num_samples,
        })
    }

    /// The record's name.
    pub fn name(&self) -> &str {
        &self.header.record_name
    }

    /// Samples per signal.
    pub fn num_samples(&self) -> usize {
        self.num_samples
    }

    /// Signal `signal` in physical units, `(digital - baseline) / gain` (mV for MIT-BIH), or
    /// `None` if there is no such signal. Invalid samples (−2048) are returned as NaN.
    ///
    /// # Shapes
    /// `[num_samples]`.
    pub fn physical(&self, signal: usize) -> Option<Vec<f64>> {
        let spec = self.header.signals.get(signal)?;
        let digital = self.signals.get(signal)?;
        Some(
            digital
                .iter()
                .map(|&d| {
                    if d == FORMAT_212_INVALID {
                        f64::NAN
                    } else {
                        to_physical(d, spec)
                    }
                })
                .collect(),
        )
    }
}

pub(crate) fn to_physical(digital: i16, spec: &SignalSpec) -> f64 {
    (f64::from(digital) - f64::from(spec.baseline)) / spec.gain
}

/// One annotation of an annotation file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotation {
    /// Sample index (per signal, from the start of the record) the annotation refers to.
    pub sample: u64,
    /// WFDB annotation code (0..=49).
    pub code: u8,
    /// Symbol of the code (see [`annotation_symbol`]); empty for codes without one.
    pub symbol: &'static str,
    /// `subtyp` field (0 unless a SUB pseudo-annotation set it).
    pub subtype: u16,
    /// `chan` field.
    pub chan: u16,
    /// `num` field.
    pub num: u16,
    /// Auxiliary text (e.g. `(N` for a rhythm change), trailing NULs removed, if any.
    pub aux: Option<String>,
}

/// Where an extracted beat came from: the record and the annotated R-peak sample.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BeatSource {
    /// Record name.
    pub record: String,
    /// Sample index of the R peak (360 Hz for MIT-BIH).
    pub sample: u64,
}

/// The symbol of a WFDB annotation code (`ecgcodes.h` / `wfdb-python` mnemonics), or `""` for
/// codes that have none (0, 15, 17, 42..=49 and anything above).
pub fn annotation_symbol(code: u8) -> &'static str {
    match code {
        1 => "N",
        2 => "L",
        3 => "R",
        4 => "a",
        5 => "V",
        6 => "F",
        7 => "J",
        8 => "A",
        9 => "S",
        10 => "E",
        11 => "j",
        12 => "/",
        13 => "Q",
        14 => "~",
        16 => "|",
        18 => "s",
        19 => "T",
        20 => "*",
        21 => "D",
        22 => "\"",
        23 => "=",
        24 => "p",
        25 => "B",
        26 => "^",
        27 => "t",
        28 => "+",
        29 => "u",
        30 => "?",
        31 => "!",
        32 => "[",
        33 => "]",
        34 => "e",
        35 => "n",
        36 => "@",
        37 => "x",
        38 => "f",
        39 => "(",
        40 => ")",
        41 => "r",
        _ => "",
    }
}

// ---------------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------------

/// Reads and parses a `.hea` file; see [`parse_header`]. Bytes that are not UTF-8 are replaced
/// (they can only matter in descriptions and comments; elsewhere they make a field invalid).
pub fn read_header(path: &Path) -> Result<Header, WfdbError> {
    let bytes = read_file(path)?;
    parse_header(path, &String::from_utf8_lossy(&bytes))
}

/// Parses the text of a `.hea` file (format in the [module docs](self)); `path` is used in
/// errors only.
pub fn parse_header(path: &Path, text: &str) -> Result<Header, WfdbError> {
    let header_error = |line: usize, message: String| WfdbError::Header {
        path: path.to_owned(),
        line,
        message,
    };
    let mut record: Option<RecordLine> = None;
    let mut signals: Vec<SignalSpec> = Vec::new();
    let mut comments = Vec::new();
    let mut lines_seen = 0;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        lines_seen = line;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(comment) = trimmed.strip_prefix('#') {
            comments.push(comment.trim().to_owned());
            continue;
        }
        match &record {
            None => {
                record = Some(parse_record_line(trimmed, line).map_err(|m| header_error(line, m))?);
            }
            Some(r) if signals.len() < r.num_signals => {
                let spec = parse_signal_line(path, trimmed, line, signals.len())?;
                if let Some(other) = signals.iter().find(|s| s.file_name == spec.file_name)
                    && (other.format != spec.format || other.byte_offset != spec.byte_offset)
                {
                    return Err(header_error(
                        line,
                        format!(
                            "signals stored in the same file {:?} must have the same format and \
                             byte offset (as on line {})",
                            spec.file_name, other.line
                        ),
                    ));
                }
                signals.push(spec);
            }
            Some(r) => {
                return Err(header_error(
                    line,
                    format!(
                        "unexpected line after the {} signal line(s): {}",
                        r.num_signals,
                        excerpt(trimmed)
                    ),
                ));
            }
        }
    }
    let end = lines_seen + 1;
    let Some(record) = record else {
        return Err(header_error(
            end,
            "end of the header before the record line".to_owned(),
        ));
    };
    if signals.len() != record.num_signals {
        return Err(header_error(
            end,
            format!(
                "end of the header after {} signal line(s); the record line announces {}",
                signals.len(),
                record.num_signals
            ),
        ));
    }
    Ok(Header {
        record_name: record.name,
        sampling_frequency: record.sampling_frequency,
        num_samples: record.num_samples.filter(|&n| n > 0),
        base_time: record.base_time,
        base_date: record.base_date,
        signals,
        comments,
        record_line: record.line,
    })
}

struct RecordLine {
    name: String,
    num_signals: usize,
    sampling_frequency: f64,
    num_samples: Option<u64>,
    base_time: Option<String>,
    base_date: Option<String>,
    line: usize,
}

/// At most this many characters of offending input are quoted in an error.
fn excerpt(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        format!("{text:?}")
    } else {
        format!("{:?}...", text.chars().take(MAX).collect::<String>())
    }
}

fn parse_record_line(text: &str, line: usize) -> Result<RecordLine, String> {
    let mut fields = text.split_whitespace();
    let name = fields.next().unwrap_or_default();
    if name.contains('/') {
        return Err(format!(
            "multi-segment records ({}) are not supported",
            excerpt(name)
        ));
    }
    let num_signals = match fields.next() {
        None => return Err("record line: missing the number of signals".to_owned()),
        Some(field) => field.parse::<usize>().map_err(|_| {
            format!(
                "record line: number of signals: expected a non-negative integer, found {}",
                excerpt(field)
            )
        })?,
    };
    let sampling_frequency = match fields.next() {
        None => DEFAULT_FREQUENCY,
        Some(field) => parse_frequency(field)?,
    };
    let num_samples = match fields.next() {
        None => None,
        Some(field) => Some(field.parse::<u64>().map_err(|_| {
            format!(
                "record line: number of samples: expected a non-negative integer, found {}",
                excerpt(field)
            )
        })?),
    };
    let base_time = fields.next().map(str::to_owned);
    let base_date = fields.next().map(str::to_owned);
    if let Some(extra) = fields.next() {
        return Err(format!(
            "record line: unexpected field {} after the base date",
            excerpt(extra)
        ));
    }
    Ok(RecordLine {
        name: name.to_owned(),
        num_signals,
        sampling_frequency,
        num_samples,
        base_time,
        base_date,
        line,
    })
}

fn parse_positive(text: &str, what: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!(
            "record line: {what}: expected a positive number, found {}",
            excerpt(text)
        )),
    }
}

/// `fs[/counterfreq[(base)]]`; returns `fs`.
fn parse_frequency(field: &str) -> Result<f64, String> {
    let (fs, counter) = match field.split_once('/') {
        Some((fs, counter)) => (fs, Some(counter)),
        None => (field, None),
    };
    let fs = parse_positive(fs, "sampling frequency")?;
    if let Some(counter) = counter {
        let (frequency, base) = match counter.split_once('(') {
            Some((frequency, rest)) => {
                let Some(base) = rest.strip_suffix(')') else {
                    return Err(format!(
                        "record line: counter frequency: missing ')' in {}",
                        excerpt(field)
                    ));
                };
                (frequency, Some(base))
            }
            None => (counter, None),
        };
        parse_positive(frequency, "counter frequency")?;
        if let Some(base) = base
            && !base.parse::<f64>().is_ok_and(f64::is_finite)
        {
            return Err(format!(
                "record line: base counter value: expected a number, found {}",
                excerpt(base)
            ));
        }
    }
    Ok(fs)
}

/// Splits off up to `n` whitespace-separated fields; returns them and the trimmed rest.
fn split_fields(text: &str, n: usize) -> (Vec<&str>, &str) {
    let mut fields = Vec::with_capacity(n);
    let mut rest = text.trim_start();
    while fields.len() < n && !rest.is_empty() {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        fields.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    (fields, rest.trim_end())
}

fn parse_signal_line(
    path: &Path,
    text: &str,
    line: usize,
    signal: usize,
) -> Result<SignalSpec, WfdbError> {
    let err = |message: String| WfdbError::Header {
        path: path.to_owned(),
        line,
        message: format!("signal {signal}: {message}"),
    };
    let (fields, description) = split_fields(text, 8);
    let file_name = fields.first().copied().unwrap_or_default();
    check_file_name(file_name).map_err(&err)?;
    let Some(&format_field) = fields.get(1) else {
        return Err(err("missing the storage format".to_owned()));
    };
    let digits = format_field.len()
        - format_field
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    if digits == 0 {
        return Err(err(format!(
            "storage format: expected a number such as 212, found {}",
            excerpt(format_field)
        )));
    }
    let (format_number, modifiers) = format_field.split_at(digits);
    if format_number.trim_start_matches('0') != "212" {
        return Err(WfdbError::UnsupportedFormat {
            path: path.to_owned(),
            line,
            signal,
            format: format_number.to_owned(),
        });
    }
    let byte_offset = parse_format_modifiers(modifiers).map_err(&err)?;

    let (gain, baseline, units) = match fields.get(2) {
        None => (DEFAULT_GAIN, None, "mV".to_owned()),
        Some(field) => parse_gain(field).map_err(&err)?,
    };
    let adc_resolution = match fields.get(3) {
        None => 0,
        Some(field) => parse_int::<u32>(field, "ADC resolution").map_err(&err)?,
    };
    let adc_zero = match fields.get(4) {
        None => 0,
        Some(field) => parse_int::<i32>(field, "ADC zero").map_err(&err)?,
    };
    let initial_value = match fields.get(5) {
        None => adc_zero,
        Some(field) => parse_int::<i32>(field, "initial value").map_err(&err)?,
    };
    let checksum = match fields.get(6) {
        None => None,
        Some(field) => {
            let value = parse_int::<i32>(field, "checksum").map_err(&err)?;
            if !(i32::from(i16::MIN)..=i32::from(u16::MAX)).contains(&value) {
                return Err(err(format!(
                    "checksum {value} is not a 16-bit value (-32768..=65535)"
                )));
            }
            // Written signed by WFDB; an unsigned spelling denotes the same 16 bits.
            Some(value as u16 as i16)
        }
    };
    let block_size = match fields.get(7) {
        None => 0,
        Some(field) => parse_int::<u32>(field, "block size").map_err(&err)?,
    };
    Ok(SignalSpec {
        file_name: file_name.to_owned(),
        format: 212,
        byte_offset,
        gain,
        baseline: baseline.unwrap_or(adc_zero),
        units,
        adc_resolution: if adc_resolution == 0 {
            DEFAULT_RESOLUTION_212
        } else {
            adc_resolution
        },
        adc_zero,
        initial_value,
        checksum,
        block_size,
        description: description.to_owned(),
        line,
    })
}

fn check_file_name(file_name: &str) -> Result<(), String> {
    if file_name == "-" {
        return Err("signals on standard input (\"-\") are not supported".to_owned());
    }
    let path = Path::new(file_name);
    if path.is_absolute() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "signal file {} must be a relative path inside the record's directory",
            excerpt(file_name)
        ));
    }
    Ok(())
}

/// The `[xspf][:skew][+offset]` after the format number; returns the byte offset.
fn parse_format_modifiers(mut rest: &str) -> Result<u64, String> {
    let take_number = |text: &str, what: &str| -> Result<(u64, usize), String> {
        let len = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        match text[..len].parse::<u64>() {
            Ok(value) => Ok((value, len)),
            Err(_) => Err(format!(
                "storage format: {what}: expected a non-negative integer in {}",
                excerpt(text)
            )),
        }
    };
    if let Some(after) = rest.strip_prefix('x') {
        let (samples_per_frame, len) = take_number(after, "samples per frame")?;
        if samples_per_frame != 1 {
            return Err(format!(
                "{samples_per_frame} samples per frame are not supported (only 1)"
            ));
        }
        rest = &after[len..];
    }
    if let Some(after) = rest.strip_prefix(':') {
        let (skew, len) = take_number(after, "skew")?;
        if skew != 0 {
            return Err(format!("a skew of {skew} samples is not supported"));
        }
        rest = &after[len..];
    }
    let mut offset = 0;
    if let Some(after) = rest.strip_prefix('+') {
        let (value, len) = take_number(after, "byte offset")?;
        offset = value;
        rest = &after[len..];
    }
    if !rest.is_empty() {
        return Err(format!(
            "storage format: unexpected {} after the format number",
            excerpt(rest)
        ));
    }
    Ok(offset)
}

/// `gain[(baseline)][/units]`; a gain of 0 means the default.
fn parse_gain(field: &str) -> Result<(f64, Option<i32>, String), String> {
    let (gain_part, units) = match field.split_once('/') {
        Some((_, "")) => return Err(format!("gain: empty units in {}", excerpt(field))),
        Some((gain, units)) => (gain, units.to_owned()),
        None => (field, "mV".to_owned()),
    };
    let (gain_text, baseline) = match gain_part.split_once('(') {
        Some((gain, rest)) => {
            let Some(baseline) = rest.strip_suffix(')') else {
                return Err(format!("gain: missing ')' in {}", excerpt(field)));
            };
            (gain, Some(parse_int::<i32>(baseline, "baseline")?))
        }
        None => (gain_part, None),
    };
    let gain = match gain_text.parse::<f64>() {
        Ok(gain) if gain.is_finite() => gain,
        _ => {
            return Err(format!(
                "gain: expected a number (adu per physical unit), found {}",
                excerpt(gain_text)
            ));
        }
    };
    let gain = if gain == 0.0 { DEFAULT_GAIN } else { gain };
    Ok((gain, baseline, units))
}

fn parse_int<T: std::str::FromStr>(field: &str, what: &str) -> Result<T, String> {
    field.parse::<T>().map_err(|_| {
        format!(
            "{what}: expected an integer in range for {}, found {}",
            std::any::type_name::<T>(),
            excerpt(field)
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

fn read_file(path: &Path) -> Result<Vec<u8>, WfdbError> {
    std::fs::read(path).map_err(|source| WfdbError::Io {
        path: path.to_owned(),
        source,
    })
}

fn check_record_name(name: &str) -> Result<(), WfdbError> {
    let plain = !name.is_empty()
        && !name.contains(['/', '\\'])
        && name != "."
        && name != ".."
        && !name.chars().any(char::is_whitespace);
    if plain {
        Ok(())
    } else {
        Err(WfdbError::InvalidArgument(format!(
            "record name {name:?} is not a plain name such as \"100\""
        )))
    }
}

/// Reads record `name` from `dir`: `dir/name.hea` and the signal files it names (format 212),
/// checking the sample count and every signal's checksum against the header.
///
/// # Shapes
/// The returned [`Record::signals`] is `[num_signals][num_samples]` (digital ADC units).
pub fn read_record(dir: &Path, name: &str) -> Result<Record, WfdbError> {
    check_record_name(name)?;
    let header_path = dir.join(format!("{name}.hea"));
    let header = read_header(&header_path)?;
    if header.record_name != name {
        return Err(WfdbError::Header {
            path: header_path,
            line: header.record_line,
            message: format!(
                "the record line names record {}, not {name:?}",
                excerpt(&header.record_name)
            ),
        });
    }
    let (signals, num_samples) = read_signals(dir, &header_path, &header)?;
    Ok(Record {
        header,
        signals,
        num_samples,
    })
}

/// Packed size of `total` format-212 samples.
fn packed_212_len(total: u64) -> u128 {
    u128::from(total / 2) * 3 + if total % 2 == 1 { 2 } else { 0 }
}

fn saturating_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

fn read_signals(
    dir: &Path,
    header_path: &Path,
    header: &Header,
) -> Result<(Vec<Vec<i16>>, usize), WfdbError> {
    let mut signals: Vec<Vec<i16>> = vec![Vec::new(); header.signals.len()];
    let mut num_samples = header.num_samples;
    // Files in order of first appearance, each with the signals it holds (frame order).
    let mut files: Vec<(&str, Vec<usize>)> = Vec::new();
    for (index, spec) in header.signals.iter().enumerate() {
        match files.iter_mut().find(|(name, _)| *name == spec.file_name) {
            Some((_, members)) => members.push(index),
            None => files.push((&spec.file_name, vec![index])),
        }
    }
    for (file_name, members) in files {
        let first = &header.signals[members[0]];
        let path = dir.join(file_name);
        let bytes = read_file(&path)?;
        let length_error = |expected: u64, found: u64, message: String| WfdbError::DatLength {
            path: path.clone(),
            header: header_path.to_owned(),
            line: first.line,
            expected,
            found,
            message,
        };
        let found = bytes.len() as u64;
        let width = members.len() as u64;
        let payload = match usize::try_from(first.byte_offset)
            .ok()
            .and_then(|offset| bytes.get(offset..))
        {
            Some(payload) => payload,
            None => {
                return Err(length_error(
                    first.byte_offset,
                    found,
                    format!(
                        "shorter than its byte offset {} (header +offset)",
                        first.byte_offset
                    ),
                ));
            }
        };
        let payload_len = payload.len() as u64;
        let frames = match num_samples {
            Some(frames) => frames,
            None => {
                let total = payload_len / 3 * 2 + u64::from(payload_len % 3 == 2);
                total / width
            }
        };
        let Some(total) = frames.checked_mul(width) else {
            return Err(length_error(
                u64::MAX,
                found,
                format!("{frames} samples of {width} signal(s) cannot be stored"),
            ));
        };
        let expected = packed_212_len(total);
        let allowed_padding = u128::from(total % 2 == 1);
        let expected_file = saturating_u64(expected + u128::from(first.byte_offset));
        let payload_len = u128::from(payload_len);
        let describe = |what: &str| {
            format!(
                "{what}: {frames} samples x {width} signal(s) in format 212 take {expected} bytes \
                 after the {} byte offset",
                first.byte_offset
            )
        };
        if payload_len < expected {
            return Err(length_error(expected_file, found, describe("truncated")));
        }
        if payload_len > expected + allowed_padding {
            return Err(length_error(
                expected_file,
                found,
                describe("longer than the sample count implies"),
            ));
        }
        num_samples = Some(frames);
        let Ok(total) = usize::try_from(total) else {
            return Err(length_error(
                expected_file,
                found,
                describe("too many samples"),
            ));
        };
        let stream = decode_212(payload, total);
        let frames_usize = total / members.len();
        for (position, &signal) in members.iter().enumerate() {
            let mut samples = Vec::with_capacity(frames_usize);
            samples.extend(stream.iter().skip(position).step_by(members.len()).copied());
            signals[signal] = samples;
        }
    }
    for (index, (spec, samples)) in header.signals.iter().zip(&signals).enumerate() {
        let computed = samples
            .iter()
            .fold(0_i16, |sum, &sample| sum.wrapping_add(sample));
        if let Some(expected) = spec.checksum
            && expected != computed
        {
            return Err(WfdbError::Checksum {
                path: dir.join(&spec.file_name),
                header: header_path.to_owned(),
                line: spec.line,
                signal: index,
                description: spec.description.clone(),
                expected,
                computed,
            });
        }
    }
    let num_samples = num_samples.unwrap_or(0);
    let num_samples = usize::try_from(num_samples).map_err(|_| WfdbError::Header {
        path: header_path.to_owned(),
        line: header.record_line,
        message: format!("{num_samples} samples per signal do not fit in memory"),
    })?;
    Ok((signals, num_samples))
}

/// Sign-extends a 12-bit two's-complement value.
fn sign_extend_12(value: u16) -> i16 {
    ((value << 4) as i16) >> 4
}

/// Decodes the first `total` samples of a format-212 stream.
///
/// The caller guarantees `bytes.len() >= packed_212_len(total)`.
fn decode_212(bytes: &[u8], total: usize) -> Vec<i16> {
    let mut out = Vec::with_capacity(total);
    let pairs = total / 2;
    for group in bytes[..pairs * 3].chunks_exact(3) {
        let (b0, b1, b2) = (
            u16::from(group[0]),
            u16::from(group[1]),
            u16::from(group[2]),
        );
        out.push(sign_extend_12(b0 | (b1 & 0x0f) << 8));
        out.push(sign_extend_12(b2 | (b1 & 0xf0) << 4));
    }
    if total % 2 == 1 {
        let (b0, b1) = (u16::from(bytes[pairs * 3]), u16::from(bytes[pairs * 3 + 1]));
        out.push(sign_extend_12(b0 | (b1 & 0x0f) << 8));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Annotations
// ---------------------------------------------------------------------------------------------

/// Reads an annotation file in MIT format; see [`parse_annotations`].
pub fn read_annotations(path: &Path) -> Result<Vec<Annotation>, WfdbError> {
    let bytes = read_file(path)?;
    parse_annotations(path, &bytes)
}

/// Parses MIT-format annotations (format in the [module docs](self)); `path` is used in errors
/// only. Stops at the end marker (anything after it is ignored); a file that simply ends at a
/// word boundary without one is accepted.
///
/// Errors: a file ending inside a word, a SKIP or an AUX string; a code 50..=58 (not valid in
/// annotation files); a NUM/SUB/CHN/AUX before the first annotation; a SKIP that moves an
/// annotation before sample 0.
pub fn parse_annotations(path: &Path, bytes: &[u8]) -> Result<Vec<Annotation>, WfdbError> {
    let err = |offset: usize, message: String| WfdbError::Annotation {
        path: path.to_owned(),
        offset,
        message,
    };
    let word_at = |offset: usize| -> Option<u16> {
        let pair = bytes.get(offset..offset.checked_add(2)?)?;
        Some(u16::from_le_bytes([pair[0], pair[1]]))
    };
    let mut annotations: Vec<Annotation> = Vec::new();
    let mut time: i64 = 0;
    let mut skip: i64 = 0;
    let (mut chan, mut num) = (0_u16, 0_u16);
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(word) = word_at(pos) else {
            return Err(err(
                pos,
                "the file ends in the middle of a 16-bit word".to_owned(),
            ));
        };
        let code = (word >> 10) as u8;
        let field = word & 0x3ff;
        match code {
            0 if field == 0 => return Ok(annotations),
            CODE_SKIP => {
                let (Some(high), Some(low)) = (word_at(pos + 2), word_at(pos + 4)) else {
                    return Err(err(
                        pos,
                        "the file ends inside the 4-byte interval of a SKIP".to_owned(),
                    ));
                };
                let interval = ((u32::from(high) << 16) | u32::from(low)) as i32;
                let Some(total) = skip.checked_add(i64::from(interval)) else {
                    return Err(err(pos, "SKIP intervals overflow".to_owned()));
                };
                skip = total;
                pos += 6;
            }
            CODE_NUM | CODE_SUB | CODE_CHN | CODE_AUX => {
                let Some(last) = annotations.last_mut() else {
                    let name = ["NUM", "SUB", "CHN", "AUX"][usize::from(code - CODE_NUM)];
                    return Err(err(
                        pos,
                        format!(
                            "{name} pseudo-annotation (code {code}) before the first annotation"
                        ),
                    ));
                };
                match code {
                    CODE_NUM => {
                        last.num = field;
                        num = field;
                    }
                    CODE_SUB => last.subtype = field,
                    CODE_CHN => {
                        last.chan = field;
                        chan = field;
                    }
                    _ => {
                        let len = usize::from(field);
                        let padded = len + (len & 1);
                        let Some(text) = bytes.get(pos + 2..pos + 2 + padded) else {
                            return Err(err(
                                pos,
                                format!(
                                    "the file ends inside an AUX string of {len} bytes \
                                     ({padded} with padding)"
                                ),
                            ));
                        };
                        let text = &text[..len];
                        let text_end = text.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                        last.aux = Some(String::from_utf8_lossy(&text[..text_end]).into_owned());
                        pos += padded;
                    }
                }
                pos += 2;
            }
            50..=58 => {
                return Err(err(
                    pos,
                    format!(
                        "code {code} is not valid in an annotation file (annotation codes are \
                         0..=49, pseudo-annotations 59..=63)"
                    ),
                ));
            }
            _ => {
                let Some(next) = time
                    .checked_add(skip)
                    .and_then(|t| t.checked_add(i64::from(field)))
                else {
                    return Err(err(pos, "annotation time overflows".to_owned()));
                };
                time = next;
                skip = 0;
                let Ok(sample) = u64::try_from(time) else {
                    return Err(err(
                        pos,
                        format!("annotation at negative sample {time} (a SKIP went back too far)"),
                    ));
                };
                annotations.push(Annotation {
                    sample,
                    code,
                    symbol: annotation_symbol(code),
                    subtype: 0,
                    chan,
                    num,
                    aux: None,
                });
                pos += 2;
            }
        }
    }
    Ok(annotations)
}

// ---------------------------------------------------------------------------------------------
// Beat extraction
// ---------------------------------------------------------------------------------------------

/// Every N/L/R/A/V beat of `record` cut, resampled and denoised as the papers did (see the
/// [module docs](self)), labelled by [`CLASS_SYMBOLS`] position.
///
/// # Shapes
/// A dataset of `[beats, 128]` samples (`beat_len` [`BEAT_LEN`], [`NUM_CLASSES`] classes),
/// beats in annotation order.
pub fn extract_beats(record: &Record, annotations: &[Annotation]) -> Result<Dataset, WfdbError> {
    Ok(extract_beats_with_peaks(record, annotations)?.0)
}

/// [`extract_beats`], also returning each beat's R-peak sample (the annotation's `sample`).
///
/// # Shapes
/// The dataset is `[beats, 128]`; the peaks are `[beats]`.
pub fn extract_beats_with_peaks(
    record: &Record,
    annotations: &[Annotation],
) -> Result<(Dataset, Vec<u64>), WfdbError> {
    preprocess::extract(
        record,
        annotations,
        &Preprocessing::papers(),
        LabelSet::Papers,
    )
}

/// Reads records `names` from `dir` (`name.hea`, its `.dat` files and `name.atr`) and
/// concatenates their beats ([`extract_beats`]) in the order given.
///
/// # Shapes
/// A dataset of `[beats, 128]` samples, 5 classes.
pub fn load_records<S: AsRef<str>>(dir: &Path, names: &[S]) -> Result<Dataset, WfdbError> {
    load_records_with(dir, names, &Preprocessing::papers(), LabelSet::Papers)
}

/// [`load_records`], also returning where each beat came from.
///
/// # Shapes
/// The dataset is `[beats, 128]`; the sources are `[beats]`.
pub fn load_records_with_sources<S: AsRef<str>>(
    dir: &Path,
    names: &[S],
) -> Result<(Dataset, Vec<BeatSource>), WfdbError> {
    load_records_with_peaks(dir, names, &Preprocessing::papers(), LabelSet::Papers)
}

/// Reads records `names` from `dir` and cuts their beats as `preprocessing` says, labelled
/// from `labels` ([`preprocess::extract`]): one patient per record (named after it), beats in
/// the order given, each record's in annotation order.
///
/// # Shapes
/// A dataset of `[beats, preprocessing.row_len()]` rows.
pub fn load_records_with<S: AsRef<str>>(
    dir: &Path,
    names: &[S],
    preprocessing: &Preprocessing,
    labels: LabelSet,
) -> Result<Dataset, WfdbError> {
    Ok(load_records_with_peaks(dir, names, preprocessing, labels)?.0)
}

/// [`load_records_with`], also returning where each beat came from.
///
/// # Shapes
/// The dataset is `[beats, preprocessing.row_len()]`; the sources are `[beats]`.
pub fn load_records_with_peaks<S: AsRef<str>>(
    dir: &Path,
    names: &[S],
    preprocessing: &Preprocessing,
    labels: LabelSet,
) -> Result<(Dataset, Vec<BeatSource>), WfdbError> {
    preprocessing
        .validate()
        .map_err(|e| WfdbError::InvalidArgument(format!("preprocessing.{e}")))?;
    if names.is_empty() {
        return Err(WfdbError::InvalidArgument("no records named".to_owned()));
    }
    let mut parts = Vec::with_capacity(names.len());
    let mut sources = Vec::new();
    for name in names {
        let name = name.as_ref();
        let record = read_record(dir, name)?;
        let annotations = read_annotations(&dir.join(format!("{name}.atr")))?;
        let (beats, peaks) = preprocess::extract(&record, &annotations, preprocessing, labels)?;
        sources.extend(peaks.into_iter().map(|sample| BeatSource {
            record: name.to_owned(),
            sample,
        }));
        parts.push(beats);
    }
    Ok((Dataset::concat(&parts)?, sources))
}

/// `scipy.signal.resample(x, num)` for real `x` of a fixed length (no window): Fourier
/// resampling through a direct DFT with precomputed twiddles (the lengths are small).
pub(crate) struct Resampler {
    input_len: usize,
    output_len: usize,
    /// `cos`/`sin` of `2 pi r / input_len`, `r < input_len`.
    input_twiddles: Vec<(f64, f64)>,
    /// `cos`/`sin` of `2 pi r / output_len`, `r < output_len`.
    output_twiddles: Vec<(f64, f64)>,
}

impl Resampler {
    pub(crate) fn new(input_len: usize, output_len: usize) -> Self {
        let twiddles = |n: usize| {
            (0..n)
                .map(|r| {
                    let angle = 2.0 * std::f64::consts::PI * r as f64 / n as f64;
                    (angle.cos(), angle.sin())
                })
                .collect()
        };
        Self {
            input_len,
            output_len,
            input_twiddles: twiddles(input_len),
            output_twiddles: twiddles(output_len),
        }
    }

    pub(crate) fn apply(&self, x: &[f64]) -> Vec<f64> {
        debug_assert_eq!(x.len(), self.input_len);
        let (n, num) = (self.input_len, self.output_len);
        let m = n.min(num);
        let bins = m / 2 + 1;
        // rfft(x)[:bins]
        let mut spectrum: Vec<(f64, f64)> = (0..bins)
            .map(|k| {
                let (mut re, mut im) = (0.0, 0.0);
                for (t, &value) in x.iter().enumerate() {
                    let (cos, sin) = self.input_twiddles[(k * t) % n];
                    re += value * cos;
                    im -= value * sin;
                }
                (re, im)
            })
            .collect();
        // The unpaired bin at m/2: united with its mirror when down-sampling.
        if m % 2 == 0 && num != n {
            let factor = if num < n { 2.0 } else { 0.5 };
            spectrum[m / 2].0 *= factor;
            spectrum[m / 2].1 *= factor;
        }
        let scale = n as f64 / num as f64;
        for bin in &mut spectrum {
            bin.0 /= scale;
            bin.1 /= scale;
        }
        // irfft(spectrum, num): bins past `bins` are zero; the Nyquist bin (2k == num) counts
        // once and only by its real part, as does bin 0.
        (0..num)
            .map(|t| {
                let mut sum = spectrum[0].0;
                for (k, &(re, im)) in spectrum.iter().enumerate().skip(1) {
                    if 2 * k == num {
                        sum += if t % 2 == 0 { re } else { -re };
                    } else {
                        let (cos, sin) = self.output_twiddles[(k * t) % num];
                        sum += 2.0 * (re * cos - im * sin);
                    }
                }
                sum / num as f64
            })
            .collect()
    }
}

/// `pywt.Wavelet('bior4.4')` decomposition and reconstruction filters.
const BIOR44_DEC_LO: [f64; 10] = [
    0.0,
    0.03782845550726404,
    -0.023849465019556843,
    -0.11062440441843718,
    0.37740285561283066,
    0.8526986790088938,
    0.37740285561283066,
    -0.11062440441843718,
    -0.023849465019556843,
    0.03782845550726404,
];
const BIOR44_DEC_HI: [f64; 10] = [
    0.0,
    -0.06453888262869706,
    0.04068941760916406,
    0.41809227322161724,
    -0.7884856164055829,
    0.41809227322161724,
    0.04068941760916406,
    -0.06453888262869706,
    0.0,
    0.0,
];
const BIOR44_REC_LO: [f64; 10] = [
    0.0,
    -0.06453888262869706,
    -0.04068941760916406,
    0.41809227322161724,
    0.7884856164055829,
    0.41809227322161724,
    -0.04068941760916406,
    -0.06453888262869706,
    0.0,
    0.0,
];
const BIOR44_REC_HI: [f64; 10] = [
    0.0,
    -0.03782845550726404,
    -0.023849465019556843,
    0.11062440441843718,
    0.37740285561283066,
    -0.8526986790088938,
    0.37740285561283066,
    0.11062440441843718,
    -0.023849465019556843,
    -0.03782845550726404,
];
const FILTER_LEN: usize = BIOR44_DEC_LO.len();

/// `pywt.dwt_max_level(data_len, filter_len)`.
fn dwt_max_level(data_len: usize, filter_len: usize) -> usize {
    if filter_len <= 1 || data_len < filter_len - 1 {
        return 0;
    }
    (data_len as f64 / (filter_len - 1) as f64).log2().floor() as usize
}

/// Index into `0..n` of position `i` of the half-sample symmetric extension (pywt `symmetric`).
fn symmetric_index(mut i: isize, n: isize) -> usize {
    loop {
        if i < 0 {
            i = -i - 1;
        } else if i >= n {
            i = 2 * n - 1 - i;
        } else {
            return i as usize;
        }
    }
}

/// One level of `pywt.dwt(x, 'bior4.4', mode='symmetric')`: `(cA, cD)`, each of length
/// `(len + 9) / 2`.
fn dwt(x: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() as isize;
    let out_len = (x.len() + FILTER_LEN - 1) / 2;
    let mut approximation = Vec::with_capacity(out_len);
    let mut detail = Vec::with_capacity(out_len);
    for o in 0..out_len {
        let i = (2 * o + 1) as isize;
        let (mut a, mut d) = (0.0, 0.0);
        for j in 0..FILTER_LEN {
            let value = x[symmetric_index(i - j as isize, n)];
            a += BIOR44_DEC_LO[j] * value;
            d += BIOR44_DEC_HI[j] * value;
        }
        approximation.push(a);
        detail.push(d);
    }
    (approximation, detail)
}

/// The "valid" upsampling convolution of pywt's `idwt` for one coefficient array, added into
/// `out` (length `2 * len - 8`).
fn upsampling_convolution_valid(input: &[f64], filter: &[f64; FILTER_LEN], out: &mut [f64]) {
    let half = FILTER_LEN / 2;
    for (step, i) in (half - 1..input.len()).enumerate() {
        let (mut even, mut odd) = (0.0, 0.0);
        for j in 0..half {
            even += filter[2 * j] * input[i - j];
            odd += filter[2 * j + 1] * input[i - j];
        }
        out[2 * step] += even;
        out[2 * step + 1] += odd;
    }
}

/// `pywt.idwt(a, d, 'bior4.4', mode='symmetric')` for `a.len() == d.len()`.
fn idwt(approximation: &[f64], detail: &[f64]) -> Vec<f64> {
    let out_len = (2 * approximation.len() + 2).saturating_sub(FILTER_LEN);
    let mut out = vec![0.0; out_len];
    upsampling_convolution_valid(approximation, &BIOR44_REC_LO, &mut out);
    upsampling_convolution_valid(detail, &BIOR44_REC_HI, &mut out);
    out
}

/// `pywt.threshold(value, threshold, 'soft')`: `x * max(1 - threshold / |x|, 0)`.
fn soft_threshold(values: &mut [f64], threshold: f64) {
    for value in values {
        *value = if *value == 0.0 {
            0.0
        } else {
            *value * (1.0 - threshold / value.abs()).max(0.0)
        };
    }
}

/// The notebook's `denoise`: `wavedec` (bior4.4, default level), soft threshold
/// `0.005 * sqrt(2 * log2(len))` on every coefficient array, `waverec`.
pub(crate) fn denoise(x: &[f64]) -> Vec<f64> {
    let threshold = 0.005 * (2.0 * (x.len() as f64).log2()).sqrt();
    let level = dwt_max_level(x.len(), FILTER_LEN);
    let mut approximation = x.to_vec();
    let mut details = Vec::with_capacity(level);
    for _ in 0..level {
        let (a, d) = dwt(&approximation);
        details.push(d);
        approximation = a;
    }
    soft_threshold(&mut approximation, threshold);
    for detail in &mut details {
        soft_threshold(detail, threshold);
    }
    for detail in details.iter().rev() {
        if approximation.len() == detail.len() + 1 {
            approximation.pop();
        }
        approximation = idwt(&approximation, detail);
    }
    approximation
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const RAW_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/mitdb-raw");
    const BEAT_SET_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/mitbih");

    /// The raw records directory, or `None` (after saying so) when it is absent.
    fn raw_dir() -> Option<PathBuf> {
        let dir = PathBuf::from(RAW_DIR);
        if dir.join("100.hea").is_file() {
            Some(dir)
        } else {
            println!("skipping: ../shared/data/mitdb-raw not found");
            None
        }
    }

    /// A fresh, unique temporary directory (removed by [`TempDir`]'s `Drop`).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = std::env::temp_dir().join(format!(
                "medsplit-wfdb-{tag}-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
        }

        fn write(&self, name: &str, bytes: &[u8]) {
            std::fs::write(self.0.join(name), bytes).expect("write temp file");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Packs a sample stream in format 212 (odd counts end with a 2-byte group).
    fn encode_212(stream: &[i16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(stream.len() * 3 / 2 + 2);
        for pair in stream.chunks(2) {
            let a = (pair[0] as u16) & 0x0fff;
            out.push((a & 0xff) as u8);
            match pair.get(1) {
                Some(&b) => {
                    let b = (b as u16) & 0x0fff;
                    out.push(((a >> 8) | ((b >> 8) << 4)) as u8);
                    out.push((b & 0xff) as u8);
                }
                None => out.push((a >> 8) as u8),
            }
        }
        out
    }

    fn interleave(signals: &[&[i16]]) -> Vec<i16> {
        let frames = signals[0].len();
        (0..frames)
            .flat_map(|t| signals.iter().map(move |s| s[t]))
            .collect()
    }

    fn checksum(samples: &[i16]) -> i16 {
        samples.iter().fold(0_i16, |a, &s| a.wrapping_add(s))
    }

    /// Builds MIT-format annotation bytes.
    #[derive(Default)]
    struct AtrWriter {
        bytes: Vec<u8>,
        time: i64,
    }

    impl AtrWriter {
        fn word(&mut self, code: u8, field: u16) -> &mut Self {
            let word = (u16::from(code) << 10) | (field & 0x3ff);
            self.bytes.extend_from_slice(&word.to_le_bytes());
            self
        }

        fn skip(&mut self, interval: i32) -> &mut Self {
            self.word(CODE_SKIP, 0);
            let bits = interval as u32;
            self.bytes
                .extend_from_slice(&((bits >> 16) as u16).to_le_bytes());
            self.bytes
                .extend_from_slice(&((bits & 0xffff) as u16).to_le_bytes());
            self
        }

        fn ann(&mut self, sample: i64, code: u8) -> &mut Self {
            let diff = sample - self.time;
            if (0..=1023).contains(&diff) {
                self.word(code, diff as u16);
            } else {
                self.skip(diff as i32);
                self.word(code, 0);
            }
            self.time = sample;
            self
        }

        fn aux(&mut self, text: &[u8]) -> &mut Self {
            self.word(CODE_AUX, text.len() as u16);
            self.bytes.extend_from_slice(text);
            if text.len() % 2 == 1 {
                self.bytes.push(0);
            }
            self
        }

        fn end(&mut self) -> Vec<u8> {
            self.word(0, 0);
            std::mem::take(&mut self.bytes)
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

    // -----------------------------------------------------------------------------------------
    // The three real records against wfdb-python's reference values (mitdb-raw/README.md)
    // -----------------------------------------------------------------------------------------

    struct Reference {
        name: &'static str,
        descriptions: [&'static str; 2],
        first: [i16; 2],
        last_two: [[i16; 2]; 2],
        min: [i16; 2],
        max: [i16; 2],
        sum: [i64; 2],
        header_checksum: [i16; 2],
        first_annotations: [(u64, &'static str); 3],
        last_annotation: (u64, &'static str),
        total_annotations: usize,
        counts: &'static [(&'static str, usize)],
    }

    const REFERENCES: [Reference; 3] = [
        Reference {
            name: "100",
            descriptions: ["MLII", "V5"],
            first: [995, 1011],
            last_two: [[871, 768], [957, 1024]],
            min: [481, 531],
            max: [1311, 1269],
            sum: [625_781_133, 640_765_524],
            header_checksum: [-22131, 20052],
            first_annotations: [(18, "+"), (77, "N"), (370, "N")],
            last_annotation: (649_991, "N"),
            total_annotations: 2274,
            counts: &[("N", 2239), ("A", 33), ("V", 1), ("+", 1)],
        },
        Reference {
            name: "208",
            descriptions: ["MLII", "V1"],
            first: [1003, 1062],
            last_two: [[992, 1024], [1002, 1024]],
            min: [327, 512],
            max: [1754, 1598],
            sum: [644_095_882, 672_813_225],
            header_checksum: [8074, 20649],
            first_annotations: [(9, "+"), (46, "F"), (209, "V")],
            last_annotation: (649_935, "N"),
            total_annotations: 3040,
            counts: &[
                ("N", 1586),
                ("V", 992),
                ("F", 373),
                ("+", 53),
                ("~", 24),
                ("|", 8),
                ("Q", 2),
                ("S", 2),
            ],
        },
        Reference {
            name: "232",
            descriptions: ["MLII", "V1"],
            first: [975, 1066],
            last_two: [[1009, 1024], [1031, 1024]],
            min: [800, 754],
            max: [1264, 1346],
            sum: [645_919_364, 670_996_170],
            header_checksum: [-3452, -26934],
            first_annotations: [(76, "+"), (491, "R"), (737, "A")],
            last_annotation: (649_366, "A"),
            total_annotations: 1816,
            counts: &[("A", 1382), ("R", 397), ("~", 35), ("+", 1), ("j", 1)],
        },
    ];

    #[test]
    fn wfdb_real_records_match_wfdb_python_reference_values() {
        let Some(dir) = raw_dir() else { return };
        for reference in &REFERENCES {
            let name = reference.name;
            let record = read_record(&dir, name).expect("read record");
            let header = &record.header;
            assert_eq!(header.record_name, name);
            assert_eq!(header.num_signals(), 2, "{name}");
            assert_eq!(header.sampling_frequency, 360.0, "{name}");
            assert_eq!(header.num_samples, Some(650_000), "{name}");
            assert_eq!(record.num_samples(), 650_000, "{name}");
            assert!(!header.comments.is_empty(), "{name}: comments kept");
            for (ch, spec) in header.signals.iter().enumerate() {
                assert_eq!(spec.file_name, format!("{name}.dat"));
                assert_eq!(spec.format, 212);
                assert_eq!(spec.gain, 200.0);
                assert_eq!(spec.baseline, 1024);
                assert_eq!(spec.units, "mV");
                assert_eq!(spec.adc_resolution, 11);
                assert_eq!(spec.adc_zero, 1024);
                assert_eq!(spec.initial_value, i32::from(reference.first[ch]));
                assert_eq!(
                    spec.checksum,
                    Some(reference.header_checksum[ch]),
                    "{name} ch{ch}"
                );
                assert_eq!(spec.block_size, 0);
                assert_eq!(spec.description, reference.descriptions[ch]);
                assert_eq!(spec.line, ch + 2);

                let samples = &record.signals[ch];
                assert_eq!(samples.len(), 650_000);
                assert_eq!(
                    samples[..5],
                    [reference.first[ch]; 5],
                    "{name} ch{ch} first 5"
                );
                assert_eq!(
                    samples[samples.len() - 2..],
                    reference.last_two[ch],
                    "{name} ch{ch} last 2"
                );
                assert_eq!(
                    samples.iter().min(),
                    Some(&reference.min[ch]),
                    "{name} ch{ch}"
                );
                assert_eq!(
                    samples.iter().max(),
                    Some(&reference.max[ch]),
                    "{name} ch{ch}"
                );
                let sum: i64 = samples.iter().map(|&s| i64::from(s)).sum();
                assert_eq!(sum, reference.sum[ch], "{name} ch{ch} sum");
                assert_eq!(checksum(samples), reference.header_checksum[ch]);
            }
            let physical = record.physical(0).expect("lead 0");
            assert_eq!(
                physical[0],
                (f64::from(reference.first[0]) - 1024.0) / 200.0
            );
            if name == "100" {
                // README: record 100 sample 0 = -0.145 mV (MLII), -0.065 mV (V5).
                assert!((physical[0] + 0.145).abs() < 1e-12);
                let v5 = record.physical(1).expect("lead 1");
                assert!((v5[0] + 0.065).abs() < 1e-12);
            }

            let annotations =
                read_annotations(&dir.join(format!("{name}.atr"))).expect("read annotations");
            assert_eq!(annotations.len(), reference.total_annotations, "{name}");
            let got_first: Vec<(u64, &str)> = annotations[..3]
                .iter()
                .map(|a| (a.sample, a.symbol))
                .collect();
            assert_eq!(got_first, reference.first_annotations, "{name}");
            let last = annotations.last().expect("annotations");
            assert_eq!(
                (last.sample, last.symbol),
                reference.last_annotation,
                "{name}"
            );
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for a in &annotations {
                *counts.entry(a.symbol).or_default() += 1;
            }
            let expected: BTreeMap<&str, usize> = reference.counts.iter().copied().collect();
            assert_eq!(counts, expected, "{name} annotation counts");
            assert!(
                annotations.windows(2).all(|w| w[0].sample <= w[1].sample),
                "{name}: annotations in time order"
            );
            // Rhythm annotations carry their rhythm in the aux string.
            assert!(
                annotations
                    .iter()
                    .filter(|a| a.symbol == "+")
                    .all(|a| a.aux.as_deref().is_some_and(|s| s.starts_with('('))),
                "{name}: rhythm aux strings"
            );
            println!(
                "record {name}: 2 x {} samples, {} annotations {:?}: all reference values match",
                record.num_samples(),
                annotations.len(),
                counts
            );
        }
    }

    /// `(record, sample)` pairs of a `.src.u32` file.
    fn read_sources(path: &Path) -> Vec<(u32, u32)> {
        let bytes = std::fs::read(path).expect("read src.u32");
        assert_eq!(bytes.len() % 8, 0);
        bytes
            .chunks_exact(8)
            .map(|c| {
                (
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect()
    }

    #[test]
    fn wfdb_extracted_beats_match_the_papers_beat_set() {
        let Some(dir) = raw_dir() else { return };
        let beat_dir = PathBuf::from(BEAT_SET_DIR);
        if !beat_dir.join("train.src.u32").is_file() {
            println!("skipping: ../shared/data/mitbih not found");
            return;
        }
        type Split = (&'static str, Dataset, Vec<(u32, u32)>);
        let splits: Vec<Split> = ["train", "test"]
            .iter()
            .map(|&split| {
                let beats = crate::data::load_beats(&beat_dir, split, BEAT_LEN, NUM_CLASSES)
                    .expect("beat set");
                let sources = read_sources(&beat_dir.join(format!("{split}.src.u32")));
                assert_eq!(sources.len(), beats.len());
                (split, beats, sources)
            })
            .collect();
        let mut overall_max_diff = 0.0_f32;
        for name in ["100", "208", "232"] {
            let number: u32 = name.parse().expect("numeric record name");
            let record = read_record(&dir, name).expect("record");
            let annotations =
                read_annotations(&dir.join(format!("{name}.atr"))).expect("annotations");
            let (beats, peaks) = extract_beats_with_peaks(&record, &annotations).expect("beats");
            assert_eq!(beats.beat_len(), BEAT_LEN);
            assert_eq!(beats.num_classes(), NUM_CLASSES);
            assert_eq!(peaks.len(), beats.len());
            let by_peak: HashMap<u64, usize> =
                peaks.iter().enumerate().map(|(i, &p)| (p, i)).collect();
            assert_eq!(by_peak.len(), peaks.len(), "{name}: one beat per peak");
            let mut rows = 0;
            let mut distinct = std::collections::HashSet::new();
            let mut max_diff = 0.0_f32;
            for (split, set, sources) in &splits {
                for (row, &(source_record, sample)) in sources.iter().enumerate() {
                    if source_record != number {
                        continue;
                    }
                    let Some(&index) = by_peak.get(&u64::from(sample)) else {
                        panic!("{name}: {split} row {row} (peak {sample}) was not extracted");
                    };
                    assert_eq!(
                        beats.labels()[index],
                        set.labels()[row],
                        "{name}: {split} row {row}: label"
                    );
                    let diff = beats
                        .beat(index)
                        .iter()
                        .zip(set.beat(row))
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0_f32, f32::max);
                    max_diff = max_diff.max(diff);
                    rows += 1;
                    distinct.insert(sample);
                }
            }
            assert!(
                rows > 0,
                "{name}: the beat set has no rows from this record"
            );
            assert!(
                max_diff <= 1e-5,
                "{name}: extracted beats differ from the beat set by up to {max_diff}"
            );
            overall_max_diff = overall_max_diff.max(max_diff);
            println!(
                "record {name}: {} beats extracted, class counts {:?} (N L R A V); \
                 {rows} rows of train+test ({} distinct beats) match, max |diff| = {max_diff:e}",
                beats.len(),
                beats.class_counts(),
                distinct.len()
            );
        }
        assert!(overall_max_diff <= 1e-5);

        // load_records concatenates in the order given and records the sources.
        let names = ["100".to_owned(), "232".to_owned()];
        let (all, sources) = load_records_with_sources(&dir, &names).expect("load_records");
        let single = extract_beats(
            &read_record(&dir, "232").expect("record"),
            &read_annotations(&dir.join("232.atr")).expect("annotations"),
        )
        .expect("beats");
        assert_eq!(sources.len(), all.len());
        assert_eq!(sources.last().map(|s| s.record.as_str()), Some("232"));
        let offset = all.len() - single.len();
        assert_eq!(all.beat(offset), single.beat(0));
        assert_eq!(&all.labels()[offset..], single.labels());
        assert_eq!(load_records(&dir, &names).expect("load_records"), all);
    }

    // -----------------------------------------------------------------------------------------
    // Synthetic records, always run
    // -----------------------------------------------------------------------------------------

    fn synthetic_signals(frames: usize) -> (Vec<i16>, Vec<i16>) {
        let s0: Vec<i16> = (0..frames)
            .map(|i| match i {
                0 => -2048,
                1 => 2047,
                2 => -1,
                3 => 0,
                _ => ((i * 37 + 11) % 4096) as i16 - 2048,
            })
            .collect();
        let s1: Vec<i16> = (0..frames)
            .map(|i| ((i * 1013 + 7) % 4096) as i16 - 2048)
            .collect();
        (s0, s1)
    }

    #[test]
    fn wfdb_synthetic_record_round_trips() {
        let dir = TempDir::new("roundtrip");
        let frames = 1001;
        let (s0, s1) = synthetic_signals(frames);
        dir.write("syn.dat", &encode_212(&interleave(&[&s0, &s1])));
        let header = format!(
            "# leading comment\n\
             syn 2 360/1000(0) {frames} 12:00:00 01/01/2000\r\n\
             syn.dat 212 200(1000)/mV 11 1024 {} {} 0 MLII lead with spaces\n\
             \n   # comment between signal lines\n\
             syn.dat 212 0/uV 0 -3 {} {} 0\n\
             # trailing comment\n",
            s0[0],
            checksum(&s0),
            s1[0],
            checksum(&s1) as u16, // the unsigned spelling is accepted too
        );
        dir.write("syn.hea", header.as_bytes());
        let record = read_record(&dir.0, "syn").expect("round trip");
        assert_eq!(record.signals, vec![s0.clone(), s1.clone()]);
        assert_eq!(record.num_samples(), frames);
        let h = &record.header;
        assert_eq!(h.record_line, 2);
        assert_eq!(h.sampling_frequency, 360.0);
        assert_eq!(h.base_time.as_deref(), Some("12:00:00"));
        assert_eq!(h.base_date.as_deref(), Some("01/01/2000"));
        assert_eq!(
            h.comments,
            vec![
                "leading comment",
                "comment between signal lines",
                "trailing comment"
            ]
        );
        let (a, b) = (&h.signals[0], &h.signals[1]);
        assert_eq!((a.gain, a.baseline, a.units.as_str()), (200.0, 1000, "mV"));
        assert_eq!((a.adc_resolution, a.adc_zero, a.line), (11, 1024, 3));
        assert_eq!(a.description, "MLII lead with spaces");
        assert_eq!((b.gain, b.baseline, b.units.as_str()), (200.0, -3, "uV"));
        assert_eq!(
            (b.adc_resolution, b.checksum, b.line),
            (12, Some(checksum(&s1)), 6)
        );
        assert_eq!(b.description, "");
        let physical = record.physical(0).expect("signal 0");
        assert!(physical[0].is_nan(), "-2048 is the invalid-sample marker");
        assert_eq!(physical[1], (2047.0 - 1000.0) / 200.0);
        assert!(record.physical(2).is_none());

        // Minimal header: defaults everywhere, sample count derived from the file size.
        let odd: Vec<i16> = vec![5, -6, 7, -2048, 2047, 0, -1];
        dir.write("nolen.dat", &encode_212(&odd));
        dir.write("nolen.hea", b"nolen 1\nnolen.dat 212\n");
        let record = read_record(&dir.0, "nolen").expect("minimal header");
        assert_eq!(record.signals, vec![odd.clone()]);
        assert_eq!(record.header.sampling_frequency, 250.0);
        assert_eq!(record.header.num_samples, None);
        let spec = &record.header.signals[0];
        assert_eq!(
            (spec.gain, spec.baseline, spec.adc_resolution),
            (200.0, 0, 12)
        );
        assert_eq!((spec.initial_value, spec.checksum), (0, None));

        // One signal per file, odd sample count, a byte offset and a padding byte.
        dir.write("two_a.dat", &encode_212(&odd[..5]));
        let mut b_bytes = vec![0xaa; 4];
        b_bytes.extend_from_slice(&encode_212(&odd[2..]));
        b_bytes.push(0);
        dir.write("two_b.dat", &b_bytes);
        dir.write(
            "two.hea",
            format!(
                "two 2 360 5\ntwo_a.dat 212 200 12 0 5 {}\ntwo_b.dat 212+4 200 12 0 7 {}\n",
                checksum(&odd[..5]),
                checksum(&odd[2..])
            )
            .as_bytes(),
        );
        let record = read_record(&dir.0, "two").expect("two files");
        assert_eq!(record.signals, vec![odd[..5].to_vec(), odd[2..].to_vec()]);

        // Annotations: SKIPs both ways, NUM/SUB/CHN carry-over, AUX with padding, end marker.
        let bytes = AtrWriter::default()
            .ann(10, 1)
            .word(CODE_NUM, 5)
            .ann(500, 5)
            .word(CODE_SUB, 2)
            .word(CODE_CHN, 1)
            .ann(3000, 28)
            .aux(b"(AFIB\0")
            .ann(3000, 14)
            .aux(b"(N")
            .ann(100_000, 8)
            .ann(99_000, 13)
            .ann(99_001, 42)
            .end();
        let mut bytes_with_trailer = bytes.clone();
        bytes_with_trailer.extend_from_slice(&[0xff, 0xff, 0x01]);
        dir.write("syn.atr", &bytes_with_trailer);
        let got = read_annotations(&dir.0.join("syn.atr")).expect("annotations");
        let mut expected = vec![
            ann(10, 1),
            ann(500, 5),
            ann(3000, 28),
            ann(3000, 14),
            ann(100_000, 8),
            ann(99_000, 13),
            ann(99_001, 42),
        ];
        expected[0].num = 5;
        for a in &mut expected[1..] {
            a.num = 5;
        }
        expected[1].subtype = 2;
        expected[1].chan = 1;
        for a in &mut expected[2..] {
            a.chan = 1;
        }
        expected[2].aux = Some("(AFIB".to_owned());
        expected[3].aux = Some("(N".to_owned());
        assert_eq!(got, expected);
        assert_eq!(got[2].symbol, "+");
        assert_eq!(got[6].symbol, "", "code 42 has no mnemonic");
        // Without the end marker the same annotations come back.
        let unterminated = &bytes[..bytes.len() - 2];
        assert_eq!(
            parse_annotations(Path::new("x.atr"), unterminated).expect("no end marker"),
            expected
        );
    }

    #[test]
    fn wfdb_annotation_symbols_follow_ecgcodes() {
        let table = [
            (1, "N"),
            (2, "L"),
            (3, "R"),
            (4, "a"),
            (5, "V"),
            (6, "F"),
            (7, "J"),
            (8, "A"),
            (9, "S"),
            (10, "E"),
            (11, "j"),
            (12, "/"),
            (13, "Q"),
            (14, "~"),
            (16, "|"),
            (18, "s"),
            (19, "T"),
            (20, "*"),
            (21, "D"),
            (22, "\""),
            (23, "="),
            (24, "p"),
            (25, "B"),
            (26, "^"),
            (27, "t"),
            (28, "+"),
            (29, "u"),
            (30, "?"),
            (31, "!"),
            (32, "["),
            (33, "]"),
            (34, "e"),
            (35, "n"),
            (36, "@"),
            (37, "x"),
            (38, "f"),
            (39, "("),
            (40, ")"),
            (41, "r"),
        ];
        for (code, symbol) in table {
            assert_eq!(annotation_symbol(code), symbol, "code {code}");
        }
        for code in [0, 15, 17, 42, 49, 63, 255] {
            assert_eq!(annotation_symbol(code), "");
        }
    }

    #[test]
    fn wfdb_malformed_headers_are_typed_errors_with_lines() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "before the record line"),
            ("# only a comment\n\n", 3, "before the record line"),
            ("rec", 1, "number of signals"),
            ("rec x 360", 1, "number of signals"),
            ("rec -1 360", 1, "number of signals"),
            ("rec 1 -5", 1, "sampling frequency"),
            ("rec 1 nan", 1, "sampling frequency"),
            ("rec 1 inf", 1, "sampling frequency"),
            ("rec 1 360/abc", 1, "counter frequency"),
            ("rec 1 360/10(5", 1, "missing ')'"),
            ("rec 1 360 ten", 1, "number of samples"),
            ("rec 1 360 10 t d extra", 1, "unexpected field"),
            ("rec/2 2 360", 1, "multi-segment"),
            ("rec 1 360 10\n", 2, "announces 1"),
            ("rec 2 360 10\nf.dat 212\n# c\n", 4, "after 1 signal line"),
            ("rec 1 360 10\nf.dat", 2, "missing the storage format"),
            ("rec 1 360 10\nf.dat abc", 2, "storage format"),
            ("rec 1 360 10\nf.dat 212x2", 2, "samples per frame"),
            ("rec 1 360 10\nf.dat 212:3", 2, "skew"),
            ("rec 1 360 10\nf.dat 212+", 2, "byte offset"),
            ("rec 1 360 10\nf.dat 212?", 2, "unexpected"),
            ("rec 1 360 10\nf.dat 212 abc", 2, "gain"),
            ("rec 1 360 10\nf.dat 212 nan", 2, "gain"),
            ("rec 1 360 10\nf.dat 212 200(x)/mV", 2, "baseline"),
            ("rec 1 360 10\nf.dat 212 200(0/mV", 2, "missing ')'"),
            ("rec 1 360 10\nf.dat 212 200/", 2, "empty units"),
            ("rec 1 360 10\nf.dat 212 200 -1", 2, "ADC resolution"),
            ("rec 1 360 10\nf.dat 212 200 11 z", 2, "ADC zero"),
            ("rec 1 360 10\nf.dat 212 200 11 0 1.5", 2, "initial value"),
            ("rec 1 360 10\nf.dat 212 200 11 0 0 99999", 2, "16-bit"),
            ("rec 1 360 10\nf.dat 212 200 11 0 0 -32769", 2, "16-bit"),
            ("rec 1 360 10\nf.dat 212 200 11 0 0 0 -4", 2, "block size"),
            ("rec 1 360 10\n/etc/passwd 212", 2, "relative path"),
            ("rec 1 360 10\n../x.dat 212", 2, "relative path"),
            ("rec 1 360 10\n- 212", 2, "standard input"),
            ("rec 1 360 10\nf.dat 212\nextra line", 3, "unexpected line"),
            ("rec 2 360 10\nf.dat 212\nf.dat 212+3", 3, "same format"),
        ];
        for &(text, line, needle) in cases {
            match parse_header(Path::new("t.hea"), text) {
                Err(WfdbError::Header {
                    path,
                    line: got_line,
                    message,
                }) => {
                    assert_eq!(path, Path::new("t.hea"));
                    assert_eq!(got_line, line, "{text:?}: {message}");
                    assert!(
                        message.contains(needle),
                        "{text:?}: {message:?} lacks {needle:?}"
                    );
                    let shown = WfdbError::Header {
                        path,
                        line,
                        message,
                    }
                    .to_string();
                    assert!(
                        shown.starts_with(&format!("t.hea, line {line}: ")),
                        "{shown}"
                    );
                }
                other => panic!("{text:?}: expected a header error, got {other:?}"),
            }
        }
        for (text, line, signal, format) in [
            ("rec 1 360 10\nf.dat 16 200 12 0", 2, 0, "16"),
            ("rec 2 360 10\nf.dat 212\ng.dat 80", 3, 1, "80"),
            ("rec 1 360 10\nf.dat 0212x1", 2, 0, "0212x1"),
            (
                "rec 1 360 10\nf.dat 99999999999999999999",
                2,
                0,
                "99999999999999999999",
            ),
        ] {
            match parse_header(Path::new("t.hea"), text) {
                Err(WfdbError::UnsupportedFormat {
                    line: l,
                    signal: s,
                    format: f,
                    ..
                }) if format != "0212x1" => {
                    assert_eq!((l, s, f.as_str()), (line, signal, format), "{text:?}");
                }
                // A zero-padded "0212" is format 212.
                Ok(header) if format == "0212x1" => assert_eq!(header.signals[0].format, 212),
                other => panic!("{text:?}: expected UnsupportedFormat, got {other:?}"),
            }
        }
        let shown = parse_header(Path::new("t.hea"), "rec 1 360 10\nf.dat 16")
            .expect_err("format 16")
            .to_string();
        assert!(
            shown.contains("format 16") && shown.contains("only format 212"),
            "{shown}"
        );
    }

    #[test]
    fn wfdb_bad_signal_files_are_typed_errors() {
        let dir = TempDir::new("badsig");
        let frames = 100;
        let (s0, s1) = synthetic_signals(frames);
        let good = encode_212(&interleave(&[&s0, &s1]));
        let header = format!(
            "bad 2 360 {frames}\nbad.dat 212 200 12 0 0 {}\nbad.dat 212 200 12 0 0 {}\n",
            checksum(&s0),
            checksum(&s1)
        );
        dir.write("bad.hea", header.as_bytes());
        for len in [0, 1, 2, 3, 4, 5, good.len() - 3, good.len() - 1] {
            dir.write("bad.dat", &good[..len]);
            match read_record(&dir.0, "bad") {
                Err(WfdbError::DatLength {
                    expected,
                    found,
                    message,
                    line,
                    ..
                }) => {
                    assert_eq!((expected, found, line), (300, len as u64, 2));
                    assert!(message.starts_with("truncated"), "{message}");
                }
                other => panic!("{len} bytes: expected DatLength, got {other:?}"),
            }
        }
        for extra in [1, 3] {
            let mut long = good.clone();
            long.extend(std::iter::repeat_n(0, extra));
            dir.write("bad.dat", &long);
            assert!(matches!(
                read_record(&dir.0, "bad"),
                Err(WfdbError::DatLength { found, .. }) if found == 300 + extra as u64
            ));
        }
        // Flip one sample of signal 1: its checksum no longer matches.
        let mut corrupted = s1.clone();
        corrupted[50] = corrupted[50].wrapping_add(1) & 0x07ff;
        dir.write("bad.dat", &encode_212(&interleave(&[&s0, &corrupted])));
        match read_record(&dir.0, "bad") {
            Err(e @ WfdbError::Checksum { .. }) => {
                let WfdbError::Checksum {
                    signal,
                    expected,
                    computed,
                    line,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((*signal, *expected, *line), (1, checksum(&s1), 3));
                assert_eq!(*computed, checksum(&corrupted));
                assert!(e.to_string().contains("bad.dat"), "{e}");
            }
            other => panic!("expected Checksum, got {other:?}"),
        }
        dir.write("bad.dat", &good);
        read_record(&dir.0, "bad").expect("the good file reads");

        // Missing files, wrong names, unsupported formats through read_record.
        assert!(matches!(
            read_record(&dir.0, "absent"),
            Err(WfdbError::Io { .. })
        ));
        dir.write("nodat.hea", b"nodat 1 360 10\nnodat.dat 212\n");
        assert!(matches!(
            read_record(&dir.0, "nodat"),
            Err(WfdbError::Io { path, .. }) if path.ends_with("nodat.dat")
        ));
        dir.write("misnamed.hea", header.as_bytes());
        assert!(matches!(
            read_record(&dir.0, "misnamed"),
            Err(WfdbError::Header { line: 1, .. })
        ));
        dir.write("f16.hea", b"f16 1 360 10\nf16.dat 16 200\n");
        assert!(matches!(
            read_record(&dir.0, "f16"),
            Err(WfdbError::UnsupportedFormat { line: 2, .. })
        ));
        for name in ["", "a/b", "..", "a b", "c\\d"] {
            assert!(matches!(
                read_record(&dir.0, name),
                Err(WfdbError::InvalidArgument(_))
            ));
        }
        // Absurd sample counts and offsets: length errors, no overflow.
        dir.write("big.dat", &[0; 6]);
        for header in [
            "big 1 360 18446744073709551615\nbig.dat 212\n",
            "big 3 360 18446744073709551615\nbig.dat 212\nbig.dat 212\nbig.dat 212\n",
            "big 1 360 4\nbig.dat 212+18446744073709551615\n",
        ] {
            dir.write("big.hea", header.as_bytes());
            assert!(
                matches!(read_record(&dir.0, "big"), Err(WfdbError::DatLength { .. })),
                "{header:?}"
            );
        }
        // An offset past the end of the file.
        dir.write("off.dat", &[0; 3]);
        dir.write("off.hea", b"off 1 360 2\noff.dat 212+10\n");
        assert!(matches!(
            read_record(&dir.0, "off"),
            Err(WfdbError::DatLength { .. })
        ));
    }

    #[test]
    fn wfdb_garbage_annotations_are_typed_errors() {
        let path = Path::new("g.atr");
        let expect_error =
            |bytes: &[u8], offset: usize, needle: &str| match parse_annotations(path, bytes) {
                Err(WfdbError::Annotation {
                    offset: got,
                    message,
                    ..
                }) => {
                    assert_eq!(got, offset, "{bytes:?}: {message}");
                    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
                }
                other => panic!("{bytes:?}: expected an annotation error, got {other:?}"),
            };
        expect_error(&[0x01], 0, "middle of a 16-bit word");
        expect_error(&[0x05, 0x04, 0x00], 2, "middle of a 16-bit word");
        expect_error(&[0x00, 0xec, 0x00, 0x00], 0, "SKIP"); // SKIP with 2 of its 4 bytes
        expect_error(&[0x00, 0xd8], 0, "code 54");
        expect_error(&[0x05, 0xf0], 0, "NUM pseudo-annotation");
        expect_error(&[0x05, 0xfc, b'a', b'b'], 0, "AUX pseudo-annotation");
        let mut aux = AtrWriter::default().ann(1, 1).bytes.clone();
        aux.extend_from_slice(&[0x0a, 0xfc, b'a', b'b']);
        expect_error(&aux, 2, "AUX string of 10 bytes");
        let mut odd_aux = AtrWriter::default().ann(1, 1).bytes.clone();
        odd_aux.extend_from_slice(&[0x03, 0xfc, b'a', b'b', b'c']); // padding byte missing
        expect_error(&odd_aux, 2, "AUX string of 3 bytes");
        let negative = AtrWriter::default().skip(-5).word(1, 2).end();
        expect_error(&negative, 6, "negative sample -3");
        assert_eq!(parse_annotations(path, &[]).expect("empty"), vec![]);
        assert_eq!(
            parse_annotations(path, &[0, 0, 1]).expect("end marker"),
            vec![]
        );
        let shown = parse_annotations(path, &[0x01])
            .expect_err("odd")
            .to_string();
        assert!(shown.starts_with("g.atr, byte 0: "), "{shown}");
    }

    #[test]
    fn wfdb_fuzzed_inputs_never_panic() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0212);
        let mut below = |n: usize| (rng.next_u32() as usize) % n;

        // Annotations: random bytes, random words, prefixes and mutations of a valid file.
        let valid = AtrWriter::default()
            .ann(10, 1)
            .word(CODE_NUM, 5)
            .ann(3000, 28)
            .aux(b"(AFIB")
            .word(CODE_CHN, 2)
            .ann(4000, 5)
            .end();
        let (mut ok, mut err) = (0, 0);
        let mut tally = |result: Result<Vec<Annotation>, WfdbError>| match result {
            Ok(_) => ok += 1,
            Err(WfdbError::Annotation { .. }) => err += 1,
            Err(other) => panic!("unexpected error type {other:?}"),
        };
        for len in 0..=valid.len() {
            tally(parse_annotations(Path::new("p.atr"), &valid[..len]));
        }
        for _ in 0..3000 {
            let len = below(80);
            let bytes: Vec<u8> = (0..len).map(|_| below(256) as u8).collect();
            tally(parse_annotations(Path::new("r.atr"), &bytes));
            let mut mutated = valid.clone();
            let at = below(mutated.len());
            mutated[at] = below(256) as u8;
            tally(parse_annotations(Path::new("m.atr"), &mutated));
        }
        assert!(
            ok > 0 && err > 0,
            "fuzz exercised both outcomes ({ok} ok, {err} errors)"
        );

        // Headers: random text over the header alphabet, and mutations of a valid header.
        let alphabet: Vec<char> = "0123456789 \t\n#/()+:x-.eabcdmVinf212\u{e9}"
            .chars()
            .collect();
        let valid_header = "syn 2 360/1000(0) 20 12:00:00 01/01/2000\n\
                            syn.dat 212 200(1000)/mV 11 1024 5 -3 0 MLII\n\
                            syn.dat 212+0 200 12 0 0 0 0 V5\n# c\n";
        let dir = TempDir::new("fuzz");
        let frames = 20;
        let (s0, s1) = synthetic_signals(frames);
        dir.write("syn.dat", &encode_212(&interleave(&[&s0, &s1])));
        for i in 0..1500 {
            let text: String = (0..below(120))
                .map(|_| alphabet[below(alphabet.len())])
                .collect();
            let _ = parse_header(Path::new("r.hea"), &text);
            let mut chars: Vec<char> = valid_header.chars().collect();
            for _ in 0..1 + below(3) {
                let at = below(chars.len());
                chars[at] = alphabet[below(alphabet.len())];
            }
            let mutated: String = chars.into_iter().collect();
            let _ = parse_header(Path::new("m.hea"), &mutated);
            if i % 10 == 0 {
                // The whole reader on a mutated header: only typed errors.
                dir.write("syn.hea", mutated.as_bytes());
                let _ = read_record(&dir.0, "syn");
            }
        }
        // Random bytes as a header file (invalid UTF-8 included).
        let bytes: Vec<u8> = (0..200).map(|_| below(256) as u8).collect();
        dir.write("syn.hea", &bytes);
        assert!(read_record(&dir.0, "syn").is_err());

        // Random .dat contents of random sizes under a valid header.
        dir.write(
            "syn.hea",
            format!("syn 2 360 {frames}\nsyn.dat 212\nsyn.dat 212 200 12 0 0 0\n").as_bytes(),
        );
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..below(70)).map(|_| below(256) as u8).collect();
            dir.write("syn.dat", &bytes);
            match read_record(&dir.0, "syn") {
                Ok(record) => assert_eq!(record.signals[0].len(), frames),
                Err(WfdbError::DatLength { .. } | WfdbError::Checksum { .. }) => {}
                Err(other) => panic!("unexpected error type {other:?}"),
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Extraction
    // -----------------------------------------------------------------------------------------

    /// A one-signal record with `digital` as lead 0.
    fn record_with(digital: Vec<i16>) -> Record {
        let text = format!("syn 1 360 {}\nsyn.dat 212 200 11 1024\n", digital.len());
        let header = parse_header(Path::new("syn.hea"), &text).expect("header");
        Record {
            header,
            num_samples: digital.len(),
            signals: vec![digital],
        }
    }

    fn wave(len: usize) -> Vec<i16> {
        (0..len)
            .map(|t| {
                let t = t as f64;
                (1024.0 + 300.0 * (0.05 * t).sin() + 80.0 * (0.31 * t).cos()).round() as i16
            })
            .collect()
    }

    #[test]
    fn wfdb_extraction_follows_regenerate_py_window_rules() {
        let annotations: Vec<Annotation> = [
            (50, 28),   // first annotation: dropped
            (300, 1),   // first of ann[1:-1]: never a centre
            (600, 1),   // N: window 500..=700, right neighbour exactly at 700
            (700, 5),   // V: left neighbour exactly at 600
            (800, 8),   // A
            (950, 2),   // L: 1050 > next (1049): dropped
            (1049, 3),  // R: 949 < previous (950): dropped
            (1300, 14), // ~: not a beat class
            (1500, 3),  // R
            (1700, 6),  // F: not one of N L R A V
            (1850, 2),  // L: 1950 <= 1999 = len - 1
            (1990, 1),  // last of ann[1:-1]: never a centre
            (1995, 1),  // last annotation: dropped
        ]
        .iter()
        .map(|&(sample, code)| ann(sample, code))
        .collect();
        let record = record_with(wave(2000));
        let (beats, peaks) = extract_beats_with_peaks(&record, &annotations).expect("beats");
        assert_eq!(peaks, vec![600, 700, 800, 1500, 1850]);
        assert_eq!(beats.labels(), &[0, 4, 3, 2, 1]);
        assert_eq!(beats.class_counts(), vec![1, 1, 1, 1, 1]);
        assert_eq!(
            (beats.beat_len(), beats.num_classes()),
            (BEAT_LEN, NUM_CLASSES)
        );
        assert_eq!(extract_beats(&record, &annotations).expect("beats"), beats);

        // Each beat is denoise(resample(window of the min-max normalised lead 0)).
        let physical = record.physical(0).expect("lead 0");
        let (min, max) = physical
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let normalised: Vec<f64> = physical.iter().map(|v| (v - min) / (max - min)).collect();
        let expected = denoise(&Resampler::new(201, 128).apply(&normalised[1400..=1600]));
        for (got, want) in beats.beat(3).iter().zip(&expected) {
            assert_eq!(*got, *want as f32);
        }

        // One sample shorter: the L window at 1850 would end past len - 1.
        let record = record_with(wave(1950));
        let (_, peaks) = extract_beats_with_peaks(&record, &annotations).expect("beats");
        assert_eq!(peaks, vec![600, 700, 800, 1500]);

        // Too few annotations for any candidate.
        for n in 0..5 {
            let few: Vec<Annotation> = (0..n).map(|i| ann(300 + 200 * i, 1)).collect();
            let (beats, _) = extract_beats_with_peaks(&record, &few).expect("no beats");
            assert_eq!(beats.len(), 0, "{n} annotations");
        }
        let five: Vec<Annotation> = (0..5).map(|i| ann(300 + 200 * i, 1)).collect();
        let (_, peaks) = extract_beats_with_peaks(&record, &five).expect("one beat");
        assert_eq!(peaks, vec![700]);

        // Records that cannot be normalised.
        let fail = |record: &Record| match extract_beats(record, &annotations) {
            Err(WfdbError::Extraction { record, message }) => {
                assert_eq!(record, "syn");
                message
            }
            other => panic!("expected an extraction error, got {other:?}"),
        };
        assert!(fail(&record_with(vec![1024; 2000])).contains("constant"));
        let mut invalid = wave(2000);
        invalid[7] = FORMAT_212_INVALID;
        assert!(fail(&record_with(invalid)).contains("sample 7"));
        let mut empty = record_with(vec![]);
        empty.signals.clear();
        empty.header.signals.clear();
        assert!(fail(&empty).contains("no signals"));
    }

    #[test]
    fn wfdb_resample_and_denoise_match_scipy_and_pywavelets() {
        // x as in scipy/pywt reference run (numpy 2.4.6, scipy 1.17.1, PyWavelets 1.8):
        //   t = arange(201); x = 0.5 + 0.3 sin(0.07 t) + 0.1 cos(0.23 t + 0.4)
        //                        + 0.05 exp(-((t - 100) / 4)^2)
        //   r = scipy.signal.resample(x, 128); d = the notebook's denoise(r)
        let x: Vec<f64> = (0..201)
            .map(|t| {
                let t = f64::from(t);
                0.5 + 0.3 * (0.07 * t).sin()
                    + 0.1 * (0.23 * t + 0.4).cos()
                    + 0.05 * (-((t - 100.0) / 4.0).powi(2)).exp()
            })
            .collect();
        let resampled = Resampler::new(201, 128).apply(&x);
        let denoised = denoise(&resampled);
        assert_eq!((resampled.len(), denoised.len()), (128, 128));
        let reference = [
            (0, 0.615613690532533, 0.5942048626877897),
            (1, 0.5988773359398315, 0.5917341126741641),
            (37, 0.29702568453745204, 0.2965699017177964),
            (64, 0.7490877450801999, 0.7321410863691944),
            (80, 0.6241954469937832, 0.6267555900057553),
            (126, 0.749224220570371, 0.7665495943242128),
            (127, 0.7360983138471315, 0.7497602130591042),
        ];
        for (i, r, d) in reference {
            assert!(
                (resampled[i] - r).abs() < 1e-12,
                "resample[{i}] = {}",
                resampled[i]
            );
            assert!(
                (denoised[i] - d).abs() < 1e-12,
                "denoise[{i}] = {}",
                denoised[i]
            );
        }
        assert_eq!(dwt_max_level(128, FILTER_LEN), 3);
        // Perfect reconstruction without thresholding (bior4.4 is biorthogonal).
        let (a, d) = dwt(&resampled);
        assert_eq!((a.len(), d.len()), (68, 68));
        let back = idwt(&a, &d);
        let error = back
            .iter()
            .zip(&resampled)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        assert!(error < 1e-12, "reconstruction error {error}");
    }
}
