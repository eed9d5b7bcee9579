//! ECG beat datasets: the MIT-BIH reference beat files, CSV beats, and a deterministic
//! synthetic stand-in.
//!
//! Every beat is a fixed-length row of `f32` samples with a class label `< num_classes`.
//! The loaders validate everything they read (shape, label range, finiteness) and report the
//! offending file, line, row and column instead of panicking.

use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Samples per beat produced by [`synthetic`] (same as the MIT-BIH reference beats).
pub const SYNTHETIC_BEAT_LEN: usize = 128;
/// Classes produced by [`synthetic`]: N, L, R, A, V in that order.
pub const SYNTHETIC_CLASSES: usize = 5;

/// Everything that can go wrong while building or loading a [`Dataset`].
///
/// Rows and sample columns are 0-based beat and sample indices; CSV `line` and field `column`
/// numbers are 1-based, as an editor shows them.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Sizes do not fit together; `detail` states what was expected and what was found.
    #[error("{name}: wrong shape: {detail}")]
    Shape { name: String, detail: String },
    /// A label is not a valid class index.
    #[error("{name}: row {row}: label {label} is out of range (num_classes = {num_classes})")]
    LabelOutOfRange {
        name: String,
        row: usize,
        label: usize,
        num_classes: usize,
    },
    /// A sample is NaN or infinite.
    #[error("{name}: row {row}, sample {column}: value {value} is not finite")]
    NotFinite {
        name: String,
        row: usize,
        column: usize,
        value: f32,
    },
    /// A CSV field could not be parsed.
    #[error("{name}: line {line}, field {column}: {message}")]
    Parse {
        name: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// [`Dataset::select`] was given an index past the end.
    #[error("index {index} is out of range for a dataset of {len} beats")]
    IndexOutOfRange { index: usize, len: usize },
    /// A file holds no beats at all.
    #[error("{name}: contains no beats")]
    Empty { name: String },
    /// A caller-supplied parameter is unusable (e.g. `beat_len == 0`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Beats with class labels and the patient each came from.
///
/// Each beat is one row of [`Dataset::row_len`] values: [`Dataset::beat_len`] waveform samples
/// followed by [`Dataset::feature_len`] side features (e.g. RR intervals; none for the beat
/// files). Rows are stored row-major `[len, row_len]`.
///
/// Every beat has a patient: an index into [`Dataset::patient_names`] (the record name for
/// WFDB records, the source record for beat files with a `.src.u32` file, a CSV's patient
/// column, the synthetic generator's patient). Beats whose patient is not recorded belong to
/// one patient named [`UNKNOWN_PATIENT`].
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    rows: Vec<f32>,
    labels: Vec<u8>,
    beat_len: usize,
    feature_len: usize,
    num_classes: usize,
    patients: Vec<u32>,
    patient_names: Vec<String>,
}

/// The patient name of beats whose patient is not recorded.
pub const UNKNOWN_PATIENT: &str = "";

impl Dataset {
    /// Builds a dataset without side features, all beats of one [`UNKNOWN_PATIENT`], after
    /// checking `samples.len() == labels.len() * beat_len`, `beat_len > 0`, every sample finite
    /// and every label `< num_classes`.
    pub fn new(
        samples: Vec<f32>,
        labels: Vec<u8>,
        beat_len: usize,
        num_classes: usize,
    ) -> Result<Self, DataError> {
        Self::validated("dataset", samples, labels, (beat_len, 0), num_classes)
    }

    /// [`Dataset::new`] for rows of `beat_len` waveform samples then `feature_len` features.
    ///
    /// # Shapes
    /// `rows`: `[labels.len(), beat_len + feature_len]` row-major.
    pub fn with_features(
        rows: Vec<f32>,
        labels: Vec<u8>,
        beat_len: usize,
        feature_len: usize,
        num_classes: usize,
    ) -> Result<Self, DataError> {
        Self::validated(
            "dataset",
            rows,
            labels,
            (beat_len, feature_len),
            num_classes,
        )
    }

