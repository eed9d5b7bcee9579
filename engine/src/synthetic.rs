//! A synthetic cohort: patients whose continuous ECG records stand in for real ones in demos
//! and tests, so that those split by patient and cut beats with any [`Preprocessing`].
//!
//! Each patient gets a record of one lead (`MLII`, 360 Hz, format-212 digital values) and its
//! beat annotations. The patient draws once, from the cohort's seed and its index:
//!
//! - a **dominant beat**: normal (N), left or right bundle-branch block (L, R), in turn by
//!   patient index (patients 0, 3, 6, ... N; 1, 4, ... L; 2, 5, ... R), each with the
//!   patient's own wave amplitudes, widths and timings;
//! - a **heart rate** (mean RR 0.65 to 1.1 s), beat-to-beat variability and a slow
//!   respiratory modulation;
//! - its shares of **ectopic beats**: atrial premature beats (A, AAMI S: the dominant QRS with
//!   an abnormal P wave, coming early at 55 to 75 % of the RR interval, followed by a
//!   non-compensatory pause) and premature ventricular contractions (V: no P wave, a wide
//!   bizarre QRS of the patient's own polarity, early at 60 to 80 % of the RR, followed by a
//!   full compensatory pause), each 8 to 20 % of its beats;
//! - its **recording**: overall amplitude, baseline wander, white noise.
//!
//! Beats are sums of Gaussian waves (as ECGSYN does) placed on the record's time line, so a
//! premature beat shows the previous beat's T wave in its window, as real ones do. Annotations
//! are at the R peaks (symbols `N`, `L`, `R`, `A`, `V`), with a rhythm annotation (`+`) at the
//! first and the last sample; the papers' window rules ([`crate::preprocess::BeatSelection::Papers`])
//! drop each record's first and last beat, [`crate::preprocess::BeatSelection::All`] keeps
//! every beat.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::{Dataset, normal, uniform, unit};
use crate::preprocess::{self, LabelSet, Preprocessing};
use crate::wfdb::{Annotation, Record, WfdbError, annotation_symbol, parse_header};

/// Patients and beats of a synthetic cohort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cohort {
    /// Number of patients (one record each).
    pub patients: usize,
    /// Beats in all, shared as evenly as possible (the first patients get one more).
    pub beats: usize,
    /// The same seed gives the same cohort.
    pub seed: u64,
}

/// Sampling rate of the synthetic records.
pub const SAMPLING_FREQUENCY: f64 = 360.0;
/// ADC units per mV, and the digital value of 0 mV (as MIT-BIH).
const GAIN: f64 = 200.0;
const ADC_ZERO: f64 = 1024.0;
/// Seconds of signal before the first and after the last beat.
const MARGIN_S: f64 = 1.0;

/// One Gaussian wave: amplitude (mV), centre (s from the R peak), width (s).
#[derive(Clone, Copy, Debug)]
struct Wave {
    amplitude: f64,
    centre: f64,
    width: f64,
}

const fn wave(amplitude: f64, centre: f64, width: f64) -> Wave {
    Wave {
        amplitude,
        centre,
        width,
    }
}

/// The beat kinds of the generator, with their annotation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    N,
    L,
    R,
    A,
    V,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::N => 1,
            Kind::L => 2,
            Kind::R => 3,
            Kind::A => 8,
            Kind::V => 5,
        }
    }
}

/// What a patient drew: templates, rhythm and recording.
struct Patient {
    dominant: Kind,
    /// Waves of the dominant beat.
    dominant_waves: Vec<Wave>,
    /// Waves of the patient's ventricular ectopic beat.
    ventricular_waves: Vec<Wave>,
    /// The ectopic P wave of its atrial premature beats.
    ectopic_p: Wave,
    rr_s: f64,
    variability: f64,
    breathing_hz: f64,
    a_share: f64,
    v_share: f64,
    scale: f64,
    noise_mv: f64,
    wander_mv: f64,
    wander_hz: f64,
    wander_phase: f64,
}

