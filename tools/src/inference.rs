//! Private inference measured through a real coordinator (`medsplit-bench --private-inference`):
//! beats per second, bytes per beat each way, and how far the encrypted path's probabilities lie
//! from the plaintext forward pass of the same weights.

use std::time::Instant;

use crypto_box::SecretKey;
use medsplit_agent::client::Coordinator;
use medsplit_agent::inference::PrivateInference;
use medsplit_engine::model::predictions;
use medsplit_engine::protocol::{ClientSession, InProcess, Privacy, ServerSession};
use serde::Serialize;

/// What one private-inference run measured.
#[derive(Clone, Debug, Serialize)]
pub struct InferenceFigures {
    pub beats: u64,
    /// Rows per forward message.
    pub batch: usize,
    /// From opening the session (fetching and opening the sealed client weights included) to
    /// its close.
    pub seconds: f64,
    /// The forward messages alone.
    pub seconds_streaming: f64,
    pub beats_per_second: f64,
    pub bytes_up_per_beat: f64,
    pub bytes_down_per_beat: f64,
    /// Beats whose class is the plaintext forward pass's.
    pub same_class: u64,
    /// Largest difference of a probability from the plaintext forward pass's.
    pub max_probability_error: f32,
}

/// Classifies `rows` (input rows of finished job `job`'s model) through the coordinator as
/// agent `coordinator` (its identity `key`), then compares with the plaintext forward pass of
/// the job's released model (the release is recorded as an export).
pub async fn measure(
    coordinator: &Coordinator,
    key: &SecretKey,
    job: i64,
    rows: &[f32],
) -> anyhow::Result<InferenceFigures> {
    let opened = Instant::now();
    let (spec, mut session) = PrivateInference::connect(coordinator, key, job).await?;
    let streaming = Instant::now();
    let private = session.probabilities(rows).await?;
    let seconds_streaming = streaming.elapsed().as_secs_f64();
    let traffic = session.close().await?;
    let seconds = opened.elapsed().as_secs_f64();

    let (_, client, server) = medsplit_agent::release::whole_model(coordinator, key, job).await?;
    let config = spec.model_config();
    let mut plain = InProcess::from_sessions(
        ClientSession::resume(&config, Privacy::Plaintext, &client)?,
        ServerSession::inference(&config, Privacy::Plaintext, &server)?,
    );
    let mut expected = Vec::with_capacity(private.len());
    for batch in rows.chunks(PrivateInference::BATCH * config.input_len()) {
        expected.extend(plain.infer(batch)?);
    }
    let classes = config.classes;
    let same_class = predictions(&private, classes)
        .zip(predictions(&expected, classes))
        .filter(|(a, b)| a == b)
        .count() as u64;
    let max_probability_error = private
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let beats = traffic.beats;
    Ok(InferenceFigures {
        beats,
        batch: PrivateInference::BATCH,
        seconds,
        seconds_streaming,
        beats_per_second: beats as f64 / seconds_streaming,
        bytes_up_per_beat: traffic.bytes_up as f64 / beats as f64,
        bytes_down_per_beat: traffic.bytes_down as f64 / beats as f64,
        same_class,
        max_probability_error,
    })
}

impl std::fmt::Display for InferenceFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "private inference (websocket, HE): {} beats in {:.2} s = {:.0} beats/s \
             ({:.2} s with opening the weights and the session); {:.0} bytes per beat up, {:.0} \
             down ({} beats per message); same class as the plaintext forward pass for {} of {} \
             beats, probabilities within {:.1e}",
            self.beats,
            self.seconds_streaming,
            self.beats_per_second,
            self.seconds,
            self.bytes_up_per_beat,
            self.bytes_down_per_beat,
            self.batch,
            self.same_class,
            self.beats,
            self.max_probability_error
        )
    }
}