    /// The same beats with their patients: `patients[i]` indexes `names`. Names must be
    /// distinct, and every name must have a beat.
    pub fn with_patients(self, patients: Vec<u32>, names: Vec<String>) -> Result<Self, DataError> {
        let shape = |detail: String| DataError::Shape {
            name: "dataset".to_owned(),
            detail,
        };
        if patients.len() != self.len() {
            return Err(shape(format!(
                "expected {} patient indices (one per beat), found {}",
                self.len(),
                patients.len()
            )));
        }
        if let Some((row, &p)) = patients
            .iter()
            .enumerate()
            .find(|&(_, &p)| p as usize >= names.len())
        {
            return Err(shape(format!(
                "row {row}: patient {p} is out of range ({} patient names)",
                names.len()
            )));
        }
        let mut seen = vec![false; names.len()];
        for &p in &patients {
            seen[p as usize] = true;
        }
        if let Some(unused) = seen.iter().position(|&s| !s) {
            return Err(shape(format!("patient {:?} has no beats", names[unused])));
        }
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(shape(format!("patient {name:?} is named twice")));
            }
        }
        Ok(Self {
            patients,
            patient_names: names,
            ..self
        })
    }

    /// Checks shapes, labels and values; `name` is used in error messages. All beats belong
    /// to one [`UNKNOWN_PATIENT`].
    fn validated(
        name: &str,
        rows: Vec<f32>,
        labels: Vec<u8>,
        (beat_len, feature_len): (usize, usize),
        num_classes: usize,
    ) -> Result<Self, DataError> {
        check_beat_len(beat_len)?;
        let Some(row_len) = beat_len.checked_add(feature_len) else {
            return Err(DataError::InvalidArgument(format!(
                "beat_len {beat_len} + feature_len {feature_len} is too large"
            )));
        };
        let expected = labels.len().checked_mul(row_len);
        if expected != Some(rows.len()) {
            let what = if feature_len == 0 {
                format!("beat_len {beat_len}")
            } else {
                format!("(beat_len {beat_len} + feature_len {feature_len})")
            };
            return Err(DataError::Shape {
                name: name.to_owned(),
                detail: format!(
                    "expected {} samples ({} labels x {what}), found {}",
                    expected.map_or_else(|| "more than usize::MAX".to_owned(), |n| n.to_string()),
                    labels.len(),
                    rows.len()
                ),
            });
        }
        if let Some((row, &label)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &label)| usize::from(label) >= num_classes)
        {
            return Err(DataError::LabelOutOfRange {
                name: name.to_owned(),
                row,
                label: label.into(),
                num_classes,
            });
        }
        if let Some((index, &value)) = rows.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(DataError::NotFinite {
                name: name.to_owned(),
                row: index / row_len,
                column: index % row_len,
                value,
            });
        }
        let len = labels.len();
        Ok(Self {
            rows,
            labels,
            beat_len,
            feature_len,
            num_classes,
            patients: vec![0; len],
            patient_names: if len == 0 {
                Vec::new()
            } else {
                vec![UNKNOWN_PATIENT.to_owned()]
            },
        })
    }

    /// Number of beats.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the dataset holds no beats.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Waveform samples per beat.
    pub fn beat_len(&self) -> usize {
        self.beat_len
    }

    /// Side features per beat, after the waveform.
    pub fn feature_len(&self) -> usize {
        self.feature_len
    }

    /// Values per row: `beat_len + feature_len`.
    pub fn row_len(&self) -> usize {
        self.beat_len + self.feature_len
    }

    /// Number of classes; every label is below it.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// All rows, row-major `[len, row_len]`.
    pub fn rows(&self) -> &[f32] {
        &self.rows
    }

    /// One label per beat.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The patient of each beat: an index into [`Dataset::patient_names`].
    pub fn patients(&self) -> &[u32] {
        &self.patients
    }

    /// The patients' names, each with at least one beat.
    pub fn patient_names(&self) -> &[String] {
        &self.patient_names
    }

    /// The name of beat `i`'s patient.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn patient_name(&self, i: usize) -> &str {
        &self.patient_names[self.patients[i] as usize]
    }

    /// Row `i`: the waveform then the side features.
    ///
    /// # Panics
    /// If `i >= self.len()`, like slice indexing; see [`Dataset::get_beat`] for a checked version.
    pub fn row(&self, i: usize) -> &[f32] {
        let row_len = self.row_len();
        &self.rows[i * row_len..(i + 1) * row_len]
    }

    /// The waveform samples of beat `i` (the row without its side features).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn beat(&self, i: usize) -> &[f32] {
        &self.row(i)[..self.beat_len]
    }

    /// The side features of beat `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn features(&self, i: usize) -> &[f32] {
        &self.row(i)[self.beat_len..]
    }

    /// The waveform samples of beat `i`, or `None` if `i >= self.len()`.
    pub fn get_beat(&self, i: usize) -> Option<&[f32]> {
        (i < self.len()).then(|| self.beat(i))
    }

    /// New dataset holding the given rows in that order (rows may repeat). Patients keep their
    /// names; those left without beats are dropped, the others keep their order.
    pub fn select(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        let len = self.len();
        if let Some(&index) = indices.iter().find(|&&i| i >= len) {
            return Err(DataError::IndexOutOfRange { index, len });
        }
        let mut rows = Vec::with_capacity(indices.len() * self.row_len());
        for &i in indices {
            rows.extend_from_slice(self.row(i));
        }
        let mut renumber = vec![u32::MAX; self.patient_names.len()];
        for &i in indices {
            renumber[self.patients[i] as usize] = 0;
        }
        let mut patient_names = Vec::new();
        for (old, new) in renumber.iter_mut().enumerate() {
            if *new == 0 {
                *new = patient_names.len() as u32;
                patient_names.push(self.patient_names[old].clone());
            }
        }
        Ok(Dataset {
            rows,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            beat_len: self.beat_len,
            feature_len: self.feature_len,
            num_classes: self.num_classes,
            patients: indices
                .iter()
                .map(|&i| renumber[self.patients[i] as usize])
                .collect(),
            patient_names,
        })
    }

    /// The beats of `parts` one after the other. Patients of the same name are one patient
    /// (e.g. a record's beats in both a train and a test file), in order of first appearance.
    /// Every part must have this shape: same `beat_len`, `feature_len` and `num_classes`.
    pub fn concat(parts: &[Dataset]) -> Result<Dataset, DataError> {
        let Some(first) = parts.first() else {
            return Err(DataError::InvalidArgument(
                "no datasets to concatenate".to_owned(),
            ));
        };
        let shape = (first.beat_len, first.feature_len, first.num_classes);
        let mut out = Dataset {
            rows: Vec::with_capacity(parts.iter().map(|p| p.rows.len()).sum()),
            labels: Vec::with_capacity(parts.iter().map(Dataset::len).sum()),
            beat_len: first.beat_len,
            feature_len: first.feature_len,
            num_classes: first.num_classes,
            patients: Vec::new(),
            patient_names: Vec::new(),
        };
        for (index, part) in parts.iter().enumerate() {
            if (part.beat_len, part.feature_len, part.num_classes) != shape {
                return Err(DataError::Shape {
                    name: format!("dataset {index}"),
                    detail: format!(
                        "{} samples + {} features in {} classes, but the first has {} + {} in {}",
                        part.beat_len,
                        part.feature_len,
                        part.num_classes,
                        shape.0,
                        shape.1,
                        shape.2
                    ),
                });
            }
            let ids: Vec<u32> = part
                .patient_names
                .iter()
                .map(
                    |name| match out.patient_names.iter().position(|n| n == name) {
                        Some(id) => id as u32,
                        None => {
                            out.patient_names.push(name.clone());
                            out.patient_names.len() as u32 - 1
                        }
                    },
                )
                .collect();
            out.rows.extend_from_slice(&part.rows);
            out.labels.extend_from_slice(&part.labels);
            out.patients
                .extend(part.patients.iter().map(|&p| ids[p as usize]));
        }
        Ok(out)
    }

    /// The same beats relabelled: label `l` becomes `map[l]`, beats whose `map[l]` is `None`
    /// are dropped (with their patients, if left without beats).
    pub fn relabel(&self, map: &[Option<u8>], num_classes: usize) -> Result<Dataset, DataError> {
        if map.len() != self.num_classes {
            return Err(DataError::InvalidArgument(format!(
                "a label map of {} entries for {} classes",
                map.len(),
                self.num_classes
            )));
        }
        if let Some(&Some(label)) = map
            .iter()
            .find(|m| m.is_some_and(|l| usize::from(l) >= num_classes))
        {
            return Err(DataError::LabelOutOfRange {
                name: "label map".to_owned(),
                row: 0,
                label: label.into(),
                num_classes,
            });
        }
        let kept: Vec<usize> = (0..self.len())
            .filter(|&i| map[usize::from(self.labels[i])].is_some())
            .collect();
        let mut out = self.select(&kept)?;
        for label in &mut out.labels {
            *label = map[usize::from(*label)].unwrap_or_default();
        }
        out.num_classes = num_classes;
        Ok(out)
    }

    /// Count of beats per class, length `num_classes`.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &label in &self.labels {
            // Labels are validated on construction, so the index is always in range.
            if let Some(count) = counts.get_mut(usize::from(label)) {
                *count += 1;
            }
        }
        counts
    }

    /// Count of beats per patient, in [`Dataset::patient_names`] order.
    pub fn patient_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.patient_names.len()];
        for &p in &self.patients {
            counts[p as usize] += 1;
        }
        counts
    }
}

