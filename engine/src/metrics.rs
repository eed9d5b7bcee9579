//! Clinical classification metrics from a confusion matrix, as the field prints them.
//!
//! A [`Confusion`] counts test beats by true class (rows) and predicted class (columns). Every
//! figure derives from those counts, so hospitals report counts and the coordinator can pool
//! them over hospitals ([`Confusion::merge`]) without ever seeing a beat.
//!
//! Definitions follow scikit-learn (`confusion_matrix`, `classification_report`,
//! `balanced_accuracy_score`):
//! - sensitivity (recall) of class `c` = `tp / (tp + fn)`, PPV (precision) = `tp / (tp + fp)`,
//!   F1 = `2 · se · ppv / (se + ppv)`, support = beats whose true class is `c`;
//! - a ratio whose denominator is 0 is 0 (scikit-learn's `zero_division` default);
//! - macro-F1 is the mean F1 over the classes that occur in the test set or in the predictions
//!   (scikit-learn without `labels`); a class absent from both is left out;
//! - balanced accuracy is the mean sensitivity over the classes that occur in the test set;
//! - the majority-class rate is the share of the most frequent true class: the accuracy of
//!   answering that class to every beat, the floor any model must clear.
//!
//! An empty matrix has every figure 0.
//!
//! The JSON form ([`Confusion`]'s `Serialize`) is
//! `{"accuracy", "majority_rate", "macro_f1", "balanced_accuracy",
//! "per_class": {"N": {"se", "ppv", "f1", "support"}, …}, "confusion": [[…]]}`,
//! `per_class` in class order. Reading it back takes the class names from `per_class` and the
//! counts from `confusion`, and recomputes the rest.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most classes a confusion matrix may have.
pub const MAX_CLASSES: usize = 64;

/// The most characters of a class name.
pub const MAX_CLASS_NAME: usize = 32;

/// Which kind of split the test set came from. Every reported figure carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalKind {
    /// Whole patients: no patient has beats on both sides. What a new patient would see.
    Patient,
    /// Beats drawn at random: the same patients' beats are on both sides, which flatters the
    /// model.
    Beat,
}

impl EvalKind {
    /// The JSON name: `patient` or `beat`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patient => "patient",
            Self::Beat => "beat",
        }
    }

    /// Parses the JSON name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "patient" => Some(Self::Patient),
            "beat" => Some(Self::Beat),
            _ => None,
        }
    }

    /// How a report labels figures of this kind.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Patient => "patient-wise (test patients unseen in training)",
            Self::Beat => "beat-wise (same patients in training and test)",
        }
    }
}

impl fmt::Display for EvalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A confusion matrix that does not fit its class names, or two that cannot be pooled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    #[error("a confusion matrix needs 1 to {MAX_CLASSES} classes, got {0}")]
    ClassCount(usize),
    #[error("class {index}: a name is 1 to {MAX_CLASS_NAME} characters, got {len}")]
    ClassName { index: usize, len: usize },
    #[error("class {0:?} is named twice")]
    DuplicateClass(String),
    #[error("the confusion matrix has {rows} rows for {classes} classes")]
    Rows { rows: usize, classes: usize },
    #[error("row {row} of the confusion matrix has {len} counts for {classes} classes")]
    Row {
        row: usize,
        len: usize,
        classes: usize,
    },
    #[error("the confusion matrix counts more than {} beats", u64::MAX)]
    Overflow,
    #[error("cannot pool matrices of classes {left:?} and {right:?}")]
    Classes {
        left: Vec<String>,
        right: Vec<String>,
    },
}

/// Counts of beats by true class (rows) and predicted class (columns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confusion {
    classes: Vec<String>,
    /// Row-major `[classes, classes]`.
    counts: Vec<u64>,
}

