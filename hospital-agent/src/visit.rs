//! One visit: open the handed-over weights, train `local_epochs` passes over the local training
//! set (or `local_steps` batches) through the coordinator's encrypted server layer, measure the test set's confusion matrix
//! through the same path, seal the weights to the agents that may train next, and report.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use crypto_box::SecretKey;
use futures_util::{SinkExt, StreamExt};
use medsplit_engine::api::{
    AgentFrame, CoordinatorFrame, SealedCopy, TestEvaluation, VisitAssignment, VisitReport,
};
use medsplit_engine::dpsgd::PoissonBatches;
use medsplit_engine::metrics::Confusion;
use medsplit_engine::model::Objective;
use medsplit_engine::protocol::{BatchStats, ClientEvent, ClientSession, Privacy};
use medsplit_engine::training::{SampleStream, Totals, epoch_order, gather};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Coordinator, Session};
use crate::config::LocalData;
use crate::privacy::{Budget, PrivateVisit};
use crate::{AgentError, seal};

/// What the agent's user sees of a visit in progress.
pub trait Observer: Send {
    fn epoch_started(&mut self, _epoch: u32, _epochs: u32, _samples: u64) {}
    fn batch_done(&mut self, _samples_done: u64) {}
    fn epoch_done(&mut self, _epoch: u32, _seconds: f64, _totals: &Totals) {}
    fn evaluating(&mut self, _samples: u64) {}
}

/// An observer that shows nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// What a visit measured.
#[derive(Clone, Debug)]
pub struct VisitSummary {
    pub train: Totals,
    pub test_accuracy: Option<f64>,
    /// The test set's confusion matrix, when the visit measured it.
    pub test: Option<Confusion>,
    pub epoch_seconds: Vec<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Traffic of the training epochs alone (without the test-accuracy measurement).
    pub train_bytes_up: u64,
    pub train_bytes_down: u64,
}

/// Runs a claimed visit to completion, with no privacy budget of the agent's own.
pub async fn run(
    coordinator: &Coordinator,
    key: &SecretKey,
    a: &VisitAssignment,
    data: &LocalData,
    observer: &mut dyn Observer,
) -> Result<VisitSummary, AgentError> {
    run_with_budget(coordinator, key, a, data, observer, &Budget::default()).await
}