fn check_beat_len(beat_len: usize) -> Result<(), DataError> {
    if beat_len == 0 {
        return Err(DataError::InvalidArgument(
            "beat_len must be > 0".to_owned(),
        ));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Loads the MIT-BIH reference beat format: `<dir>/<split>.f32` (little-endian `f32`,
/// row-major `[n, beat_len]`) and `<dir>/<split>.labels` (one `u8` per beat), and, when it
/// exists, `<dir>/<split>.src.u32`: each beat's provenance as two little-endian `u32`, the
/// record number and the R-peak sample. With it each beat's patient is its record (named by
/// its number, e.g. `"100"`); without it all beats are of one [`UNKNOWN_PATIENT`].
///
/// `split` is normally `"train"` or `"test"`; any single file-name stem is accepted.
pub fn load_beats(
    dir: &Path,
    split: &str,
    beat_len: usize,
    num_classes: usize,
) -> Result<Dataset, DataError> {
    let is_plain_stem =
        !split.is_empty() && !split.contains(['/', '\\']) && split != "." && split != "..";
    if !is_plain_stem {
        return Err(DataError::InvalidArgument(format!(
            "split {split:?} is not a plain file name such as \"train\" or \"test\""
        )));
    }
    let stem = dir.join(split);
    let f32_bytes = read_file(&dir.join(format!("{split}.f32")))?;
    let label_bytes = read_file(&dir.join(format!("{split}.labels")))?;
    let name = stem.display().to_string();
    let beats = parse_beats(&name, &f32_bytes, &label_bytes, beat_len, num_classes)?;
    let src_path = dir.join(format!("{split}.src.u32"));
    if !src_path.is_file() {
        return Ok(beats);
    }
    let (patients, names) = parse_sources(&name, &read_file(&src_path)?, beats.len())?;
    beats.with_patients(patients, names)
}

/// Parses a `.src.u32` provenance file of `beats` beats (see [`load_beats`]) into patient
/// indices and names (record numbers, in order of first appearance).
///
/// Errors name `{name}.src.u32`.
pub fn parse_sources(
    name: &str,
    bytes: &[u8],
    beats: usize,
) -> Result<(Vec<u32>, Vec<String>), DataError> {
    let src_name = format!("{name}.src.u32");
    if bytes.len() != beats.saturating_mul(8) {
        return Err(DataError::Shape {
            name: src_name,
            detail: format!(
                "expected {} bytes (two u32 per beat for {beats} beats), found {}",
                beats.saturating_mul(8),
                bytes.len()
            ),
        });
    }
    let mut names: Vec<String> = Vec::new();
    let mut records: Vec<u32> = Vec::new();
    let patients = bytes
        .chunks_exact(8)
        .map(|c| {
            let record = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            match records.iter().position(|&r| r == record) {
                Some(p) => p as u32,
                None => {
                    records.push(record);
                    names.push(record.to_string());
                    names.len() as u32 - 1
                }
            }
        })
        .collect();
    Ok((patients, names))
}

/// Parses the [`load_beats`] format from bytes already in memory.
///
/// Errors name `{name}.f32` or `{name}.labels`, so pass the file stem (e.g. `"data/train"`).
pub fn parse_beats(
    name: &str,
    f32_bytes: &[u8],
    label_bytes: &[u8],
    beat_len: usize,
    num_classes: usize,
) -> Result<Dataset, DataError> {
    check_beat_len(beat_len)?;
    let f32_name = format!("{name}.f32");
    let labels_name = format!("{name}.labels");
    let Some(beat_bytes) = beat_len.checked_mul(4) else {
        return Err(DataError::InvalidArgument(format!(
            "beat_len {beat_len} is too large"
        )));
    };
    if !f32_bytes.len().is_multiple_of(beat_bytes) {
        return Err(DataError::Shape {
            name: f32_name,
            detail: format!(
                "expected a multiple of {beat_bytes} bytes (4 x beat_len {beat_len}), found {} bytes \
                 ({} whole beats and {} bytes over)",
                f32_bytes.len(),
                f32_bytes.len() / beat_bytes,
                f32_bytes.len() % beat_bytes
            ),
        });
    }
    let beats = f32_bytes.len() / beat_bytes;
    if label_bytes.len() != beats {
        return Err(DataError::Shape {
            name: labels_name,
            detail: format!(
                "expected {beats} labels (one per beat in {f32_name}), found {}",
                label_bytes.len()
            ),
        });
    }
    if beats == 0 {
        return Err(DataError::Empty { name: f32_name });
    }
    if let Some((row, &label)) = label_bytes
        .iter()
        .enumerate()
        .find(|&(_, &label)| usize::from(label) >= num_classes)
    {
        return Err(DataError::LabelOutOfRange {
            name: labels_name,
            row,
            label: label.into(),
            num_classes,
        });
    }
    let samples = f32_bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Dataset::validated(
        &f32_name,
        samples,
        label_bytes.to_vec(),
        (beat_len, 0),
        num_classes,
    )
}

/// Loads beats from a CSV file; see [`parse_csv`] for the format.
pub fn load_csv(path: &Path, beat_len: usize, num_classes: usize) -> Result<Dataset, DataError> {
    load_csv_with(path, CsvLayout::beats(beat_len), num_classes)
}

/// The columns of a CSV beat file after the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CsvLayout {
    /// A patient column right after the label: any non-empty text naming the patient.
    pub patient_column: bool,
    /// Waveform samples per beat.
    pub beat_len: usize,
    /// Side features per beat, after the samples.
    pub feature_len: usize,
}

impl CsvLayout {
    /// The label then `beat_len` samples.
    pub fn beats(beat_len: usize) -> Self {
        Self {
            patient_column: false,
            beat_len,
            feature_len: 0,
        }
    }
}

/// Loads beats from a CSV file laid out as `layout` says; see [`parse_csv_with`].
pub fn load_csv_with(
    path: &Path,
    layout: CsvLayout,
    num_classes: usize,
) -> Result<Dataset, DataError> {
    let bytes = read_file(path)?;
    let name = path.display().to_string();
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        DataError::Parse {
            name: name.clone(),
            line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
            column: valid.rsplit(|&b| b == b'\n').next().map_or(0, |last_line| {
                last_line.iter().filter(|&&b| b == b',').count()
            }) + 1,
            message: "file is not valid UTF-8".to_owned(),
        }
    })?;
    parse_csv_with(&name, &text, layout, num_classes)
}