/// The per-class figures of one class.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Sensitivity (recall): the share of this class's beats predicted as it.
    pub se: f64,
    /// Positive predictive value (precision): the share of beats predicted as this class that
    /// are of it.
    pub ppv: f64,
    pub f1: f64,
    /// Beats of this class in the test set.
    pub support: u64,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn check_classes(classes: &[String]) -> Result<(), MetricsError> {
    if classes.is_empty() || classes.len() > MAX_CLASSES {
        return Err(MetricsError::ClassCount(classes.len()));
    }
    for (index, name) in classes.iter().enumerate() {
        let len = name.chars().count();
        if len == 0 || len > MAX_CLASS_NAME {
            return Err(MetricsError::ClassName { index, len });
        }
        if classes[..index].contains(name) {
            return Err(MetricsError::DuplicateClass(name.clone()));
        }
    }
    Ok(())
}

impl Confusion {
    /// An empty matrix over `classes`.
    pub fn new(classes: impl IntoIterator<Item: Into<String>>) -> Result<Self, MetricsError> {
        let classes: Vec<String> = classes.into_iter().map(Into::into).collect();
        check_classes(&classes)?;
        let counts = vec![0; classes.len() * classes.len()];
        Ok(Self { classes, counts })
    }

    /// The matrix of `(true, predicted)` class index pairs.
    ///
    /// # Panics
    /// If an index is not below the number of classes.
    pub fn from_pairs(
        classes: impl IntoIterator<Item: Into<String>>,
        pairs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Result<Self, MetricsError> {
        let mut confusion = Self::new(classes)?;
        for (truth, predicted) in pairs {
            confusion.add(truth, predicted);
        }
        Ok(confusion)
    }

    /// A matrix from its rows (true classes) of counts by predicted class, checked against
    /// `classes`: what arrives from elsewhere goes through here.
    pub fn from_counts(classes: Vec<String>, rows: &[Vec<u64>]) -> Result<Self, MetricsError> {
        check_classes(&classes)?;
        let n = classes.len();
        if rows.len() != n {
            return Err(MetricsError::Rows {
                rows: rows.len(),
                classes: n,
            });
        }
        let mut counts = Vec::with_capacity(n * n);
        let mut total = 0u64;
        for (row, values) in rows.iter().enumerate() {
            if values.len() != n {
                return Err(MetricsError::Row {
                    row,
                    len: values.len(),
                    classes: n,
                });
            }
            for &v in values {
                total = total.checked_add(v).ok_or(MetricsError::Overflow)?;
            }
            counts.extend_from_slice(values);
        }
        Ok(Self { classes, counts })
    }

    /// Counts one beat of class `truth` predicted as `predicted`.
    ///
    /// # Panics
    /// If an index is not below the number of classes.
    pub fn add(&mut self, truth: usize, predicted: usize) {
        let n = self.classes.len();
        assert!(
            truth < n && predicted < n,
            "class index ({truth}, {predicted}) out of range for {n} classes"
        );
        self.counts[truth * n + predicted] += 1;
    }

    /// Adds `other`'s counts to these: the pooled matrix of both test sets.
    pub fn merge(&mut self, other: &Confusion) -> Result<(), MetricsError> {
        if self.classes != other.classes {
            return Err(MetricsError::Classes {
                left: self.classes.clone(),
                right: other.classes.clone(),
            });
        }
        let mut summed = self.counts.clone();
        let mut total = 0u64;
        for (a, &b) in summed.iter_mut().zip(&other.counts) {
            *a = a.checked_add(b).ok_or(MetricsError::Overflow)?;
            total = total.checked_add(*a).ok_or(MetricsError::Overflow)?;
        }
        self.counts = summed;
        Ok(())
    }

    /// The pooled matrix of several test sets; `None` when there are none.
    pub fn pooled<'a>(
        matrices: impl IntoIterator<Item = &'a Confusion>,
    ) -> Result<Option<Confusion>, MetricsError> {
        let mut matrices = matrices.into_iter();
        let Some(first) = matrices.next() else {
            return Ok(None);
        };
        let mut pooled = first.clone();
        for m in matrices {
            pooled.merge(m)?;
        }
        Ok(Some(pooled))
    }

