//! The agent's main loop: claim a visit (long poll), cut the hospital's data as the job asks
//! (once per preprocessing and label set), train the visit while a heartbeat keeps its lease,
//! refuse it if the data cannot give what the job asks, give it back if anything else goes wrong;
//! reconnect with exponential backoff and jitter.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use medsplit_engine::api::{VisitAssignment, close};
use medsplit_engine::preprocess::{LabelSet, Preprocessing};
use medsplit_engine::training::Totals;
use rand::Rng;
use tokio::sync::watch;

use crate::AgentError;
use crate::approvals::{Approvals, Handoffs};
use crate::client::{Coordinator, HEARTBEAT_INTERVAL};
use crate::config::{Config, LocalData};
use crate::peers::PeerKeys;
use crate::policy::Policy;
use crate::privacy::Budget;
use crate::state::AgentState;
use crate::visit::{self, Observer, VisitSummary};

type Loader = dyn Fn(&Preprocessing, LabelSet) -> Result<Arc<LocalData>, AgentError> + Send + Sync;

/// What a cut of the data came to: the data, or why this hospital cannot give it.
type Cut = Result<Arc<LocalData>, String>;

/// The hospital's data as jobs ask for it: read, cut with a job's preprocessing and labelled in
/// its label set on the first visit that needs it, then kept for the next visits asking the same
/// (the last [`Datasets::KEPT`] cuts). A cut the data cannot give
/// ([`AgentError::Unsupported`]) is remembered too, so that it is refused at once the next time;
/// other errors (a file that cannot be read) are tried again on the next visit.
pub struct Datasets {
    load: Box<Loader>,
    kept: Mutex<Vec<(Preprocessing, LabelSet, Cut)>>,
    /// The privacy budget of the agent whose data this is.
    budget: Budget,
    /// What the hospital trains: checked before its data is read for a visit.
    policy: Policy,
    /// The peers' public keys as first seen: checked on every assignment.
    peers: PeerKeys,
    /// The jobs the hospital approved here (when its policy requires it).
    pub approvals: Approvals,
    /// The newest weights seen per job: an older hand-off is refused.
    handoffs: Handoffs,
}

impl Datasets {
    /// Cuts kept in memory; the least recently loaded goes first.
    pub const KEPT: usize = 4;

    /// The data of `config`'s sources and split ([`Config::load_data`]), with the pins of its
    /// state directory.
    pub fn new(config: Config) -> Result<Self, AgentError> {
        let budget = Budget::in_state_dir(&config.state_dir, config.max_epsilon);
        let peers = PeerKeys::in_state_dir(&config.state_dir)?;
        let approvals = Approvals::in_state_dir(&config.state_dir);
        let handoffs = Handoffs::in_state_dir(&config.state_dir)?;
        let policy = config.policy.clone();
        let mut datasets =
            Self::with_loader(move |p, labels| config.load_data(p, labels).map(Arc::new));
        datasets.budget = budget;
        datasets.policy = policy;
        datasets.peers = peers;
        datasets.approvals = approvals;
        datasets.handoffs = handoffs;
        Ok(datasets)
    }