impl Patient {
    fn draw(index: usize, rng: &mut ChaCha8Rng) -> Self {
        // Per-patient variation of a template: each wave's amplitude, width and timing.
        let vary = |rng: &mut ChaCha8Rng, waves: Vec<Wave>| -> Vec<Wave> {
            waves
                .into_iter()
                .map(|w| Wave {
                    amplitude: w.amplitude * uniform(rng, 0.8, 1.2),
                    centre: w.centre * uniform(rng, 0.9, 1.1) + 0.004 * normal(rng),
                    width: w.width * uniform(rng, 0.85, 1.2),
                })
                .collect()
        };
        let dominant = [Kind::N, Kind::L, Kind::R][index % 3];
        let template = match dominant {
            // Small upright P, narrow QRS, upright T.
            Kind::N => vec![
                wave(uniform(rng, 0.08, 0.2), -0.2, 0.025),
                wave(-0.12, -0.035, 0.010),
                wave(1.0, 0.0, 0.011),
                wave(-0.25, 0.035, 0.010),
                wave(uniform(rng, 0.15, 0.4), 0.23, 0.045),
            ],
            // No Q, broad notched R, small terminal S, discordant (inverted) T.
            Kind::L => {
                let notch = uniform(rng, 0.035, 0.065);
                vec![
                    wave(uniform(rng, 0.05, 0.16), -0.22, 0.028),
                    wave(0.7, -notch / 2.0, 0.020),
                    wave(uniform(rng, 0.55, 0.85), notch / 2.0, 0.020),
                    wave(-0.1, 0.085, 0.015),
                    wave(uniform(rng, -0.4, -0.1), 0.25, 0.05),
                ]
            }
            // rSR' with a wide terminal S.
            _ => vec![
                wave(uniform(rng, 0.06, 0.2), -0.2, 0.025),
                wave(0.6, -0.015, 0.010),
                wave(-0.35, 0.012, 0.010),
                wave(uniform(rng, 0.3, 0.9), 0.040, 0.015),
                wave(-0.3, 0.085, 0.022),
                wave(uniform(rng, 0.12, 0.35), 0.24, 0.045),
            ],
        };
        let dominant_waves = vary(rng, template);
        let polarity = if unit(rng) < 0.3 { -1.0 } else { 1.0 };
        let width = uniform(rng, 0.022, 0.04);
        let t_amplitude = uniform(rng, -0.55, -0.25);
        let ventricular_waves = vary(
            rng,
            vec![
                wave(1.3 * polarity, 0.0, width),
                wave(-0.6 * polarity, 0.04 + 1.2 * width, 0.03),
                wave(t_amplitude * polarity, 0.26, 0.06),
            ],
        );
        let p_amplitude = if unit(rng) < 0.65 {
            uniform(rng, -0.18, -0.05)
        } else {
            uniform(rng, 0.05, 0.15)
        };
        Self {
            dominant,
            dominant_waves,
            ventricular_waves,
            ectopic_p: wave(p_amplitude, uniform(rng, -0.17, -0.12), 0.022),
            rr_s: uniform(rng, 0.65, 1.1),
            variability: uniform(rng, 0.01, 0.04),
            breathing_hz: uniform(rng, 0.2, 0.33),
            a_share: uniform(rng, 0.08, 0.2),
            v_share: uniform(rng, 0.08, 0.2),
            scale: uniform(rng, 0.6, 1.6),
            noise_mv: uniform(rng, 0.005, 0.03),
            wander_mv: uniform(rng, 0.02, 0.3),
            wander_hz: uniform(rng, 0.1, 0.4),
            wander_phase: uniform(rng, 0.0, std::f64::consts::TAU),
        }
    }

    /// The waves of one beat of `kind`, with a little beat-to-beat variation.
    fn beat(&self, kind: Kind, rng: &mut ChaCha8Rng) -> Vec<Wave> {
        let waves = match kind {
            Kind::V => self.ventricular_waves.clone(),
            Kind::A => {
                // The dominant conduction with an ectopic P wave, earlier and often inverted.
                let mut waves = self.dominant_waves.clone();
                waves[0] = self.ectopic_p;
                waves
            }
            _ => self.dominant_waves.clone(),
        };
        waves
            .into_iter()
            .map(|w| Wave {
                amplitude: w.amplitude * uniform(rng, 0.93, 1.07),
                width: w.width * uniform(rng, 0.95, 1.05),
                ..w
            })
            .collect()
    }
}