/// Parses CSV beats: one beat per line, the integer label first and then `beat_len` samples,
/// comma separated, whitespace around each field ignored. No header line is allowed; blank lines
/// at the end are ignored, blank lines elsewhere are an error. `name` is used in error messages;
/// row-based errors ([`DataError::LabelOutOfRange`], [`DataError::NotFinite`]) give the 0-based
/// row, which is line `row + 1`.
pub fn parse_csv(
    name: &str,
    text: &str,
    beat_len: usize,
    num_classes: usize,
) -> Result<Dataset, DataError> {
    parse_csv_with(name, text, CsvLayout::beats(beat_len), num_classes)
}

/// [`parse_csv`] for any [`CsvLayout`]: the label, then the patient if `layout.patient_column`
/// (beats with the same text are one patient; names in order of first appearance), then
/// `beat_len` samples and `feature_len` features. Sample and feature errors give the column
/// among the values (0-based), as [`DataError::NotFinite`] does for any row.
pub fn parse_csv_with(
    name: &str,
    text: &str,
    layout: CsvLayout,
    num_classes: usize,
) -> Result<Dataset, DataError> {
    let CsvLayout {
        patient_column,
        beat_len,
        feature_len,
    } = layout;
    check_beat_len(beat_len)?;
    let row_len = beat_len.saturating_add(feature_len);
    let first_value = 1 + usize::from(patient_column);
    let lines: Vec<&str> = text.lines().collect();
    let used = lines
        .iter()
        .rposition(|line| !line.trim().is_empty())
        .map_or(0, |last| last + 1);
    if used == 0 {
        return Err(DataError::Empty {
            name: name.to_owned(),
        });
    }
    let parse_error = |line: usize, column: usize, message: String| DataError::Parse {
        name: name.to_owned(),
        line,
        column,
        message,
    };
    let expected_fields = row_len.saturating_add(first_value);
    let described = match (patient_column, feature_len) {
        (false, 0) => format!("label + {beat_len} samples"),
        (true, 0) => format!("label + patient + {beat_len} samples"),
        (false, f) => format!("label + {beat_len} samples + {f} features"),
        (true, f) => format!("label + patient + {beat_len} samples + {f} features"),
    };
    // Every sample takes at least two characters, which bounds the allocation by the text size.
    let mut samples = Vec::with_capacity(used.saturating_mul(row_len).min(text.len()));
    let mut labels = Vec::with_capacity(used);
    let mut patients = Vec::with_capacity(if patient_column { used } else { 0 });
    let mut patient_names: Vec<String> = Vec::new();
    for (row, text_line) in lines[..used].iter().enumerate() {
        let line = row + 1;
        if text_line.trim().is_empty() {
            return Err(parse_error(
                line,
                1,
                "blank line before the end of the data".to_owned(),
            ));
        }
        let fields: Vec<&str> = text_line.split(',').map(str::trim).collect();
        if fields.len() != expected_fields {
            return Err(DataError::Shape {
                name: name.to_owned(),
                detail: format!(
                    "line {line}: expected {expected_fields} fields ({described}), found {}",
                    fields.len()
                ),
            });
        }
        let label = parse_label(fields[0]).map_err(|message| parse_error(line, 1, message))?;
        if label >= num_classes as u64 {
            return Err(DataError::LabelOutOfRange {
                name: name.to_owned(),
                row,
                label: usize::try_from(label).unwrap_or(usize::MAX),
                num_classes,
            });
        }
        let Ok(label) = u8::try_from(label) else {
            return Err(parse_error(
                line,
                1,
                format!("label {label} does not fit in a u8"),
            ));
        };
        labels.push(label);
        if patient_column {
            let patient = fields[1];
            if patient.is_empty() {
                return Err(parse_error(line, 2, "empty patient field".to_owned()));
            }
            let index = match patient_names.iter().position(|p| p == patient) {
                Some(index) => index,
                None => {
                    patient_names.push(patient.to_owned());
                    patient_names.len() - 1
                }
            };
            patients.push(index as u32);
        }
        for (column, field) in fields[first_value..].iter().enumerate() {
            let value: f32 = field.parse().map_err(|_| {
                parse_error(
                    line,
                    column + first_value + 1,
                    format!("expected a number, found {field:?}"),
                )
            })?;
            if !value.is_finite() {
                return Err(DataError::NotFinite {
                    name: name.to_owned(),
                    row,
                    column,
                    value,
                });
            }
            samples.push(value);
        }
    }
    let data = Dataset::validated(name, samples, labels, (beat_len, feature_len), num_classes)?;
    if patient_column {
        data.with_patients(patients, patient_names)
    } else {
        Ok(data)
    }
}