    /// The same data under `policy` (the configuration's, in the daemon; tests choose theirs).
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Data from `load` (tests give one data set whatever the job).
    pub fn with_loader(
        load: impl Fn(&Preprocessing, LabelSet) -> Result<Arc<LocalData>, AgentError>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            load: Box::new(load),
            kept: Mutex::new(Vec::new()),
            budget: Budget::default(),
            policy: Policy::default(),
            peers: PeerKeys::default(),
            approvals: Approvals::default(),
            handoffs: Handoffs::default(),
        }
    }

    /// The data cut with `preprocessing` and labelled in `labels`: kept, or loaded now (this
    /// reads and cuts every source: run it off the async threads).
    pub fn get(
        &self,
        preprocessing: &Preprocessing,
        labels: LabelSet,
    ) -> Result<Arc<LocalData>, AgentError> {
        let kept = |cut: &Cut| cut.clone().map_err(AgentError::Unsupported);
        if let Some((.., cut)) = self
            .lock()
            .iter()
            .find(|(p, l, _)| p == preprocessing && *l == labels)
        {
            return kept(cut);
        }
        let cut = match (self.load)(preprocessing, labels) {
            Ok(data) => Ok(data),
            Err(AgentError::Unsupported(reason)) => Err(reason),
            Err(e) => return Err(e),
        };
        let mut all = self.lock();
        if all.len() >= Self::KEPT {
            let _oldest = all.remove(0);
        }
        all.push((preprocessing.clone(), labels, cut.clone()));
        kept(&cut)
    }

    /// Whether this hospital trains assignment `a` at all: its policy, its approval of the job
    /// (when the policy requires one), the pinned keys and the newest weights seen.
    fn allows(&self, a: &VisitAssignment, state: &AgentState) -> Result<(), AgentError> {
        self.policy.check(a).map_err(AgentError::Policy)?;
        if self.policy.require_approval {
            self.approvals.check(a)?;
        }
        let own_key = B64.encode(state.secret_key.public_key().as_bytes());
        self.peers.check(a, state.identity.agent_id, &own_key)?;
        self.handoffs.check(a)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Preprocessing, LabelSet, Cut)>> {
        // A panic while holding the lock leaves the list as it was: still usable.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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
    datasets: Arc<Datasets>,
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
        // The hospital's policy first: a job it does not allow, did not approve here, or that
        // changes a pinned key or rolls the weights back is refused before any data is read.
        // Then the job's data: cut now unless an earlier visit did (the heartbeat keeps the
        // lease).
        let allowed = datasets.allows(&assignment, &state);
        let data = match allowed {
            Err(e) => Err(e),
            Ok(()) => {
                let loading = {
                    let datasets = datasets.clone();
                    let (p, labels) = (
                        assignment.spec.preprocessing.clone(),
                        assignment.spec.labels,
                    );
                    tokio::task::spawn_blocking(move || datasets.get(&p, labels))
                };
                tokio::select! {
                    r = loading => r.unwrap_or_else(|e| Err(AgentError::Config(format!("loading the data: {e}")))),
                    _ = shutdown.changed() => Err(AgentError::Shutdown),
                    _ = fenced_rx.changed() => Err(AgentError::Fenced),
                    _ = turns_true(&mut revoked_rx) => Err(AgentError::Revoked),
                }
            }
        };
        // A source that cannot be read for one job must not stop the agent serving others.
        let loaded = data.is_ok();
        let outcome = match data {
            Ok(data) => {
                let mut observer = display(&assignment);
                tokio::select! {
                    r = visit::run_with_budget(&coordinator, &state.secret_key, &assignment, &data, observer.as_mut(), &datasets.budget) => r,
                    _ = shutdown.changed() => Err(AgentError::Shutdown),
                    _ = fenced_rx.changed() => Err(AgentError::Fenced),
                    _ = turns_true(&mut revoked_rx) => Err(AgentError::Revoked),
                }
            }
            Err(e) => Err(e),
        };
        current_tx.send_replace(None);
        let e = match outcome {
            Ok(summary) => {
                log_summary(&assignment, &summary);
                if let Err(e) = datasets.handoffs.completed(&assignment) {
                    tracing::warn!(error = %e, "the visit's hand-off could not be recorded");
                }
                continue;
            }
            Err(e) => e,
        };
        let stopping = matches!(e, AgentError::Shutdown);
        // A fenced or revoked attempt has lost the visit already, and a coordinator that shuts
        // down hands its sessions' visits back itself: nothing to give back.
        let lost = matches!(e, AgentError::Fenced | AgentError::Revoked)
            || matches!(e, AgentError::Closed { code, .. }
                if code == close::FENCED || code == close::REVOKED || code == close::SHUTDOWN);
        let refused = matches!(
            e,
            AgentError::Unsupported(_)
                | AgentError::OverBudget(_)
                | AgentError::Policy(_)
                | AgentError::KeyChanged(_)
                | AgentError::Rollback(_)
        );
        if stopping {
            tracing::info!(
                visit = assignment.visit_id,
                "shutting down; the visit in progress will be retried"
            );
        } else if refused {
            tracing::warn!(job = assignment.job_id, visit = assignment.visit_id, reason = %e, "visit refused");
        } else {
            tracing::warn!(visit = assignment.visit_id, error = %e, "visit not completed");
        }
        if !lost {
            let (visit, attempt, reason) = (assignment.visit_id, assignment.attempt, e.to_string());
            let given_back = if refused {
                coordinator.refuse(visit, attempt, &reason).await
            } else {
                coordinator.release(visit, attempt, &reason).await
            };
            if let Err(r) = given_back {
                tracing::warn!(error = %r, "could not give the visit back; its lease will expire");
            }
        }
        if stopping {
            break Ok(());
        }
        if e.is_fatal() && (loaded || matches!(e, AgentError::Revoked)) {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use medsplit_engine::data::synthetic;
    use medsplit_engine::metrics::EvalKind;

    use super::*;

    #[test]
    fn datasets_are_cut_once_per_preprocessing_and_label_set() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        // Cuts without RR features work; with them, the papers' labels cannot be given and
        // AAMI labels hit an unreadable file.
        let datasets = Datasets::with_loader(move |p, labels| {
            counted.fetch_add(1, Ordering::SeqCst);
            match (p.rr, labels) {
                (None, _) => Ok(Arc::new(LocalData {
                    train: synthetic(20, 1),
                    test: synthetic(5, 2),
                    kind: EvalKind::Patient,
                })),
                (Some(_), LabelSet::Papers) => Err(AgentError::Unsupported(
                    "beat files are cut with the papers' preprocessing".into(),
                )),
                (Some(_), LabelSet::Aami) => Err(AgentError::Config("unreadable".into())),
            }
        });
        let calls = || calls.load(Ordering::SeqCst);
        let papers = Preprocessing::papers();
        let first = datasets.get(&papers, LabelSet::Papers).unwrap();
        let again = datasets.get(&papers, LabelSet::Papers).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "kept, not cut again");
        assert_eq!(calls(), 1);
        datasets.get(&papers, LabelSet::Aami).unwrap();
        assert_eq!(calls(), 2, "another label set is another cut");

        // A refusal is remembered: the same reason at once, without reading the data again.
        let inter = Preprocessing::inter_patient();
        for _ in 0..2 {
            let e = datasets.get(&inter, LabelSet::Papers).unwrap_err();
            assert!(
                matches!(&e, AgentError::Unsupported(r) if r.contains("beat files")),
                "{e}"
            );
        }
        assert_eq!(calls(), 3);
        // Other errors are tried again next time.
        for _ in 0..2 {
            let e = datasets.get(&inter, LabelSet::Aami).unwrap_err();
            assert!(matches!(e, AgentError::Config(_)), "{e}");
        }
        assert_eq!(calls(), 5);

        // Only the last KEPT cuts stay: the first one is cut again.
        for i in 0..Datasets::KEPT {
            let mut other = papers.clone();
            other.beat_len = 64 + i;
            datasets.get(&other, LabelSet::Papers).unwrap();
        }
        assert_eq!(calls(), 5 + Datasets::KEPT);
        let reloaded = datasets.get(&papers, LabelSet::Papers).unwrap();
        assert!(!Arc::ptr_eq(&first, &reloaded));
        assert_eq!(calls(), 6 + Datasets::KEPT);
    }
}
