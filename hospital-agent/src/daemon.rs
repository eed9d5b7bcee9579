//! The agent's main loop: claim a visit (long poll), train it while a heartbeat keeps its lease,
//! give it back if anything goes wrong; reconnect with exponential backoff and jitter.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use medsplit_engine::api::{VisitAssignment, close};
use medsplit_engine::training::Totals;
use rand::Rng;
use tokio::sync::watch;

use crate::AgentError;
use crate::client::{Coordinator, HEARTBEAT_INTERVAL};
use crate::config::LocalData;
use crate::state::AgentState;
use crate::visit::{self, Observer, VisitSummary};

/// Exponential backoff with full jitter: 0.5 s doubling to 30 s.
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self { attempt: 0 }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    pub fn next_delay(&mut self) -> Duration {
        let cap = (0.5 * 2f64.powi(self.attempt.min(6) as i32)).min(30.0);
        self.attempt += 1;
        Duration::from_secs_f64(rand::rng().random_range(cap / 2.0..=cap))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs until `shutdown` turns true (the visit in progress is given back to be retried) or a
/// fatal error: the first refused heartbeat or claim of a revoked agent ends it at once.
pub async fn run(
    coordinator: Arc<Coordinator>,
    state: Arc<AgentState>,
    data: Arc<LocalData>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let (current_tx, current_rx) = watch::channel::<Option<(i64, i32)>>(None);
    let (fenced_tx, mut fenced_rx) = watch::channel::<Option<i64>>(None);
    let (revoked_tx, mut revoked_rx) = watch::channel(false);
    let heartbeat = tokio::spawn(heartbeats(
        coordinator.clone(),
        current_rx,
        fenced_tx,
        revoked_tx,
    ));
    let mut backoff = Backoff::new();
    let result = loop {
        if *shutdown.borrow() {
            tracing::info!("shutting down");
            break Ok(());
        }
        let claimed = tokio::select! {
            r = coordinator.claim(Duration::from_secs(25)) => r,
            _ = shutdown.changed() => continue,
            _ = turns_true(&mut revoked_rx) => break Err(AgentError::Revoked),
        };
        let assignment = match claimed {
            Ok(Some(a)) => a,
            Ok(None) => {
                backoff.reset();
                continue;
            }
            Err(e) if e.is_fatal() => break Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "claim failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                    _ = turns_true(&mut revoked_rx) => break Err(AgentError::Revoked),
                }
                continue;
            }
        };
        backoff.reset();
        current_tx.send_replace(Some((assignment.visit_id, assignment.attempt)));
        fenced_rx.mark_unchanged();
        tracing::info!(
            job = assignment.job_id,
            visit = assignment.visit_id,
            attempt = assignment.attempt,
            round = assignment.round + 1,
            "visit claimed"
        );
        let mut observer = display(&assignment);
        let outcome = tokio::select! {
            r = visit::run(&coordinator, &state.secret_key, &assignment, &data, observer.as_mut()) => r,
            _ = shutdown.changed() => Err(AgentError::Shutdown),
            _ = fenced_rx.changed() => Err(AgentError::Fenced),
            _ = turns_true(&mut revoked_rx) => Err(AgentError::Revoked),
        };
        current_tx.send_replace(None);
        drop(observer);
        let e = match outcome {
            Ok(summary) => {
                log_summary(&assignment, &summary);
                continue;
            }
            Err(e) => e,
        };
        let stopping = matches!(e, AgentError::Shutdown);
        // A fenced or revoked attempt has lost the visit already: nothing to give back.
        let lost = matches!(e, AgentError::Fenced | AgentError::Revoked)
            || matches!(e, AgentError::Closed { code, .. } if code == close::FENCED || code == close::REVOKED);
        if stopping {
            tracing::info!(
                visit = assignment.visit_id,
                "shutting down; the visit in progress will be retried"
            );
        } else {
            tracing::warn!(visit = assignment.visit_id, error = %e, "visit not completed");
        }
        if !lost
            && let Err(r) = coordinator
                .release(assignment.visit_id, assignment.attempt, &e.to_string())
                .await
        {
            tracing::warn!(error = %r, "could not give the visit back; its lease will expire");
        }
        if stopping {
            break Ok(());
        }
        if e.is_fatal() {
            break Err(e);
        }
        if !lost {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.changed() => {}
                _ = turns_true(&mut revoked_rx) => break Err(AgentError::Revoked),
            }
        }
    };
    heartbeat.abort();
    result
}