impl Cohort {
    /// The name of patient `index` (also its record's name).
    pub fn patient_name(&self, index: usize) -> String {
        format!("syn{}-{index}", self.seed)
    }

    /// Beats of patient `index`.
    pub fn beats_of(&self, index: usize) -> usize {
        let patients = self.patients.max(1);
        self.beats / patients + usize::from(index < self.beats % patients)
    }

    /// Patient `index`'s record and its annotations (see the [module docs](self)).
    ///
    /// # Shapes
    /// One signal of `num_samples` values; one annotation per beat and two rhythm annotations.
    pub fn record(&self, index: usize) -> (Record, Vec<Annotation>) {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(index as u64 + 1),
        );
        let patient = Patient::draw(index, &mut rng);
        let count = self.beats_of(index);

        // The rhythm: each beat's kind and time.
        let mut beats: Vec<(Kind, f64)> = Vec::with_capacity(count);
        let mut time = MARGIN_S;
        let mut pause = None;
        for i in 0..count {
            let u = unit(&mut rng);
            let kind = if i == 0 {
                patient.dominant
            } else if u < patient.a_share {
                Kind::A
            } else if u < patient.a_share + patient.v_share {
                Kind::V
            } else {
                patient.dominant
            };
            if i > 0 {
                let breathing =
                    1.0 + 0.03 * (std::f64::consts::TAU * patient.breathing_hz * time).sin();
                let sinus =
                    patient.rr_s * breathing * (1.0 + patient.variability * normal(&mut rng));
                let interval = match kind {
                    Kind::A => sinus * uniform(&mut rng, 0.55, 0.75),
                    Kind::V => sinus * uniform(&mut rng, 0.6, 0.8),
                    _ => pause.take().unwrap_or(sinus),
                };
                // After an ectopic beat: a compensatory pause (V) or a slightly long one (A).
                pause = match kind {
                    Kind::V => Some(2.0 * sinus - interval),
                    Kind::A => Some(sinus * uniform(&mut rng, 1.0, 1.1)),
                    _ => None,
                };
                time += interval;
            }
            beats.push((kind, time));
        }
        let fs = SAMPLING_FREQUENCY;
        let num_samples = ((time + MARGIN_S) * fs).round() as usize;

        // The signal: wander and noise, then every beat's waves where they are not negligible.
        let mut mv: Vec<f64> = (0..num_samples)
            .map(|i| {
                let t = i as f64 / fs;
                patient.wander_mv
                    * (std::f64::consts::TAU * patient.wander_hz * t + patient.wander_phase).sin()
                    + patient.noise_mv * normal(&mut rng)
            })
            .collect();
        let mut annotations = Vec::with_capacity(count + 2);
        annotations.push(annotation(0, 28));
        for &(kind, peak) in &beats {
            let peak_sample = (peak * fs).round();
            for w in patient.beat(kind, &mut rng) {
                let centre = peak_sample + w.centre * fs;
                let reach = 5.0 * w.width * fs;
                let first = (centre - reach).ceil().max(0.0) as usize;
                let last = ((centre + reach).floor() as usize).min(num_samples - 1);
                for (i, value) in mv.iter_mut().enumerate().take(last + 1).skip(first) {
                    let z = (i as f64 - centre) / (w.width * fs);
                    *value += patient.scale * w.amplitude * (-0.5 * z * z).exp();
                }
            }
            annotations.push(annotation(peak_sample as u64, kind.code()));
        }
        annotations.push(annotation(num_samples as u64 - 1, 28));
        let digital: Vec<i16> = mv
            .iter()
            .map(|&v| (ADC_ZERO + GAIN * v).round().clamp(0.0, 2047.0) as i16)
            .collect();
        let name = self.patient_name(index);
        let text = format!(
            "{name} 1 {fs} {num_samples}\n{name}.dat 212 {GAIN} 11 {ADC_ZERO} 0 0 0 MLII\n"
        );
        let header = parse_header(std::path::Path::new(&format!("{name}.hea")), &text)
            .expect("the generated header is well formed");
        let record = Record::from_parts(header, vec![digital])
            .expect("the generated signal has the header's length");
        (record, annotations)
    }

    /// Every patient's beats cut with `preprocessing`, labelled from `labels`: one patient per
    /// record, in patient order.
    ///
    /// # Shapes
    /// A dataset of `[beats, preprocessing.row_len()]` rows.
    pub fn load(
        &self,
        preprocessing: &Preprocessing,
        labels: LabelSet,
    ) -> Result<Dataset, WfdbError> {
        if self.patients == 0 {
            return Err(WfdbError::InvalidArgument(
                "a synthetic cohort needs at least one patient".to_owned(),
            ));
        }
        let parts = (0..self.patients)
            .map(|index| {
                let (record, annotations) = self.record(index);
                Ok(preprocess::extract(&record, &annotations, preprocessing, labels)?.0)
            })
            .collect::<Result<Vec<_>, WfdbError>>()?;
        Ok(Dataset::concat(&parts)?)
    }
}