/// Runs a claimed visit to completion; a job with differential privacy is trained with
/// DP-SGD within `budget` ([`PrivateVisit`]).
pub async fn run_with_budget(
    coordinator: &Coordinator,
    key: &SecretKey,
    a: &VisitAssignment,
    data: &LocalData,
    observer: &mut dyn Observer,
    budget: &Budget,
) -> Result<VisitSummary, AgentError> {
    let config = a.spec.model_config();
    let have = (
        data.train.beat_len(),
        data.train.feature_len(),
        data.train.num_classes(),
    );
    if have != (config.beat_len, config.features, config.classes) {
        return Err(AgentError::Session(format!(
            "local data has {}-sample beats with {} side features in {} classes; the job's \
             model needs {}, {} and {}",
            have.0, have.1, have.2, config.beat_len, config.features, config.classes
        )));
    }
    let class_names = a.spec.labels.class_names();
    let privacy = if a.spec.insecure_plaintext {
        Privacy::Plaintext
    } else {
        Privacy::Encrypted
    };
    let client = match (&a.handoff, a.spec.init_from) {
        (None, None) => ClientSession::new(&config, privacy, a.spec.seed)?,
        // The job's first visit starts from the source job's final client weights, sealed to
        // this agent at the source's last visit.
        (None, Some(source)) => {
            let (_, params) = crate::release::final_client(coordinator, key, source).await?;
            ClientSession::resume(&config, privacy, &params)?
        }
        (Some(h), _) => {
            let sender = seal::public_key(&decode(&h.sender_public_key)?)?;
            let params = seal::open(key, &sender, &decode(&h.sealed)?, a.job_id, h.from_visit_id)?;
            ClientSession::resume(&config, privacy, &params)?
        }
    };
    let mut client = if a.spec.train_client {
        client
    } else {
        client.frozen()
    };
    client.set_objective(Objective {
        client_lr: a.spec.client_lr,
        class_weights: a.spec.class_weights.for_counts(&data.train.class_counts()),
    })?;
    // Before the session opens: a visit over the budget takes no step.
    let private = PrivateVisit::start(a, data.train.len(), budget)?;
    let mut poisson = None;
    if let Some(p) = &private {
        client = client.with_dp(p.sgd.clone())?;
        poisson = Some(PoissonBatches::new(
            data.train.len(),
            p.plan.sampling_rate,
            p.sgd.padded_batch,
            None,
        ));
    }
    // The job's batches in flight (more than 1 only for trained client layers without DP).
    let depth = a.spec.in_flight() as usize;
    client = client.with_depth(depth)?;
    let mut ws = coordinator.session(a.visit_id, a.attempt).await?;
    let mut link = Link::default();

    let batch_size = a.spec.batch_size as usize;
    let mut work = LocalWork::new(a, data.train.len())?;
    let epochs = work.epochs;
    let total = work.samples;
    let mut train = Totals::default();
    let mut epoch_seconds = Vec::new();
    for epoch in 1..=epochs {
        observer.epoch_started(epoch, epochs, total);
        let started = Instant::now();
        let mut totals = Totals::default();
        let mut next_report = 0u64;
        // With DP-SGD every step is a fresh Poisson sample; an epoch is N / batch_size steps.
        let batches: Box<dyn Iterator<Item = Vec<usize>> + Send + '_> =
            match (&mut poisson, &private) {
                (Some(poisson), Some(p)) => {
                    let steps = p.plan.steps_per_visit / u64::from(epochs.max(1));
                    Box::new((0..steps).map(|_| poisson.next_batch()))
                }
                _ => work.batches(epoch),
            };
        let mut batches = batches.fuse();
        loop {
            // Start the next batch and go on with those in flight until there is room for
            // another; after the last, finish every batch in flight.
            let (finished, last) = match batches.next() {
                Some(batch) => {
                    let (beats, labels) = gather(&data.train, &batch);
                    let forward = client.start(&beats, &labels, true)?;
                    (
                        link.train(&mut ws, &mut client, forward, depth).await?,
                        false,
                    )
                }
                None => (link.drain(&mut ws, &mut client).await?, true),
            };
            for stats in finished {
                totals.add(stats);
                let done = (totals.samples as u64).min(total);
                observer.batch_done(done);
                if done >= next_report || done == total {
                    next_report = done + total / 50 + 1;
                    link.queue_text(&AgentFrame::Progress {
                        epoch,
                        epochs,
                        samples_done: done,
                        samples_total: total,
                    });
                }
            }
            if last {
                break;
            }
        }
        link.write(&mut ws).await?;
        let seconds = started.elapsed().as_secs_f64();
        observer.epoch_done(epoch, seconds, &totals);
        epoch_seconds.push(seconds);
        train = totals;
    }

    let (train_bytes_up, train_bytes_down) = (link.up, link.down);
    let mut test = None;
    if a.spec.evaluates(a.round) {
        observer.evaluating(data.test.len() as u64);
        let mut confusion = Confusion::new(class_names)
            .map_err(|e| AgentError::Session(format!("class names: {e}")))?;
        let indices: Vec<usize> = (0..data.test.len()).collect();
        // Up to `depth` evaluation steps in flight: they change no weights, so the answers are
        // those of one at a time.
        let mut awaited = VecDeque::new();
        let mut batches = indices.chunks(batch_size.max(16));
        loop {
            let batch = if awaited.len() < depth {
                batches.next()
            } else {
                None
            };
            if let Some(batch) = batch {
                let (beats, labels) = gather(&data.test, batch);
                link.queue(client.start(&beats, &[], false)?);
                awaited.push_back(labels);
                continue;
            }
            let Some(labels) = awaited.pop_front() else {
                break;
            };
            let reply = link.reply(&mut ws, &mut client).await?;
            let ClientEvent::Evaluated(predicted) = client.on_message(&reply)? else {
                return Err(AgentError::Session(
                    "unexpected reply to an evaluation".into(),
                ));
            };
            if predicted.len() != labels.len() || predicted.iter().any(|&p| p >= class_names.len())
            {
                return Err(AgentError::Session(
                    "the evaluation's predictions do not fit the batch".into(),
                ));
            }
            for (&p, &l) in predicted.iter().zip(&labels) {
                confusion.add(usize::from(l), p);
            }
        }
        test = Some(confusion);
    }

    // With frozen client layers, the last training batch's gradient of the server layer, unless
    // the evaluation carried it.
    if let Some(update) = client.finish()? {
        let reply = link.exchange(&mut ws, &mut client, update).await?;
        if !matches!(client.on_message(&reply)?, ClientEvent::Updated) {
            return Err(AgentError::Session(
                "unexpected reply to the last update".into(),
            ));
        }
    }
    let parameters = client.model().parameters();
    let mut sealed = Vec::new();
    for r in &a.recipients {
        let recipient = seal::public_key(&decode(&r.public_key)?)?;
        sealed.push(SealedCopy {
            recipient_agent_id: r.agent_id,
            sealed: B64.encode(seal::seal(
                key,
                &recipient,
                a.job_id,
                a.visit_id,
                &parameters,
            )),
        });
    }
    let report = VisitReport {
        train_loss: train.mean_loss(),
        train_accuracy: train.accuracy(),
        train_samples: train.samples as u64,
        test_accuracy: test.as_ref().map(Confusion::accuracy),
        test_samples: test.as_ref().map_or(0, Confusion::total),
        test_evaluation: test
            .as_ref()
            .map(|c| TestEvaluation::new(data.evaluation(), c)),
        sealed,
        dp: private.as_ref().map(PrivateVisit::report),
    };
    send_text(&mut ws, &AgentFrame::Complete(report)).await?;
    loop {
        match next(&mut ws).await? {
            Message::Text(t) => {
                if matches!(serde_json::from_str(&t), Ok(CoordinatorFrame::Completed)) {
                    break;
                }
            }
            Message::Binary(_) => {
                return Err(AgentError::Session("unexpected binary frame".into()));
            }
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    Ok(VisitSummary {
        train,
        test_accuracy: test.as_ref().map(Confusion::accuracy),
        test,
        epoch_seconds,
        bytes_up: link.up,
        bytes_down: link.down,
        train_bytes_up,
        train_bytes_down,
    })
}

/// The batches a visit trains, as indices into the hospital's training split.
///
/// With `local_epochs` (the default): that many passes, each a seeded shuffle drawn from the job's
/// seed, the round and the hospital's place in the visit order; the last batch of a pass may be
/// smaller. With `local_steps`: one run of exactly that many full batches, taken from the
/// hospital's [`SampleStream`] (seeded by the job's seed and the hospital's place alone), which
/// each visit continues where the last round's stopped: the visit of round `r` starts at sample
/// `r · steps · batch_size` of the stream. Progress counts that run as a single epoch.
struct LocalWork {
    /// Epochs the visit reports (1 for a run of steps).
    epochs: u32,
    /// Samples each epoch trains.
    samples: u64,
    batch_size: usize,
    source: Source,
}

enum Source {
    Passes { len: usize, seed: u64 },
    Steps { steps: u32, stream: SampleStream },
}

impl LocalWork {
    /// The work of visit `a` over a training split of `len` samples.
    fn new(a: &VisitAssignment, len: usize) -> Result<Self, AgentError> {
        let spec = &a.spec;
        let batch_size = spec.batch_size.max(1) as usize;
        let position = u64::from(a.position);
        Ok(match spec.local_steps {
            None => Self {
                epochs: spec.local_epochs,
                samples: len as u64,
                batch_size,
                source: Source::Passes {
                    len,
                    seed: spec.seed ^ (u64::from(a.round) << 32 | position),
                },
            },
            Some(steps) => {
                let per_visit = u64::from(steps) * batch_size as u64;
                let stream = SampleStream::starting_at(
                    len,
                    spec.seed ^ position,
                    u64::from(a.round) * per_visit,
                )
                .ok_or_else(|| {
                    AgentError::Session(
                        "the hospital has no training beats to take steps on".into(),
                    )
                })?;
                Self {
                    epochs: 1,
                    samples: per_visit,
                    batch_size,
                    source: Source::Steps { steps, stream },
                }
            }
        })
    }

    /// The batches of epoch `epoch` (from 1), in training order.
    fn batches(&mut self, epoch: u32) -> Box<dyn Iterator<Item = Vec<usize>> + Send + '_> {
        let b = self.batch_size;
        match &mut self.source {
            Source::Passes { len, seed } => {
                let order = epoch_order(*len, *seed, epoch as usize - 1);
                Box::new(
                    (0..order.len())
                        .step_by(b)
                        .map(move |i| order[i..(i + b).min(order.len())].to_vec()),
                )
            }
            Source::Steps { steps, stream } => Box::new((0..*steps).map(move |_| stream.take(b))),
        }
    }
}

fn decode(s: &str) -> Result<Vec<u8>, AgentError> {
    B64.decode(s)
        .map_err(|_| AgentError::Session("the coordinator sent malformed base64".into()))
}

async fn send_text(ws: &mut Session, frame: &AgentFrame) -> Result<(), AgentError> {
    let text = serde_json::to_string(frame).expect("serializable");
    ws.send(Message::text(text)).await.map_err(ws_err)
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> AgentError {
    AgentError::Session(e.to_string())
}

/// The next data frame; a close frame becomes [`AgentError::Closed`].
async fn next<S>(ws: &mut S) -> Result<Message, AgentError>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            None => {
                return Err(AgentError::Session(
                    "the coordinator closed the session".into(),
                ));
            }
            Some(Err(e)) => return Err(ws_err(e)),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Err(AgentError::Closed { code, reason });
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Ok(m)) => return Ok(m),
        }
    }
}