    /// The class names, in row (and column) order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Beats of true class `truth` predicted as `predicted`.
    pub fn count(&self, truth: usize, predicted: usize) -> u64 {
        self.counts[truth * self.classes.len() + predicted]
    }

    /// The rows: counts by predicted class, one row per true class.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts
            .chunks(self.classes.len())
            .map(<[u64]>::to_vec)
            .collect()
    }

    /// All beats counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Beats of true class `c`.
    pub fn support(&self, c: usize) -> u64 {
        let n = self.classes.len();
        self.counts[c * n..(c + 1) * n].iter().sum()
    }

    /// Beats predicted as class `c`.
    pub fn predicted(&self, c: usize) -> u64 {
        let n = self.classes.len();
        (0..n).map(|t| self.counts[t * n + c]).sum()
    }

    /// Sensitivity (recall) of class `c`; 0 when the class has no beats.
    pub fn sensitivity(&self, c: usize) -> f64 {
        ratio(self.count(c, c), self.support(c))
    }

    /// Positive predictive value (precision) of class `c`; 0 when nothing is predicted as it.
    pub fn ppv(&self, c: usize) -> f64 {
        ratio(self.count(c, c), self.predicted(c))
    }

    /// F1 of class `c`: the harmonic mean of sensitivity and PPV; 0 when both are 0.
    pub fn f1(&self, c: usize) -> f64 {
        let (se, ppv) = (self.sensitivity(c), self.ppv(c));
        if se + ppv == 0.0 {
            0.0
        } else {
            2.0 * se * ppv / (se + ppv)
        }
    }

    /// The figures of class `c`.
    pub fn class_metrics(&self, c: usize) -> ClassMetrics {
        ClassMetrics {
            se: self.sensitivity(c),
            ppv: self.ppv(c),
            f1: self.f1(c),
            support: self.support(c),
        }
    }

    /// The figures of every class, in class order.
    pub fn per_class(&self) -> Vec<ClassMetrics> {
        (0..self.classes.len())
            .map(|c| self.class_metrics(c))
            .collect()
    }

    /// The share of beats predicted as their true class.
    pub fn accuracy(&self) -> f64 {
        let n = self.classes.len();
        ratio((0..n).map(|c| self.count(c, c)).sum(), self.total())
    }

    /// Mean F1 over the classes present in the test set or the predictions.
    pub fn macro_f1(&self) -> f64 {
        let present: Vec<usize> = (0..self.classes.len())
            .filter(|&c| self.support(c) > 0 || self.predicted(c) > 0)
            .collect();
        mean(present.iter().map(|&c| self.f1(c)), present.len())
    }

    /// Mean sensitivity over the classes present in the test set.
    pub fn balanced_accuracy(&self) -> f64 {
        let present: Vec<usize> = (0..self.classes.len())
            .filter(|&c| self.support(c) > 0)
            .collect();
        mean(present.iter().map(|&c| self.sensitivity(c)), present.len())
    }

    /// The share of the most frequent true class: the accuracy of always answering it.
    pub fn majority_rate(&self) -> f64 {
        let most = (0..self.classes.len())
            .map(|c| self.support(c))
            .max()
            .unwrap_or(0);
        ratio(most, self.total())
    }
}

fn mean(values: impl Iterator<Item = f64>, len: usize) -> f64 {
    if len == 0 {
        0.0
    } else {
        values.sum::<f64>() / len as f64
    }
}

/// `per_class` of the JSON form: a map in class order.
struct PerClass<'a>(&'a Confusion);

impl Serialize for PerClass<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.classes.len()))?;
        for (c, name) in self.0.classes.iter().enumerate() {
            map.serialize_entry(name, &self.0.class_metrics(c))?;
        }
        map.end()
    }
}

