//! The epoch loop shared by every mode: same data order, same batches, same evaluation.

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::data::Dataset;
use crate::dpsgd::PoissonBatches;
use crate::metrics::Confusion;
use crate::protocol::{BatchStats, ProtocolError, Trainer};

/// The order in which epoch `epoch` visits the training set: a seeded shuffle, identical for every
/// mode trained from the same seed.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(epoch as u64),
    );
    order.shuffle(&mut rng);
    order
}

/// An endless run of training samples: the epoch orders [`epoch_order`]`(len, seed, 0)`,
/// `(len, seed, 1)`, … one after another. Visits that train a number of batches rather than
/// whole epochs take their batches from it, each where the previous one stopped.
#[derive(Clone, Debug)]
pub struct SampleStream {
    len: usize,
    seed: u64,
    epoch: usize,
    order: Vec<usize>,
    /// The next sample's place in `order`.
    at: usize,
}

impl SampleStream {
    /// The stream over `len` samples from its sample `start` on; `None` when `len` is 0.
    pub fn starting_at(len: usize, seed: u64, start: u64) -> Option<Self> {
        if len == 0 {
            return None;
        }
        let epoch = (start / len as u64) as usize;
        Some(Self {
            len,
            seed,
            epoch,
            order: epoch_order(len, seed, epoch),
            at: (start % len as u64) as usize,
        })
    }

    /// The next `n` samples (crossing into the next epoch's order when this one runs out).
    pub fn take(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.at == self.len {
                self.epoch += 1;
                self.order = epoch_order(self.len, self.seed, self.epoch);
                self.at = 0;
            }
            let k = (n - out.len()).min(self.len - self.at);
            out.extend_from_slice(&self.order[self.at..self.at + k]);
            self.at += k;
        }
        out
    }
}

/// Gathers the rows `indices` of `data` (waveform then side features) into one batch.
///
/// # Shapes
/// Returns rows `[indices.len(), row_len]` row-major and labels `[indices.len()]`.
pub fn gather(data: &Dataset, indices: &[usize]) -> (Vec<f32>, Vec<u8>) {
    let mut rows = Vec::with_capacity(indices.len() * data.row_len());
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        rows.extend_from_slice(data.row(i));
        labels.push(data.labels()[i]);
    }
    (rows, labels)
}

/// Totals of a run of batches.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub samples: usize,
    pub loss_sum: f64,
    pub correct: usize,
}

impl Totals {
    pub fn add(&mut self, s: BatchStats) {
        self.samples += s.samples;
        self.loss_sum += s.loss_sum;
        self.correct += s.correct;
    }
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.samples.max(1) as f64
    }
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }
}

/// One pass over `data` in `order`, `batch_size` samples at a time (the last batch may be
/// smaller). `progress(started, total)` is called as each batch is handed to the trainer.
pub fn train_epoch(
    trainer: &mut dyn Trainer,
    data: &Dataset,
    order: &[usize],
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Totals, ProtocolError> {
    // Progress counts the batches handed to the trainer (with batches in flight, a few ahead
    // of those finished).
    let mut started = 0;
    let mut batches = order.chunks(batch_size.max(1)).map(|batch| {
        started += batch.len();
        progress(started, order.len());
        gather(data, batch)
    });
    let mut totals = Totals::default();
    for stats in trainer.train_batches(&mut batches)? {
        totals.add(stats);
    }
    Ok(totals)
}

/// `steps` DP-SGD steps on `data`, each on the next Poisson sample of `batches` (the trainer's
/// client pads and privatises it, [`crate::protocol::ClientSession::with_dp`]).
/// `progress(step, steps)` is called after every step.
pub fn train_private_steps(
    trainer: &mut dyn Trainer,
    data: &Dataset,
    batches: &mut PoissonBatches,
    steps: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Totals, ProtocolError> {
    let mut totals = Totals::default();
    for step in 1..=steps {
        let (beats, labels) = gather(data, &batches.next_batch());
        totals.add(trainer.train_batch(&beats, &labels)?);
        progress(step, steps);
    }
    Ok(totals)
}

/// The confusion matrix of `trainer`'s predictions on `data`, predicted `batch_size` samples at
/// a time; `classes` names the classes, one per class of `data`.
pub fn evaluate(
    trainer: &mut dyn Trainer,
    data: &Dataset,
    batch_size: usize,
    classes: &[&str],
) -> Result<Confusion, ProtocolError> {
    if classes.len() != data.num_classes() {
        return Err(ProtocolError::Shape {
            what: "class names",
            expected: data.num_classes(),
            got: classes.len(),
        });
    }
    let mut confusion = Confusion::new(classes.iter().copied())?;
    let indices: Vec<usize> = (0..data.len()).collect();
    for (b, batch) in indices.chunks(batch_size.max(1)).enumerate() {
        let (beats, labels) = gather(data, batch);
        let predicted = trainer.predict(&beats)?;
        expect_len("predictions", labels.len(), predicted.len())?;
        for (i, (&p, &l)) in predicted.iter().zip(&labels).enumerate() {
            if p >= classes.len() {
                return Err(ProtocolError::Prediction {
                    row: b * batch_size.max(1) + i,
                    class: p,
                    classes: classes.len(),
                });
            }
            confusion.add(usize::from(l), p);
        }
    }
    Ok(confusion)
}

fn expect_len(what: &'static str, expected: usize, got: usize) -> Result<(), ProtocolError> {
    if expected == got {
        Ok(())
    } else {
        Err(ProtocolError::Shape {
            what,
            expected,
            got,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_stream_runs_through_the_epoch_orders_from_any_start() {
        let (len, seed) = (10, 7);
        let stream: Vec<usize> = (0..4).flat_map(|e| epoch_order(len, seed, e)).collect();
        for start in [0usize, 3, 10, 17, 29] {
            let mut s = SampleStream::starting_at(len, seed, start as u64).unwrap();
            let mut got = s.take(4);
            got.extend(s.take(7));
            got.extend(s.take(0));
            assert_eq!(got, stream[start..start + 11], "from {start}");
        }
        // Every epoch visits every sample once.
        let mut s = SampleStream::starting_at(len, seed, 20).unwrap();
        let mut epoch = s.take(len);
        epoch.sort_unstable();
        assert_eq!(epoch, (0..len).collect::<Vec<_>>());
        assert!(SampleStream::starting_at(0, seed, 0).is_none());
    }
}