/// How long the agent polls for a reply before parking its thread, while replies have been
/// arriving that fast.
///
/// A coordinator on the same machine or LAN answers within a fraction of a millisecond. Parking
/// the thread for each reply puts its CPU to sleep and has the kernel (on a VM, the hypervisor)
/// wake it again, which costs tens of microseconds per message and far more on a busy host: on
/// the 2-vCPU benchmark machine it was a quarter of split-he's time through the coordinator
/// (docs/benchmarks.md). So while the typical reply time (a moving average) is within this
/// budget the agent polls the socket for up to this long before parking; over a WAN replies take
/// longer and it parks at once. The price is the agent's core staying busy while it waits.
pub const REPLY_SPIN: Duration = Duration::from_millis(2);

static SPIN: AtomicBool = AtomicBool::new(true);

/// Turns polling for replies ([`REPLY_SPIN`]) on or off for this process: off where many agents
/// share a few cores (the load generator), where polling would take CPU from the others.
pub fn poll_for_replies(enabled: bool) {
    SPIN.store(enabled, Ordering::Relaxed);
}

/// [`next`], polling the socket until `deadline` before parking: each round lets the runtime
/// check its sockets without sleeping (`yield_now`), so a reply is picked up as it lands.
async fn next_polling(ws: &mut Session, deadline: Instant) -> Result<Message, AgentError> {
    loop {
        if let Some(reply) = futures_util::FutureExt::now_or_never(next(ws)) {
            return reply;
        }
        if Instant::now() >= deadline {
            return next(ws).await;
        }
        tokio::task::yield_now().await;
    }
}