impl Serialize for Confusion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Confusion", 6)?;
        s.serialize_field("accuracy", &self.accuracy())?;
        s.serialize_field("majority_rate", &self.majority_rate())?;
        s.serialize_field("macro_f1", &self.macro_f1())?;
        s.serialize_field("balanced_accuracy", &self.balanced_accuracy())?;
        s.serialize_field("per_class", &PerClass(self))?;
        s.serialize_field("confusion", &self.rows())?;
        s.end()
    }
}

/// The class names of `per_class`, in the order they appear.
struct ClassNames(Vec<String>);

impl<'de> Deserialize<'de> for ClassNames {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> Visitor<'de> for Names {
            type Value = ClassNames;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from class name to its figures")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ClassNames, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    map.next_value::<de::IgnoredAny>()?;
                    names.push(name);
                }
                Ok(ClassNames(names))
            }
        }
        deserializer.deserialize_map(Names)
    }
}

impl<'de> Deserialize<'de> for Confusion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Form {
            per_class: ClassNames,
            confusion: Vec<Vec<u64>>,
        }
        let form = Form::deserialize(deserializer)?;
        Confusion::from_counts(form.per_class.0, &form.confusion).map_err(de::Error::custom)
    }
}

/// One line of a [`text_report`]: a named test set's matrix, and the kind of split it came
/// from when known.
pub struct ReportRow<'a> {
    pub name: &'a str,
    pub kind: Option<EvalKind>,
    pub confusion: &'a Confusion,
}