/// Resolves once `flag` is true; never if its sender goes away first.
async fn turns_true(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Every few seconds: tell the coordinator the agent is alive, extend the current visit's lease,
/// signal `fenced` if the visit was taken away, and `revoked` (then stop) when the agent's
/// credential is refused.
async fn heartbeats(
    coordinator: Arc<Coordinator>,
    current: watch::Receiver<Option<(i64, i32)>>,
    fenced: watch::Sender<Option<i64>>,
    revoked: watch::Sender<bool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    loop {
        tick.tick().await;
        let visit = *current.borrow();
        match coordinator.heartbeat(visit).await {
            Ok(true) => {}
            Ok(false) => {
                if let Some((id, _)) = visit
                    && *current.borrow() == visit
                {
                    fenced.send_replace(Some(id));
                }
            }
            Err(AgentError::Revoked) => {
                revoked.send_replace(true);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

fn log_summary(a: &VisitAssignment, s: &VisitSummary) {
    tracing::info!(
        job = a.job_id,
        visit = a.visit_id,
        round = a.round + 1,
        train_loss = s.train.mean_loss(),
        train_accuracy = s.train.accuracy(),
        test_accuracy = s.test_accuracy,
        test_majority_rate = s.test.as_ref().map(|c| c.majority_rate()),
        test_macro_f1 = s.test.as_ref().map(|c| c.macro_f1()),
        test_balanced_accuracy = s.test.as_ref().map(|c| c.balanced_accuracy()),
        bytes_up = s.bytes_up,
        bytes_down = s.bytes_down,
        "visit completed"
    );
}

/// Progress bars on a terminal, structured log lines otherwise.
fn display(a: &VisitAssignment) -> Box<dyn Observer> {
    if std::io::stderr().is_terminal() {
        Box::new(Bars {
            label: format!("job {} round {}", a.job_id, a.round + 1),
            bar: None,
        })
    } else {
        Box::new(Logs { visit: a.visit_id })
    }
}

struct Bars {
    label: String,
    bar: Option<indicatif::ProgressBar>,
}

impl Observer for Bars {
    fn epoch_started(&mut self, epoch: u32, epochs: u32, samples: u64) {
        let bar = indicatif::ProgressBar::new(samples);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} beats {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} epoch {epoch}/{epochs}", self.label));
        self.bar = Some(bar);
    }
    fn batch_done(&mut self, samples_done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(samples_done);
        }
    }
    fn epoch_done(&mut self, _epoch: u32, seconds: f64, totals: &Totals) {
        if let Some(b) = self.bar.take() {
            b.finish_with_message(format!(
                "{seconds:.1} s, loss {:.4}, accuracy {:.2} %",
                totals.mean_loss(),
                100.0 * totals.accuracy()
            ));
        }
    }
}

struct Logs {
    visit: i64,
}

impl Observer for Logs {
    fn epoch_done(&mut self, epoch: u32, seconds: f64, totals: &Totals) {
        tracing::info!(
            visit = self.visit,
            epoch,
            seconds,
            loss = totals.mean_loss(),
            accuracy = totals.accuracy(),
            "epoch done"
        );
    }
    fn evaluating(&mut self, samples: u64) {
        tracing::info!(visit = self.visit, samples, "measuring test accuracy");
    }
}