/// The session's traffic: the messages queued to write, replies read early, bytes each way,
/// and how long replies take.
///
/// While a message is being written, replies that arrive are read (and kept for their turn):
/// with many batches in flight neither side can stall the other with a full socket, since each
/// waits to write only while the other reads.
#[derive(Default)]
pub(crate) struct Link {
    pub(crate) up: u64,
    pub(crate) down: u64,
    /// Moving average of the time from waiting for a reply to its arrival (None before the
    /// first).
    typical_reply: Option<Duration>,
    /// Messages to write, oldest first.
    outbox: VecDeque<Message>,
    /// Replies read while writing, oldest first.
    inbox: VecDeque<Vec<u8>>,
    /// Training batches started whose steps have not finished.
    batches: usize,
}

impl Link {
    /// Sends `request` and waits for its reply, preparing the client's next message meanwhile.
    /// Nothing else may be in flight.
    pub(crate) async fn exchange(
        &mut self,
        ws: &mut Session,
        client: &mut ClientSession,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, AgentError> {
        self.outbox.push_back(Message::binary(request));
        self.reply(ws, client).await
    }

    /// Queues a message; it is written before the next reply is awaited.
    pub(crate) fn queue(&mut self, message: Vec<u8>) {
        self.outbox.push_back(Message::binary(message));
    }

    /// Queues a control frame, written before the next binary message.
    pub(crate) fn queue_text(&mut self, frame: &AgentFrame) {
        let text = serde_json::to_string(frame).expect("serializable");
        self.outbox.push_back(Message::text(text));
    }

    /// Sends the forward message of a training batch, then answers the replies of the batches
    /// in flight (sending each backward message as its logits arrive) until fewer than `depth`
    /// are in flight. Returns the statistics of the batches that finished, in order.
    ///
    /// The messages go in the order [`InProcess::train_pipelined`] sends them, whatever the
    /// timing: the reply to each batch's forward is answered by its backward at once, and a
    /// finished batch is followed by the next one's forward.
    ///
    /// [`InProcess::train_pipelined`]: medsplit_engine::protocol::InProcess::train_pipelined
    pub(crate) async fn train(
        &mut self,
        ws: &mut Session,
        client: &mut ClientSession,
        forward: Vec<u8>,
        depth: usize,
    ) -> Result<Vec<BatchStats>, AgentError> {
        self.outbox.push_back(Message::binary(forward));
        self.batches += 1;
        self.until(ws, client, depth.saturating_sub(1)).await
    }

    /// Answers replies until no training batch is in flight; the finished batches' statistics,
    /// in order.
    pub(crate) async fn drain(
        &mut self,
        ws: &mut Session,
        client: &mut ClientSession,
    ) -> Result<Vec<BatchStats>, AgentError> {
        self.until(ws, client, 0).await
    }

    async fn until(
        &mut self,
        ws: &mut Session,
        client: &mut ClientSession,
        in_flight: usize,
    ) -> Result<Vec<BatchStats>, AgentError> {
        self.write(ws).await?;
        let mut finished = Vec::new();
        while self.batches > in_flight {
            let reply = self.reply(ws, client).await?;
            match client.on_message(&reply)? {
                ClientEvent::Send(next) => self.outbox.push_back(Message::binary(next)),
                ClientEvent::Trained(stats) => {
                    finished.push(stats);
                    self.batches -= 1;
                }
                _ => {
                    return Err(AgentError::Session(
                        "unexpected reply to a training step".into(),
                    ));
                }
            }
        }
        Ok(finished)
    }

    /// Writes the queued messages, then returns the next reply: one read meanwhile, or the one
    /// awaited (the client prepares its next message while it is).
    pub(crate) async fn reply(
        &mut self,
        ws: &mut Session,
        client: &mut ClientSession,
    ) -> Result<Vec<u8>, AgentError> {
        self.write(ws).await?;
        if let Some(reply) = self.inbox.pop_front() {
            return Ok(reply);
        }
        client.prepare();
        let waiting = Instant::now();
        let spin =
            SPIN.load(Ordering::Relaxed) && self.typical_reply.is_some_and(|t| t <= REPLY_SPIN);
        let reply = if spin {
            next_polling(ws, waiting + REPLY_SPIN).await
        } else {
            next(ws).await
        };
        let took = waiting.elapsed();
        self.typical_reply = Some(self.typical_reply.map_or(took, |t| (t * 7 + took) / 8));
        self.binary(reply?)
    }

    /// Writes every queued message, reading the replies that arrive meanwhile into the inbox.
    pub(crate) async fn write(&mut self, ws: &mut Session) -> Result<(), AgentError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let (mut sink, mut stream) = (&mut *ws).split();
        while let Some(message) = self.outbox.pop_front() {
            if let Message::Binary(b) = &message {
                self.up += b.len() as u64;
            }
            // After a completed flush the sink takes a message at once.
            sink.feed(message).await.map_err(ws_err)?;
            loop {
                tokio::select! {
                    biased;
                    flushed = sink.flush() => {
                        flushed.map_err(ws_err)?;
                        break;
                    }
                    reply = next(&mut stream) => {
                        let reply = self.binary(reply?)?;
                        self.inbox.push_back(reply);
                    }
                }
            }
        }
        Ok(())
    }

