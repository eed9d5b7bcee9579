//! Private inference on a finished job's model through the coordinator: the agent runs the
//! client layers on its own rows, sends the cut-layer activations encrypted under a key drawn
//! for the session, the coordinator applies the job's final server layer to the ciphertexts,
//! and the agent decrypts the result and finishes (the client tail, if any, and softmax). Rows,
//! classes and probabilities never leave the agent; the coordinator keeps only an audit entry
//! with the session's counts.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use crypto_box::SecretKey;
use medsplit_engine::api::JobSpec;
use medsplit_engine::model::ModelConfig;
use medsplit_engine::protocol::{ClientEvent, ClientSession, Privacy};

use crate::AgentError;
use crate::client::{Coordinator, Session};
use crate::predict::{Format, InputArgs, csv_header, load, write_predictions};
use crate::visit::Link;

/// What a private-inference session carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InferenceTraffic {
    pub beats: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Messages each way.
    pub messages: u64,
}

/// An open private-inference session on one job's model.
pub struct PrivateInference {
    config: ModelConfig,
    client: ClientSession,
    ws: Session,
    link: Link,
    traffic: InferenceTraffic,
}

impl PrivateInference {
    /// Rows per forward message: 32 ciphertexts of M1's 8 lanes (about 380 KB).
    pub const BATCH: usize = 256;

    /// Opens a session on finished job `job`, with the job's final client weights as sealed to
    /// this agent (its identity `key`); returns the job's spec with it.
    pub async fn connect(
        coordinator: &Coordinator,
        key: &SecretKey,
        job: i64,
    ) -> Result<(JobSpec, Self), AgentError> {
        let (spec, client) = crate::release::final_client(coordinator, key, job).await?;
        let session = Self::open(coordinator, job, &spec, &client).await?;
        Ok((spec, session))
    }

    /// Opens a session on job `job` (its spec) with the job's final client parameters (in the
    /// order of `ClientNet::parameters`, as this agent opened them).
    pub async fn open(
        coordinator: &Coordinator,
        job: i64,
        spec: &JobSpec,
        client: &[f32],
    ) -> Result<Self, AgentError> {
        let config = spec.model_config();
        let client = ClientSession::resume(&config, Privacy::Encrypted, client)?;
        let ws = coordinator.inference_session(job).await?;
        Ok(Self {
            config,
            client,
            ws,
            link: Link::default(),
            traffic: InferenceTraffic::default(),
        })
    }

    /// The class probabilities of `rows` (`[B, beat_len + features]` row-major, any number of
    /// rows), `[B, classes]` row-major, in [`Self::BATCH`]-row messages.
    pub async fn probabilities(&mut self, rows: &[f32]) -> Result<Vec<f32>, AgentError> {
        let width = self.config.input_len();
        if !rows.len().is_multiple_of(width) {
            return Err(AgentError::Session(format!(
                "{} values are not whole rows of {width}",
                rows.len()
            )));
        }
        let mut out = Vec::with_capacity(rows.len() / width * self.config.classes);
        for batch in rows.chunks(Self::BATCH * width) {
            let request = self.client.start_inference(batch)?;
            let reply = self
                .link
                .exchange(&mut self.ws, &mut self.client, request)
                .await?;
            let ClientEvent::Predicted(p) = self.client.on_message(&reply)? else {
                return Err(AgentError::Session(
                    "unexpected reply to an inference step".into(),
                ));
            };
            out.extend(p);
            self.traffic.beats += (batch.len() / width) as u64;
            self.traffic.messages += 1;
        }
        Ok(out)
    }

    /// The classes of the job's label set, in label order.
    pub fn classes(&self) -> usize {
        self.config.classes
    }

    /// What the session has carried so far.
    pub fn traffic(&self) -> InferenceTraffic {
        InferenceTraffic {
            bytes_up: self.link.up,
            bytes_down: self.link.down,
            ..self.traffic
        }
    }

    /// Ends the session (the coordinator then audits it); returns what it carried.
    pub async fn close(mut self) -> Result<InferenceTraffic, AgentError> {
        let traffic = self.traffic();
        self.ws
            .close(None)
            .await
            .map_err(|e| AgentError::Session(e.to_string()))?;
        // Wait for the coordinator's side of the closing handshake.
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut self.ws).await {}
        Ok(traffic)
    }
}

/// `medsplit-agent predict --job ID`: classifies every beat of the inputs through private
/// inference on finished job `job`, cut with that job's preprocessing, and writes what
/// `predict --model` writes (to `out`, or standard output); a summary goes to standard error.
pub async fn predict(
    coordinator: &Coordinator,
    key: &SecretKey,
    job: i64,
    args: &InputArgs,
    format: Format,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let inputs = args.resolve()?;
    let (spec, mut session) = PrivateInference::connect(coordinator, key, job).await?;
    let classes: Vec<String> = spec
        .labels
        .class_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let sink: Box<dyn Write> = match out {
        Some(path) => Box::new(
            std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut sink = std::io::BufWriter::with_capacity(1 << 20, sink);
    if format == Format::Csv {
        sink.write_all(csv_header(&classes).as_bytes())?;
    }
    for input in &inputs {
        let beats = load(input, &spec, args.csv())
            .map_err(|e| anyhow::anyhow!("{}: {e}", input.describe()))?;
        let p = session.probabilities(beats.dataset.rows()).await?;
        write_predictions(&mut sink, format, &classes, &beats, &p)?;
    }
    sink.flush()?;
    let t = session.close().await?;
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "classified {} beats of {} input(s) through private inference on job {job} in {seconds:.2} s \
         ({:.0} beats/s); {} bytes to the coordinator and {} back",
        t.beats,
        inputs.len(),
        t.beats as f64 / seconds,
        t.bytes_up,
        t.bytes_down
    );
    Ok(())
}