/// The text report the CLIs print: one line per row (beats, accuracy next to the
/// majority-class rate, macro-F1, balanced accuracy; the split's kind when any row has one),
/// then per-class sensitivity, PPV, F1 and support of the rows in `per_class`. `label` heads
/// the first column (e.g. `hospital`, `record`).
pub fn text_report(label: &str, rows: &[ReportRow], per_class: &[ReportRow]) -> String {
    use std::fmt::Write as _;
    let pct = |x: f64| format!("{:.2} %", 100.0 * x);
    let with_kind = rows.iter().any(|r| r.kind.is_some());
    let width = rows
        .iter()
        .chain(per_class)
        .map(|r| r.name.chars().count())
        .chain([label.chars().count(), 6])
        .max()
        .unwrap_or(6);
    let kind_cell = |kind: &str| {
        if with_kind {
            format!("  {kind:<7}")
        } else {
            String::new()
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {label:<width$}{}  {:>7}  {:>9}  {:>9}  {:>8}  {:>9}",
        kind_cell("split"),
        "beats",
        "accuracy",
        "majority",
        "macro-F1",
        "bal. acc."
    );
    for r in rows {
        let c = r.confusion;
        let _ = writeln!(
            out,
            "  {:<width$}{}  {:>7}  {:>9}  {:>9}  {:>8.3}  {:>9}",
            r.name,
            kind_cell(r.kind.map_or("?", EvalKind::as_str)),
            c.total(),
            pct(c.accuracy()),
            pct(c.majority_rate()),
            c.macro_f1(),
            pct(c.balanced_accuracy()),
        );
    }
    if per_class.is_empty() {
        return out;
    }
    let class_width = per_class
        .iter()
        .flat_map(|r| r.confusion.classes())
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(1);
    let _ = writeln!(
        out,
        "  {:<width$}  {:<class_width$}  {:>8}  {:>8}  {:>6}  {:>7}",
        "per class", "", "Se", "PPV", "F1", "support"
    );
    for r in per_class {
        for (i, m) in r.confusion.per_class().iter().enumerate() {
            let _ = writeln!(
                out,
                "  {:<width$}  {:<class_width$}  {:>8}  {:>8}  {:>6.3}  {:>7}",
                if i == 0 { r.name } else { "" },
                r.confusion.classes()[i],
                pct(m.se),
                pct(m.ppv),
                m.f1,
                m.support,
            );
        }
    }
    out
}

/// The matrix as text: rows the true class, columns the predicted class.
pub fn confusion_text(c: &Confusion) -> String {
    use std::fmt::Write as _;
    const CORNER: &str = "true \\ predicted";
    let width = c
        .classes()
        .iter()
        .map(|n| n.chars().count())
        .chain(c.rows().iter().flatten().map(|v| v.to_string().len()))
        .max()
        .unwrap_or(1)
        .max(4);
    let label = c
        .classes()
        .iter()
        .map(|n| n.chars().count())
        .chain([CORNER.len()])
        .max()
        .unwrap_or(0);
    let mut out = format!("  {CORNER:<label$}");
    for name in c.classes() {
        let _ = write!(out, "  {name:>width$}");
    }
    out.push('\n');
    for (name, row) in c.classes().iter().zip(c.rows()) {
        let _ = write!(out, "  {name:<label$}");
        for v in row {
            let _ = write!(out, "  {v:>width$}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPS: f64 = 1e-12;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < EPS
    }

    /// scikit-learn's `classification_report` example: y_true = [0, 1, 2, 2, 2],
    /// y_pred = [0, 0, 2, 2, 1]; precision 0.50/0.00/1.00, recall 1.00/0.00/0.67,
    /// F1 0.67/0.00/0.80, support 1/1/3, accuracy 0.60, macro F1 0.49.
    fn report_example() -> Confusion {
        let truth = [0, 1, 2, 2, 2];
        let pred = [0, 0, 2, 2, 1];
        Confusion::from_pairs(
            ["class 0", "class 1", "class 2"],
            truth.into_iter().zip(pred),
        )
        .unwrap()
    }

    #[test]
    fn classification_report_example() {
        let m = report_example();
        assert_eq!(m.rows(), vec![vec![1, 0, 0], vec![1, 0, 0], vec![0, 1, 2]]);
        let ppv: Vec<f64> = (0..3).map(|c| m.ppv(c)).collect();
        let se: Vec<f64> = (0..3).map(|c| m.sensitivity(c)).collect();
        let f1: Vec<f64> = (0..3).map(|c| m.f1(c)).collect();
        assert_eq!(ppv, vec![0.5, 0.0, 1.0]);
        assert!(close(se[0], 1.0) && close(se[1], 0.0) && close(se[2], 2.0 / 3.0));
        assert!(close(f1[0], 2.0 / 3.0) && close(f1[1], 0.0) && close(f1[2], 0.8));
        assert_eq!((m.support(0), m.support(1), m.support(2)), (1, 1, 3));
        assert!(close(m.accuracy(), 0.6));
        // (2/3 + 0 + 0.8) / 3 = 0.4888…, printed 0.49.
        assert!(close(m.macro_f1(), (2.0 / 3.0 + 0.8) / 3.0));
        // Mean recall (1 + 0 + 2/3) / 3 = 0.5555…, printed 0.56 as the macro recall.
        assert!(close(m.balanced_accuracy(), (1.0 + 2.0 / 3.0) / 3.0));
        // Class 2 holds 3 of the 5 beats.
        assert!(close(m.majority_rate(), 0.6));
        assert_eq!(m.total(), 5);
    }

    /// scikit-learn's `confusion_matrix` example.
    #[test]
    fn confusion_matrix_example() {
        let truth = [2, 0, 2, 2, 0, 1];
        let pred = [0, 0, 2, 2, 0, 2];
        let m = Confusion::from_pairs(["a", "b", "c"], truth.into_iter().zip(pred)).unwrap();
        assert_eq!(m.rows(), vec![vec![2, 0, 0], vec![0, 0, 1], vec![1, 0, 2]]);
    }

    /// scikit-learn's `balanced_accuracy_score` example: 0.625.
    #[test]
    fn balanced_accuracy_example() {
        let truth = [0, 1, 0, 0, 1, 0];
        let pred = [0, 1, 0, 0, 0, 1];
        let m = Confusion::from_pairs(["0", "1"], truth.into_iter().zip(pred)).unwrap();
        assert!(close(m.balanced_accuracy(), 0.625));
        assert!(close(m.accuracy(), 4.0 / 6.0));
        assert!(close(m.majority_rate(), 4.0 / 6.0));
    }

    /// scikit-learn's `f1_score` and `precision_score` examples: macro F1 0.2666…, per-class
    /// F1 [0.8, 0, 0], per-class precision [0.666…, 0, 0].
    #[test]
    fn f1_and_precision_examples() {
        let truth = [0, 1, 2, 0, 1, 2];
        let pred = [0, 2, 1, 0, 0, 1];
        let m = Confusion::from_pairs(["0", "1", "2"], truth.into_iter().zip(pred)).unwrap();
        assert!(close(m.f1(0), 0.8) && m.f1(1) == 0.0 && m.f1(2) == 0.0);
        assert!(close(m.macro_f1(), 0.8 / 3.0));
        assert!(close(m.ppv(0), 2.0 / 3.0) && m.ppv(1) == 0.0 && m.ppv(2) == 0.0);
    }

    /// Zero division gives 0, as scikit-learn's default: precision of a class never
    /// predicted, recall of a class never present, F1 when both are 0.
    #[test]
    fn zero_division_is_zero() {
        // scikit-learn's precision_score example with y_pred all 0: precision [1/3, 0, 0].
        let truth = [0, 1, 2, 0, 1, 2];
        let m = Confusion::from_pairs(["0", "1", "2"], truth.into_iter().map(|t| (t, 0))).unwrap();
        assert!(close(m.ppv(0), 1.0 / 3.0));
        assert_eq!((m.ppv(1), m.ppv(2)), (0.0, 0.0));
        assert_eq!((m.f1(1), m.f1(2)), (0.0, 0.0));

        // A class predicted but never present: recall 0, precision 0, F1 0, and it counts in
        // macro-F1 but not in balanced accuracy.
        let m = Confusion::from_pairs(["N", "V", "Q"], [(0, 0), (0, 2), (1, 1)]).unwrap();
        assert_eq!(m.class_metrics(2).se, 0.0);
        assert_eq!(m.class_metrics(2).ppv, 0.0);
        assert_eq!(m.class_metrics(2).support, 0);
        assert!(close(m.macro_f1(), (2.0 / 3.0 + 1.0 + 0.0) / 3.0));
        assert!(close(m.balanced_accuracy(), (0.5 + 1.0) / 2.0));

        // A class neither present nor predicted is left out of both averages.
        let m = Confusion::from_pairs(["N", "V", "F"], [(0, 0), (1, 1)]).unwrap();
        assert_eq!((m.macro_f1(), m.balanced_accuracy()), (1.0, 1.0));

        let empty = Confusion::new(["N", "V"]).unwrap();
        assert_eq!(
            (
                empty.accuracy(),
                empty.macro_f1(),
                empty.balanced_accuracy(),
                empty.majority_rate()
            ),
            (0.0, 0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn pooling_adds_counts_and_recomputes_the_figures() {
        let a = Confusion::from_pairs(["N", "V"], [(0, 0), (0, 0), (1, 0)]).unwrap();
        let b = Confusion::from_pairs(["N", "V"], [(1, 1), (1, 1), (0, 1)]).unwrap();
        let pooled = Confusion::pooled([&a, &b]).unwrap().unwrap();
        assert_eq!(pooled.rows(), vec![vec![2, 1], vec![1, 2]]);
        assert!(close(pooled.sensitivity(1), 2.0 / 3.0));
        assert!(close(pooled.accuracy(), 4.0 / 6.0));
        assert!(close(pooled.majority_rate(), 0.5));
        assert_eq!(Confusion::pooled([]).unwrap(), None);

        let other = Confusion::new(["N", "S"]).unwrap();
        assert!(matches!(
            pooled.clone().merge(&other),
            Err(MetricsError::Classes { .. })
        ));
        let mut full =
            Confusion::from_counts(names(&["N", "V"]), &[vec![u64::MAX, 0], vec![0, 0]]).unwrap();
        assert_eq!(full.merge(&a), Err(MetricsError::Overflow));
        assert_eq!(full.count(0, 0), u64::MAX, "a failed merge changes nothing");
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn counts_from_elsewhere_are_checked() {
        let ok = Confusion::from_counts(names(&["N", "V"]), &[vec![3, 1], vec![0, 2]]).unwrap();
        assert_eq!((ok.total(), ok.support(0), ok.predicted(0)), (6, 4, 3));
        let bad = [
            (names(&[]), vec![], MetricsError::ClassCount(0)),
            (
                names(&["N", ""]),
                vec![vec![0, 0], vec![0, 0]],
                MetricsError::ClassName { index: 1, len: 0 },
            ),
            (
                names(&["N", "N"]),
                vec![vec![0, 0], vec![0, 0]],
                MetricsError::DuplicateClass("N".into()),
            ),
            (
                names(&["N", "V"]),
                vec![vec![0, 0]],
                MetricsError::Rows {
                    rows: 1,
                    classes: 2,
                },
            ),
            (
                names(&["N", "V"]),
                vec![vec![0, 0], vec![0]],
                MetricsError::Row {
                    row: 1,
                    len: 1,
                    classes: 2,
                },
            ),
            (
                names(&["N", "V"]),
                vec![vec![u64::MAX, 1], vec![0, 0]],
                MetricsError::Overflow,
            ),
        ];
        for (classes, rows, want) in bad {
            assert_eq!(Confusion::from_counts(classes, &rows), Err(want));
        }
        let many: Vec<String> = (0..=MAX_CLASSES).map(|i| format!("c{i}")).collect();
        assert_eq!(
            Confusion::new(many),
            Err(MetricsError::ClassCount(MAX_CLASSES + 1))
        );
    }

    #[test]
    fn json_has_the_benchmark_shape_and_reads_back() {
        let m = report_example();
        let json = serde_json::to_value(&m).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut want = vec![
            "accuracy",
            "majority_rate",
            "macro_f1",
            "balanced_accuracy",
            "per_class",
            "confusion",
        ];
        want.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(json["accuracy"], 0.6);
        assert_eq!(json["majority_rate"], 0.6);
        assert_eq!(json["per_class"]["class 0"]["ppv"], 0.5);
        assert_eq!(json["per_class"]["class 2"]["f1"], 0.8);
        assert_eq!(json["per_class"]["class 2"]["support"], 3);
        assert_eq!(json["per_class"]["class 1"]["se"], 0.0);
        assert_eq!(
            json["confusion"],
            serde_json::json!([[1, 0, 0], [1, 0, 0], [0, 1, 2]])
        );

        // Class order survives the text form, even against alphabetical order.
        let m = Confusion::from_pairs(["V", "N", "S"], [(0, 0), (1, 2), (2, 2)]).unwrap();
        let text = serde_json::to_string(&m).unwrap();
        let v = text.find("\"V\"").unwrap();
        let n = text.find("\"N\"").unwrap();
        assert!(v < n, "per_class is in class order: {text}");
        let back: Confusion = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);

        let wrong = r#"{"per_class":{"N":{},"V":{}},"confusion":[[1,2]]}"#;
        let err = serde_json::from_str::<Confusion>(wrong).unwrap_err();
        assert!(err.to_string().contains("2 classes"), "{err}");
    }

    #[test]
    fn eval_kind_names() {
        assert_eq!(
            serde_json::to_string(&EvalKind::Patient).unwrap(),
            "\"patient\""
        );
        assert_eq!(serde_json::to_string(&EvalKind::Beat).unwrap(), "\"beat\"");
        for kind in [EvalKind::Patient, EvalKind::Beat] {
            assert_eq!(EvalKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EvalKind::parse("record"), None);
    }
}