    fn binary(&mut self, message: Message) -> Result<Vec<u8>, AgentError> {
        match message {
            Message::Binary(b) => {
                self.down += b.len() as u64;
                Ok(b.to_vec())
            }
            _ => Err(AgentError::Session("expected a binary reply".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medsplit_engine::api::JobSpec;

    fn visit(spec: &str, round: u32, position: u32) -> VisitAssignment {
        let spec: JobSpec = serde_json::from_str(&format!(
            r#"{{"name": "j", "hospitals": ["a", "b"], "seed": 5, "batch_size": 8{spec}}}"#
        ))
        .unwrap();
        spec.validate().unwrap();
        VisitAssignment {
            visit_id: 1,
            attempt: 1,
            job_id: 1,
            round,
            position,
            spec,
            handoff: None,
            recipients: Vec::new(),
            lease_seconds: 30,
            max_epsilon: None,
            epsilon_spent: None,
            owner: None,
        }
    }

    /// Every batch of the visit, epoch by epoch.
    fn plan(spec: &str, round: u32, position: u32, len: usize) -> Vec<Vec<Vec<usize>>> {
        let mut work = LocalWork::new(&visit(spec, round, position), len).unwrap();
        let epochs: Vec<Vec<Vec<usize>>> = (1..=work.epochs)
            .map(|e| work.batches(e).collect())
            .collect();
        for e in &epochs {
            assert_eq!(e.iter().map(Vec::len).sum::<usize>() as u64, work.samples);
        }
        epochs
    }

    #[test]
    fn local_steps_train_that_many_full_batches_continuing_from_visit_to_visit() {
        let len = 30;
        let steps = r#", "local_steps": 5, "local_epochs": 4"#;
        let visits: Vec<Vec<Vec<usize>>> = (0..3)
            .map(|round| {
                let mut epochs = plan(steps, round, 1, len);
                assert_eq!(epochs.len(), 1, "a run of steps reports as one epoch");
                epochs.pop().unwrap()
            })
            .collect();
        for batches in &visits {
            assert_eq!(
                batches.len(),
                5,
                "local_steps batches, not local_epochs passes"
            );
            assert!(batches.iter().all(|b| b.len() == 8));
        }
        assert_ne!(
            visits[0], visits[1],
            "the next visit goes on through the data"
        );
        // The visits, one after another, are the hospital's stream: the orders of its passes.
        let stream = SampleStream::starting_at(len, 5 ^ 1, 0)
            .unwrap()
            .take(3 * 40);
        assert_eq!(visits.concat().concat(), stream);
        let mut first_pass = stream[..len].to_vec();
        first_pass.sort_unstable();
        assert_eq!(first_pass, (0..len).collect::<Vec<_>>());
        // Each hospital has its own stream.
        assert_ne!(plan(steps, 0, 0, len)[0], visits[0]);
        assert!(LocalWork::new(&visit(steps, 0, 0), 0).is_err());
    }

    #[test]
    fn local_epochs_are_seeded_passes_per_round() {
        let len = 30;
        let epochs = plan(r#", "local_epochs": 2"#, 1, 1, len);
        assert_eq!(epochs.len(), 2);
        for (e, batches) in epochs.iter().enumerate() {
            assert_eq!(
                batches.iter().map(Vec::len).collect::<Vec<_>>(),
                [8, 8, 8, 6]
            );
            assert_eq!(batches.concat(), epoch_order(len, 5 ^ (1 << 32 | 1), e));
        }
        assert_ne!(plan(r#", "local_epochs": 2"#, 2, 1, len), epochs);
    }
}