/// Parses a class label: a non-negative integer, also written as an integral float (`"2.0"`).
fn parse_label(field: &str) -> Result<u64, String> {
    if let Ok(label) = field.parse::<u64>() {
        return Ok(label);
    }
    match field.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => {
            Ok(x as u64)
        }
        _ => Err(format!(
            "expected a non-negative integer class label, found {field:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic beats
// ---------------------------------------------------------------------------------------------

/// Seconds between two of the 128 samples: a 201-sample window at 360 Hz resampled to 128.
const SAMPLE_PERIOD_S: f64 = 201.0 / 360.0 / SYNTHETIC_BEAT_LEN as f64;
/// Index of the R peak: sample 100 of the 201-sample window, after resampling.
const R_PEAK_INDEX: f64 = 100.0 * SYNTHETIC_BEAT_LEN as f64 / 201.0;

/// One Gaussian wave of the ECGSYN-style sum: amplitude, centre (s from the R peak), width (s).
#[derive(Clone, Copy, Debug)]
struct Wave {
    amplitude: f64,
    centre_s: f64,
    width_s: f64,
}

const fn wave(amplitude: f64, centre_s: f64, width_s: f64) -> Wave {
    Wave {
        amplitude,
        centre_s,
        width_s,
    }
}

/// The waves of one beat of `class` (N, L, R, A, V), with the class-specific variation drawn
/// from `rng`. Generic amplitude/width/timing jitter is applied afterwards by the caller.
///
/// The variation lets each abnormal class range from textbook to mild, so that the classes
/// overlap a little, as real beats do.
fn class_waves(class: usize, rng: &mut ChaCha8Rng) -> Vec<Wave> {
    // Previous beat's T wave: visible at the window start only when the beat comes early.
    let previous_t = |prematurity: f64| wave(0.28, -0.46 + 0.16 * prematurity, 0.05);
    match class {
        // N: small upright P, narrow QRS, upright T; fast rhythms show a trace of the last T.
        0 => vec![
            previous_t(uniform(rng, 0.0, 0.55)),
            wave(uniform(rng, 0.06, 0.2), uniform(rng, -0.22, -0.17), 0.025), // P
            wave(-0.12, -0.035, 0.010),                                       // Q
            wave(1.0, 0.0, 0.011),                                            // R
            wave(-0.25, 0.035, 0.010),                                        // S
            wave(uniform(rng, 0.12, 0.4), 0.21, 0.045),                       // T
        ],
        // L: no Q, broad notched R (two overlapping bumps), wide QRS, discordant T.
        1 => {
            let notch = uniform(rng, 0.035, 0.065);
            vec![
                wave(uniform(rng, 0.0, 0.16), -0.22, 0.028), // P (longer PR)
                wave(0.70, -notch / 2.0, 0.020),             // first R bump
                wave(uniform(rng, 0.55, 0.85), notch / 2.0, 0.020), // second R bump
                wave(-0.10, 0.085, 0.015),                   // small terminal S
                wave(uniform(rng, -0.4, -0.1), 0.23, 0.05),  // inverted T
            ]
        }
        // R: rSR' with a wide terminal S; the R' ranges from small to dominant.
        2 => vec![
            wave(uniform(rng, 0.06, 0.2), -0.20, 0.025), // P
            wave(0.6, -0.015, 0.010),                    // r
            wave(-0.35, 0.012, 0.010),                   // S
            wave(uniform(rng, 0.2, 0.9), 0.040, 0.015),  // R'
            wave(-0.30, 0.085, 0.022),                   // wide terminal S
            wave(uniform(rng, 0.12, 0.35), 0.23, 0.045), // T
        ],
        // A: normal QRS, early P (often inverted) merging into the previous T.
        3 => {
            let prematurity = uniform(rng, 0.35, 1.0);
            let p_amplitude = if unit(rng) < 0.65 {
                uniform(rng, -0.18, -0.04)
            } else {
                uniform(rng, 0.04, 0.15)
            };
            vec![
                previous_t(prematurity),
                wave(p_amplitude, -0.20 + 0.07 * prematurity, 0.022), // early P
                wave(-0.12, -0.035, 0.010),                           // Q
                wave(1.0, 0.0, 0.011),                                // R
                wave(-0.25, 0.035, 0.010),                            // S
                wave(uniform(rng, 0.12, 0.4), 0.20, 0.045),           // T
            ]
        }
        // V: no P, very wide large QRS, T opposite to it; polarity flips in some beats.
        _ => {
            let polarity = if unit(rng) < 0.3 { -1.0 } else { 1.0 };
            let width = uniform(rng, 0.02, 0.04);
            let mut waves = vec![
                wave(1.3, 0.0, width),                        // main QRS deflection
                wave(-0.6, 0.04 + 1.2 * width, 0.03),         // bizarre second deflection
                wave(uniform(rng, -0.55, -0.25), 0.22, 0.06), // discordant T
            ];
            for w in &mut waves {
                w.amplitude *= polarity;
            }
            waves.push(previous_t(uniform(rng, 0.3, 1.0)));
            waves
        }
    }
}

/// Uniform in `[0, 1)` from the 53 high bits of one `u64` (stable across `rand` versions).
pub(crate) fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Uniform in `[lo, hi)`.
pub(crate) fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * unit(rng)
}

/// Standard normal sample (Box-Muller; `1 - unit` is in `(0, 1]`, so the log is finite).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let radius = (-2.0 * (1.0 - unit(rng)).ln()).sqrt();
    radius * (std::f64::consts::TAU * unit(rng)).cos()
}

/// Uniform index in `0..n` for `n > 0` (multiply-shift; bias below 2^-32 for our sizes).
fn index_below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// Writes one randomised beat of `class` into `out`, min-max normalised and placed in `[0, 1]`.
fn synthetic_beat(class: usize, rng: &mut ChaCha8Rng, out: &mut [f32]) {
    let mut signal = [0.0f64; SYNTHETIC_BEAT_LEN];
    // Annotation jitter: the whole beat moves by a few samples.
    let shift_s = normal(rng) * 1.5 * SAMPLE_PERIOD_S;
    for w in class_waves(class, rng) {
        let amplitude = w.amplitude * uniform(rng, 0.8, 1.2);
        let width = w.width_s * uniform(rng, 0.85, 1.15);
        let centre = w.centre_s + shift_s + normal(rng) * 1.0 * SAMPLE_PERIOD_S;
        for (k, s) in signal.iter_mut().enumerate() {
            let t = (k as f64 - R_PEAK_INDEX) * SAMPLE_PERIOD_S;
            let z = (t - centre) / width;
            *s += amplitude * (-0.5 * z * z).exp();
        }
    }
    // Baseline wander (a slow 0.15-0.5 Hz sinusoid), noise, and an overall scale.
    let wander_amplitude = uniform(rng, 0.0, 0.1);
    let wander_hz = uniform(rng, 0.15, 0.5);
    let wander_phase = uniform(rng, 0.0, std::f64::consts::TAU);
    let scale = uniform(rng, 0.85, 1.15);
    let (lo, hi) = min_max(&signal);
    let noise_std = uniform(rng, 0.01, 0.02) * (hi - lo);
    for (k, s) in signal.iter_mut().enumerate() {
        let t = k as f64 * SAMPLE_PERIOD_S;
        let wander =
            wander_amplitude * (std::f64::consts::TAU * wander_hz * t + wander_phase).sin();
        *s = scale * (*s + wander + noise_std * normal(rng));
    }
    // Min-max normalise to [0, 1], then shrink into a sub-range of [0, 1] with the baseline
    // (median) near 0.35-0.5, roughly where per-record normalisation leaves real beats.
    let (lo, hi) = min_max(&signal);
    let range = if hi - lo > 1e-12 { hi - lo } else { 1.0 };
    let unit_beat = signal.map(|s| (s - lo) / range);
    let span = uniform(rng, 0.6, 1.0);
    let baseline = uniform(rng, 0.35, 0.5);
    let offset = (baseline - span * median(unit_beat)).clamp(0.0, 1.0 - span);
    for (o, u) in out.iter_mut().zip(unit_beat) {
        *o = (offset + span * u) as f32;
    }
}

/// Median of a beat.
fn median(mut values: [f64; SYNTHETIC_BEAT_LEN]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[SYNTHETIC_BEAT_LEN / 2]
}

/// Smallest and largest value.
fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Deterministic synthetic ECG beats standing in for MIT-BIH classes N, L, R, A, V:
/// `n` beats of [`SYNTHETIC_BEAT_LEN`] samples, [`SYNTHETIC_CLASSES`] balanced classes
/// (class `i % 5`, then shuffled), values in `[0, 1]`. The same seed gives the same dataset.
///
/// Each beat is a sum of Gaussian P/Q/R/S/T waves (ECGSYN-style) with class-specific
/// morphology and per-beat random amplitudes, widths, timings, baseline wander, noise and scale.
pub fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut labels: Vec<u8> = (0..n).map(|i| (i % SYNTHETIC_CLASSES) as u8).collect();
    for i in (1..labels.len()).rev() {
        let j = index_below(&mut rng, i + 1);
        labels.swap(i, j);
    }
    let mut samples = vec![0.0f32; n * SYNTHETIC_BEAT_LEN];
    for (beat, &label) in samples.chunks_exact_mut(SYNTHETIC_BEAT_LEN).zip(&labels) {
        synthetic_beat(usize::from(label), &mut rng, beat);
    }
    Dataset::validated(
        "synthetic",
        samples,
        labels,
        (SYNTHETIC_BEAT_LEN, 0),
        SYNTHETIC_CLASSES,
    )
    .expect("synthetic beats are finite and labelled in range")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Little-endian bytes of `values`, as stored in a `.f32` file.
    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Per-class mean beat of `data`.
    fn class_means(data: &Dataset) -> Vec<Vec<f64>> {
        let mut sums = vec![vec![0.0f64; data.beat_len()]; data.num_classes()];
        for (i, &label) in data.labels().iter().enumerate() {
            for (sum, &x) in sums[usize::from(label)].iter_mut().zip(data.beat(i)) {
                *sum += f64::from(x);
            }
        }
        for (sum, count) in sums.iter_mut().zip(data.class_counts()) {
            sum.iter_mut().for_each(|s| *s /= count.max(1) as f64);
        }
        sums
    }

    fn l2(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn dataset_new_validates() {
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1], 3, 2).is_ok());
        assert!(matches!(
            Dataset::new(vec![0.0; 5], vec![0, 1], 3, 2),
            Err(DataError::Shape { .. })
        ));
        assert!(matches!(
            Dataset::new(vec![], vec![], 0, 2),
            Err(DataError::InvalidArgument(_))
        ));
        assert!(matches!(
            Dataset::new(vec![0.0; 6], vec![0, 2], 3, 2),
            Err(DataError::LabelOutOfRange {
                row: 1,
                label: 2,
                ..
            })
        ));
        assert!(matches!(
            Dataset::new(
                vec![0.0, 0.0, 0.0, 0.0, f32::INFINITY, 0.0],
                vec![0, 1],
                3,
                2
            ),
            Err(DataError::NotFinite {
                row: 1,
                column: 1,
                ..
            })
        ));
        let empty = Dataset::new(vec![], vec![], 3, 2).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.class_counts(), vec![0, 0]);
    }

    #[test]
    fn select_and_accessors() {
        let data = Dataset::new(vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5], vec![0, 1, 1], 2, 3).unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data.beat(1), &[1.0, 1.5]);
        assert_eq!(data.get_beat(3), None);
        assert_eq!(data.class_counts(), vec![1, 2, 0]);
        let picked = data.select(&[2, 0, 2]).unwrap();
        assert_eq!(picked.rows(), &[2.0, 2.5, 0.0, 0.5, 2.0, 2.5]);
        assert_eq!(picked.labels(), &[1, 0, 1]);
        assert_eq!((picked.beat_len(), picked.num_classes()), (2, 3));
        assert!(matches!(
            data.select(&[0, 3]),
            Err(DataError::IndexOutOfRange { index: 3, len: 3 })
        ));
    }

    #[test]
    fn rows_carry_features_and_patients() {
        // Two beats of 2 samples + 1 feature.
        let data = Dataset::with_features(vec![0.0, 0.5, 9.0, 1.0, 1.5, 8.0], vec![0, 1], 2, 1, 2)
            .unwrap();
        assert_eq!(
            (data.beat_len(), data.feature_len(), data.row_len()),
            (2, 1, 3)
        );
        assert_eq!(data.row(1), &[1.0, 1.5, 8.0]);
        assert_eq!(data.beat(1), &[1.0, 1.5]);
        assert_eq!(data.features(1), &[8.0]);
        assert_eq!(data.patient_names(), &[UNKNOWN_PATIENT.to_owned()]);
        assert_eq!(data.patients(), &[0, 0]);
        let err = Dataset::with_features(vec![0.0; 5], vec![0, 1], 2, 1, 2).unwrap_err();
        assert!(
            err.to_string().contains("beat_len 2 + feature_len 1"),
            "{err}"
        );

        let named = data
            .clone()
            .with_patients(vec![1, 0], vec!["a".into(), "b".into()])
            .unwrap();
        assert_eq!((named.patient_name(0), named.patient_name(1)), ("b", "a"));
        assert_eq!(named.patient_counts(), [1, 1]);
        for (patients, names, needle) in [
            (vec![0], vec!["a".to_owned()], "one per beat"),
            (vec![0, 2], vec!["a".into(), "b".into()], "out of range"),
            (
                vec![0, 0],
                vec!["a".into(), "b".into()],
                "\"b\" has no beats",
            ),
            (vec![0, 1], vec!["a".into(), "a".into()], "named twice"),
        ] {
            let err = data.clone().with_patients(patients, names).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        // Selecting drops the patients left without beats and renumbers the others in order.
        let three = Dataset::new(vec![0.0, 1.0, 2.0], vec![0, 1, 0], 1, 2)
            .unwrap()
            .with_patients(vec![0, 1, 2], vec!["x".into(), "y".into(), "z".into()])
            .unwrap();
        let picked = three.select(&[2, 0, 2]).unwrap();
        assert_eq!(picked.patient_names(), ["x", "z"]);
        assert_eq!(picked.patients(), &[1, 0, 1]);
        assert_eq!(picked.rows(), &[2.0, 0.0, 2.0]);
    }

    #[test]
    fn concat_merges_patients_by_name_and_relabel_maps_classes() {
        let part = |rows: Vec<f32>, labels: Vec<u8>, names: &[&str]| {
            let patients = (0..labels.len() as u32)
                .map(|i| i % names.len() as u32)
                .collect();
            Dataset::new(rows, labels, 1, 5)
                .unwrap()
                .with_patients(patients, names.iter().map(|n| n.to_string()).collect())
                .unwrap()
        };
        let a = part(vec![0.0, 1.0], vec![0, 3], &["100", "101"]);
        let b = part(vec![2.0, 3.0, 4.0], vec![4, 1, 2], &["101", "102"]);
        let all = Dataset::concat(&[a, b]).unwrap();
        assert_eq!(all.patient_names(), ["100", "101", "102"]);
        assert_eq!(all.patients(), &[0, 1, 1, 2, 1]);
        assert_eq!(all.rows(), &[0.0, 1.0, 2.0, 3.0, 4.0]);
        assert!(Dataset::concat(&[]).is_err());
        let wider = Dataset::new(vec![0.0; 2], vec![0], 2, 5).unwrap();
        assert!(matches!(
            Dataset::concat(&[all.clone(), wider]),
            Err(DataError::Shape { .. })
        ));
        // Papers N L R A V into AAMI N S V (F and Q empty); drop nothing.
        let map = [Some(0), Some(0), Some(0), Some(1), Some(2)];
        let aami = all.relabel(&map, 5).unwrap();
        assert_eq!(aami.labels(), &[0, 1, 2, 0, 0]);
        assert_eq!(aami.patient_names(), all.patient_names());
        // Dropping a class drops its beats, and a patient left without beats.
        let without_v = all
            .relabel(&[Some(0), Some(1), Some(2), Some(3), None], 4)
            .unwrap();
        assert_eq!(without_v.labels(), &[0, 3, 1, 2]);
        assert_eq!(without_v.num_classes(), 4);
        assert!(all.relabel(&[Some(0); 4], 5).is_err());
        assert!(all.relabel(&[Some(7); 5], 5).is_err());
    }

    #[test]
    fn beat_files_have_patients_from_their_sources() {
        let mut src = Vec::new();
        for record in [100u32, 101, 100] {
            src.extend_from_slice(&record.to_le_bytes());
            src.extend_from_slice(&42u32.to_le_bytes());
        }
        let (patients, names) = parse_sources("mem", &src, 3).unwrap();
        assert_eq!(
            (patients, names),
            (vec![0, 1, 0], vec!["100".to_owned(), "101".to_owned()])
        );
        let err = parse_sources("mem", &src[..20], 3).unwrap_err();
        assert!(
            err.to_string().contains("mem.src.u32") && err.to_string().contains("24 bytes"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("medsplit-beats-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.f32"), f32_bytes(&[0.5; 6])).unwrap();
        std::fs::write(dir.join("x.labels"), [0, 1, 2]).unwrap();
        let plain = load_beats(&dir, "x", 2, 5).unwrap();
        assert_eq!(plain.patient_names(), [UNKNOWN_PATIENT]);
        std::fs::write(dir.join("x.src.u32"), &src).unwrap();
        let sourced = load_beats(&dir, "x", 2, 5).unwrap();
        assert_eq!(sourced.patient_names(), ["100", "101"]);
        assert_eq!(sourced.patients(), &[0, 1, 0]);
        std::fs::write(dir.join("x.src.u32"), &src[..8]).unwrap();
        assert!(load_beats(&dir, "x", 2, 5).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn csv_with_a_patient_column_and_features() {
        let layout = CsvLayout {
            patient_column: true,
            beat_len: 2,
            feature_len: 1,
        };
        let text = "0, p1, 0.1, 0.2, 0.9\n3,p2,0.3,0.4,1.1\n1,p1,0.5,0.6,0.8\n";
        let data = parse_csv_with("b.csv", text, layout, 5).unwrap();
        assert_eq!(data.patient_names(), ["p1", "p2"]);
        assert_eq!(data.patients(), &[0, 1, 0]);
        assert_eq!(data.features(1), &[1.1]);
        assert_eq!(data.beat(2), &[0.5, 0.6]);
        let err = parse_csv_with("b.csv", "0,p1,0.1,0.2\n", layout, 5).unwrap_err();
        assert!(
            err.to_string()
                .contains("label + patient + 2 samples + 1 features"),
            "{err}"
        );
        let err = parse_csv_with("b.csv", "0, ,0.1,0.2,0.3\n", layout, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Parse {
                    line: 1,
                    column: 2,
                    ..
                }
            ),
            "{err}"
        );
        let err = parse_csv_with("b.csv", "0,p,0.1,x,0.3\n", layout, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Parse {
                    line: 1,
                    column: 4,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn synthetic_is_deterministic_balanced_and_bounded() {
        let a = synthetic(503, 7);
        assert_eq!(a, synthetic(503, 7));
        assert_ne!(a.rows(), synthetic(503, 8).rows());
        assert_eq!(a.len(), 503);
        assert_eq!(a.beat_len(), SYNTHETIC_BEAT_LEN);
        assert_eq!(a.num_classes(), SYNTHETIC_CLASSES);
        assert_eq!(a.rows().len(), 503 * SYNTHETIC_BEAT_LEN);
        assert_eq!(a.class_counts(), vec![101, 101, 101, 100, 100]);
        // Shuffled, not in i % 5 order.
        assert!(
            a.labels()
                .iter()
                .enumerate()
                .any(|(i, &l)| usize::from(l) != i % 5)
        );
        assert!(
            a.rows()
                .iter()
                .all(|v| v.is_finite() && (-0.1..=1.1).contains(v))
        );
        let mean = a.rows().iter().map(|&v| f64::from(v)).sum::<f64>() / a.rows().len() as f64;
        assert!((0.3..0.6).contains(&mean), "mean {mean}");
        assert!(synthetic(0, 1).is_empty());
    }

    #[test]
    fn synthetic_classes_are_distinct() {
        let train = synthetic(500, 1);
        let test = synthetic(500, 2);
        let means = class_means(&train);
        for a in 0..SYNTHETIC_CLASSES {
            for b in a + 1..SYNTHETIC_CLASSES {
                let distance = l2(&means[a], &means[b]);
                assert!(
                    distance > 0.25,
                    "class means {a} and {b} only {distance:.3} apart"
                );
            }
        }
        let correct = (0..test.len())
            .filter(|&i| {
                let beat: Vec<f64> = test.beat(i).iter().map(|&x| f64::from(x)).collect();
                let predicted = (0..SYNTHETIC_CLASSES)
                    .min_by(|&a, &b| l2(&beat, &means[a]).total_cmp(&l2(&beat, &means[b])))
                    .unwrap_or(0);
                predicted == usize::from(test.labels()[i])
            })
            .count();
        let accuracy = correct as f64 / test.len() as f64;
        eprintln!(
            "nearest-class-mean accuracy on synthetic beats: {:.1} %",
            100.0 * accuracy
        );
        assert!(accuracy > 0.6, "nearest-mean accuracy {accuracy}");
    }

    #[test]
    fn parse_beats_round_trip() {
        let samples = vec![0.0, 0.25, -0.5, 1.0, 0.125, 0.75];
        let data = parse_beats("mem", &f32_bytes(&samples), &[4, 0], 3, 5).unwrap();
        assert_eq!(data.rows(), samples.as_slice());
        assert_eq!(data.labels(), &[4, 0]);
        assert_eq!(data.beat(1), &[1.0, 0.125, 0.75]);
    }

    #[test]
    fn parse_beats_rejects_bad_input() {
        let bytes = f32_bytes(&[0.5; 6]);
        let err = parse_beats("mem", &bytes[..bytes.len() - 1], &[0, 0], 3, 5).unwrap_err();
        assert!(
            matches!(&err, DataError::Shape { name, .. } if name == "mem.f32"),
            "{err}"
        );
        assert!(err.to_string().contains("multiple of 12 bytes"), "{err}");
        // Whole f32 values, but not a whole number of beats.
        let err = parse_beats("mem", &bytes[..16], &[0], 3, 5).unwrap_err();
        assert!(matches!(err, DataError::Shape { .. }), "{err}");

        let err = parse_beats("mem", &bytes, &[0, 0, 0], 3, 5).unwrap_err();
        assert!(
            matches!(&err, DataError::Shape { name, .. } if name == "mem.labels"),
            "{err}"
        );
        assert!(err.to_string().contains("expected 2 labels"), "{err}");
        assert!(err.to_string().contains("found 3"), "{err}");

        let err = parse_beats("mem", &bytes, &[0, 7], 3, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    row: 1,
                    label: 7,
                    num_classes: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("row 1"), "{err}");

        let err = parse_beats(
            "mem",
            &f32_bytes(&[0.0, 0.0, 0.0, 0.0, 0.0, f32::NAN]),
            &[0, 0],
            3,
            5,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                DataError::NotFinite {
                    row: 1,
                    column: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("row 1, sample 2"), "{err}");

        assert!(matches!(
            parse_beats("mem", &[], &[], 3, 5),
            Err(DataError::Empty { .. })
        ));
        assert!(matches!(
            parse_beats("mem", &bytes, &[0, 0], 0, 5),
            Err(DataError::InvalidArgument(_))
        ));
    }

    #[test]
    fn load_beats_reports_missing_file() {
        let dir = Path::new("/nonexistent/medsplit-data");
        let err = load_beats(dir, "train", 128, 5).unwrap_err();
        assert!(
            matches!(&err, DataError::Io { path, .. } if path.ends_with("train.f32")),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("/nonexistent/medsplit-data/train.f32"),
            "{err}"
        );
        assert!(matches!(
            load_beats(dir, "../x", 128, 5),
            Err(DataError::InvalidArgument(_))
        ));
    }

    #[test]
    fn parse_csv_good_file() {
        let text = "0, 0.1, 0.2,0.3\n4,1e-1,-2.5 , 3\r\n2.0,0,0,0\n\n  \n";
        let data = parse_csv("beats.csv", text, 3, 5).unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data.labels(), &[0, 4, 2]);
        assert_eq!(data.beat(0), &[0.1, 0.2, 0.3]);
        assert_eq!(data.beat(1), &[0.1, -2.5, 3.0]);
    }

    #[test]
    fn parse_csv_rejects_bad_input() {
        let err = parse_csv("b.csv", "label,s0,s1,s2\n0,1,2,3\n", 3, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Parse {
                    line: 1,
                    column: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("b.csv: line 1"), "{err}");

        let err = parse_csv("b.csv", "0,1,2,3\n1,1,2,3\n2,1,2\n", 3, 5).unwrap_err();
        assert!(matches!(err, DataError::Shape { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("b.csv") && message.contains("line 3"),
            "{message}"
        );
        assert!(
            message.contains("expected 4 fields") && message.contains("found 3"),
            "{message}"
        );

        let err = parse_csv("b.csv", "0,1,2,3\n1,1,x2,3\n", 3, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Parse {
                    line: 2,
                    column: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("\"x2\""), "{err}");

        let err = parse_csv("b.csv", "0,1,2,3\n5,1,2,3\n", 3, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    row: 1,
                    label: 5,
                    ..
                }
            ),
            "{err}"
        );
        let err = parse_csv("b.csv", "300,1,2,3\n", 3, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    row: 0,
                    label: 300,
                    ..
                }
            ),
            "{err}"
        );
        for bad_label in ["-1", "1.5", "", "NaN"] {
            let err = parse_csv("b.csv", &format!("{bad_label},1,2,3\n"), 3, 5).unwrap_err();
            assert!(
                matches!(
                    err,
                    DataError::Parse {
                        line: 1,
                        column: 1,
                        ..
                    }
                ),
                "{err}"
            );
        }

        for bad_value in ["NaN", "inf", "-inf", "infinity", "1e39"] {
            let err =
                parse_csv("b.csv", &format!("0,1,2,3\n1,1,{bad_value},3\n"), 3, 5).unwrap_err();
            assert!(
                matches!(
                    err,
                    DataError::NotFinite {
                        row: 1,
                        column: 1,
                        ..
                    }
                ),
                "{bad_value}: {err}"
            );
        }

        let err = parse_csv("b.csv", "0,1,2,3\n\n1,1,2,3\n", 3, 5).unwrap_err();
        assert!(matches!(err, DataError::Parse { line: 2, .. }), "{err}");
        assert!(matches!(
            parse_csv("b.csv", "\n \n", 3, 5),
            Err(DataError::Empty { .. })
        ));
        // Absurd sizes are reported, not a panic or a huge allocation.
        assert!(matches!(
            parse_csv("b.csv", "0,1\n", usize::MAX, 5),
            Err(DataError::Shape { .. })
        ));
        assert!(parse_beats("mem", &[0; 8], &[0], usize::MAX, 5).is_err());
        assert!(Dataset::new(vec![], vec![0, 0], usize::MAX, 5).is_err());
    }

    #[test]
    fn load_csv_round_trip_and_missing_file() {
        let path =
            std::env::temp_dir().join(format!("medsplit-data-test-{}.csv", std::process::id()));
        std::fs::write(&path, "1,0.5,0.25\n3,0,1\n").unwrap();
        let loaded = load_csv(&path, 2, 4);
        std::fs::remove_file(&path).unwrap();
        let data = loaded.unwrap();
        assert_eq!(data.labels(), &[1, 3]);
        assert_eq!(data.rows(), &[0.5, 0.25, 0.0, 1.0]);
        let err = load_csv(&path, 2, 4).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
    }

    #[test]
    fn load_beats_reference_data() {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/mitbih"
        ));
        if !dir.is_dir() {
            eprintln!("SKIPPED: reference data not found at {}", dir.display());
            return;
        }
        for split in ["train", "test"] {
            let data = load_beats(dir, split, 128, 5).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(data.len(), 13245, "{split}");
            assert_eq!(
                data.class_counts(),
                vec![3000, 3000, 3000, 1245, 3000],
                "{split}"
            );
            assert!(
                data.rows().iter().all(|v| (-0.02..=1.01).contains(v)),
                "{split}: value outside [-0.02, 1.01]"
            );
        }
    }
}