fn annotation(sample: u64, code: u8) -> Annotation {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::RR_FEATURES;

    #[test]
    fn cohorts_are_deterministic_and_shared_by_patient() {
        let cohort = Cohort {
            patients: 4,
            beats: 402,
            seed: 9,
        };
        assert_eq!(
            (0..4).map(|i| cohort.beats_of(i)).collect::<Vec<_>>(),
            [101, 101, 100, 100]
        );
        let (a, annotations) = cohort.record(1);
        assert_eq!(cohort.record(1).0, a);
        assert_ne!(cohort.record(2).0.signals, a.signals);
        assert_ne!(Cohort { seed: 10, ..cohort }.record(1).0.signals, a.signals);
        assert_eq!(a.name(), "syn9-1");
        assert_eq!(annotations.len(), 101 + 2);
        assert!(annotations.windows(2).all(|w| w[0].sample < w[1].sample));
        let data = cohort
            .load(&Preprocessing::inter_patient(), LabelSet::Aami)
            .unwrap();
        assert_eq!(data.len(), 402);
        assert_eq!(data.patient_counts(), [101, 101, 100, 100]);
        assert_eq!(data.patient_names()[3], "syn9-3");
        assert_eq!(data.feature_len(), RR_FEATURES);
        let papers = cohort
            .load(&Preprocessing::papers(), LabelSet::Papers)
            .unwrap();
        // The papers' window rules drop each record's first and last beat.
        assert_eq!(papers.len(), 402 - 2 * 4);
        let counts = papers.class_counts();
        assert!(
            counts.iter().all(|&c| c > 10),
            "N L R A V counts {counts:?}"
        );
        assert!(
            Cohort {
                patients: 0,
                ..cohort
            }
            .load(&Preprocessing::papers(), LabelSet::Papers)
            .is_err()
        );
    }

    #[test]
    fn ectopic_beats_come_early() {
        let cohort = Cohort {
            patients: 6,
            beats: 1800,
            seed: 3,
        };
        let data = cohort
            .load(&Preprocessing::inter_patient(), LabelSet::Aami)
            .unwrap();
        // Mean previous-RR ratio per AAMI class: premature S and V beats well below N's.
        let mut sums = [(0.0f64, 0usize); 5];
        for i in 0..data.len() {
            let s = &mut sums[usize::from(data.labels()[i])];
            s.0 += f64::from(data.features(i)[0]);
            s.1 += 1;
        }
        let mean = |c: usize| sums[c].0 / sums[c].1.max(1) as f64;
        println!(
            "previous RR / mean RR: N {:.2}, S {:.2}, V {:.2}",
            mean(0),
            mean(1),
            mean(2)
        );
        assert!(sums[1].1 > 50 && sums[2].1 > 50, "{sums:?}");
        assert!(mean(0) > 1.0 && mean(1) < 0.8 && mean(2) < 0.85, "{sums:?}");
        assert_eq!((sums[3].1, sums[4].1), (0, 0));
    }
}
