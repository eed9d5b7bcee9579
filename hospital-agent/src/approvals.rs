//! What the agent knows of each job without the coordinator: whether its hospital approved the
//! job, and the newest client weights it has seen of it.
//!
//! **Approval.** The dashboard's consent is recorded by the coordinator, the party it protects
//! against. So the hospital also approves each job at its agent: `medsplit-agent approve JOB`
//! shows the job as the coordinator describes it (owner, hospitals, mode, batch size, DP, label
//! set, model, rounds), and on the admin's yes records the job's digest ([`job_digest`]: the id,
//! the owner and the whole specification) in `approvals.json` in the state directory (0600). The
//! daemon reads that file on every visit it claims and trains only a job approved there whose
//! assignment has the approved digest: a job nobody approved, or one whose specification or
//! owner the coordinator changed afterwards, is refused before any data is read.
//!
//! **Hand-offs.** The sealed weights bind the job and the visit they were sealed at, so the
//! coordinator cannot pass old weights off as newer ones; but it could hand over an older visit's
//! weights under their true id, rolling training back (to before a hospital's data was learnt,
//! say). The agent remembers, per job, the newest visit whose weights it has opened or sealed
//! (`handoffs.json`) and refuses an assignment that hands over older ones, or none at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use medsplit_engine::api::{JobSpec, VisitAssignment, job_digest};
use serde::{Deserialize, Serialize};

use crate::{AgentError, state};

const APPROVALS: &str = "approvals.json";
const HANDOFFS: &str = "handoffs.json";

/// A job as the coordinator describes it to an agent of one of its hospitals
/// (`GET /v1/jobs/{id}`): what the admin reads before approving it.
#[derive(Clone, Debug, Deserialize)]
pub struct JobToApprove {
    pub id: i64,
    pub name: String,
    pub owner: String,
    pub status: String,
    pub spec: JobSpec,
}

impl JobToApprove {
    /// What the admin approves, in a few lines.
    pub fn describe(&self) -> String {
        let s = &self.spec;
        let dp = match &s.dp {
            Some(dp) => format!(
                "on ({}, clip norm {}, δ {})",
                match (dp.noise_multiplier, dp.target_epsilon) {
                    (Some(n), _) => format!("noise multiplier {n}"),
                    (None, Some(e)) => format!("target ε {e}"),
                    (None, None) => "noise from the job's defaults".to_string(),
                },
                dp.clip_norm,
                dp.delta
            ),
            None => "off".to_string(),
        };
        let work = match s.local_steps {
            Some(steps) => format!("{steps} batches per visit"),
            None => format!("{} passes over the training data per visit", s.local_epochs),
        };
        format!(
            "job {id}: {name}\n  owner        {owner}\n  status       {status}\n  \
             hospitals    {hospitals}\n  encryption   {mode}\n  batch size   {batch}\n  \
             DP           {dp}\n  labels       {labels}\n  model        {model}\n  \
             rounds       {rounds}, {work}\n  release      {release}\n  digest       {digest}",
            id = self.id,
            name = self.name,
            owner = self.owner,
            status = self.status,
            hospitals = s.hospitals.join(", "),
            mode = if s.insecure_plaintext {
                "OFF (insecure_plaintext: the coordinator sees activations and gradients)"
            } else {
                "on"
            },
            batch = s.batch_size,
            labels = s.labels,
            model = s.model.preset.map_or("custom", |m| m.as_str()),
            rounds = s.rounds,
            release = serde_json::to_value(s.release)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            digest = self.digest(),
        )
    }

    pub fn digest(&self) -> String {
        job_digest(self.id, &self.owner, &self.spec)
    }
}

/// One job this hospital approved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// The job's digest when it was approved ([`job_digest`]).
    pub digest: String,
    pub name: String,
    pub owner: String,
    /// When (RFC 3339).
    pub approved_at: String,
}

#[derive(Default, Serialize, Deserialize)]
struct ApprovalFile {
    jobs: BTreeMap<i64, Approval>,
}

/// The jobs this hospital approved at this agent: `approvals.json` in the state directory, read
/// afresh on every check (the admin approves while the daemon runs), or in memory (tests).
#[derive(Debug, Default)]
pub struct Approvals {
    path: Option<PathBuf>,
    memory: Mutex<BTreeMap<i64, Approval>>,
}

impl Approvals {
    pub fn in_state_dir(dir: &Path) -> Self {
        Self {
            path: Some(dir.join(APPROVALS)),
            memory: Mutex::default(),
        }
    }

    /// The approved jobs by id.
    pub fn list(&self) -> Result<BTreeMap<i64, Approval>, AgentError> {
        match &self.path {
            Some(path) => Ok(state::read_json::<ApprovalFile>(path, "an approvals file")?.jobs),
            None => Ok(lock(&self.memory).clone()),
        }
    }

    fn save(&self, jobs: BTreeMap<i64, Approval>) -> Result<(), AgentError> {
        match &self.path {
            Some(path) => state::write_json(path, &ApprovalFile { jobs }),
            None => {
                *lock(&self.memory) = jobs;
                Ok(())
            }
        }
    }

    /// Records the hospital's approval of `job` as described now (a job approved before is
    /// approved again with its current digest).
    pub fn approve(&self, job: &JobToApprove) -> Result<Approval, AgentError> {
        let approval = Approval {
            digest: job.digest(),
            name: job.name.clone(),
            owner: job.owner.clone(),
            approved_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let mut jobs = self.list()?;
        jobs.insert(job.id, approval.clone());
        self.save(jobs)?;
        Ok(approval)
    }

    /// Withdraws the approval of `job`: its later visits are refused. False if it had none.
    pub fn withdraw(&self, job: i64) -> Result<bool, AgentError> {
        let mut jobs = self.list()?;
        let had = jobs.remove(&job).is_some();
        if had {
            self.save(jobs)?;
        }
        Ok(had)
    }

    /// Refuses ([`AgentError::Policy`]) assignment `a` unless its job was approved here with
    /// the digest the assignment gives.
    pub fn check(&self, a: &VisitAssignment) -> Result<(), AgentError> {
        let job = a.job_id;
        let Some(approved) = self.list()?.remove(&job) else {
            return Err(AgentError::Policy(format!(
                "job {job} was not approved at this hospital: an admin reads it and approves it \
                 with `medsplit-agent approve {job}` on this agent's host"
            )));
        };
        let asked = job_digest(job, a.owner.as_deref().unwrap_or(""), &a.spec);
        if asked != approved.digest {
            return Err(AgentError::Policy(format!(
                "job {job} is not the job this hospital approved on {}: its specification or \
                 owner changed since (digest {}…, approved {}…)",
                approved.approved_at,
                &asked[..16],
                &approved.digest[..16.min(approved.digest.len())]
            )));
        }
        Ok(())
    }
}

/// The newest visit per job whose client weights this agent has opened or sealed: in
/// `handoffs.json` in the state directory (0600), or in memory only (tests).
#[derive(Debug, Default)]
pub struct Handoffs {
    path: Option<PathBuf>,
    newest: Mutex<BTreeMap<i64, i64>>,
}

impl Handoffs {
    pub fn in_state_dir(dir: &Path) -> Result<Self, AgentError> {
        let path = dir.join(HANDOFFS);
        let newest = state::read_json::<BTreeMap<i64, i64>>(&path, "a hand-off record")?;
        Ok(Self {
            path: Some(path),
            newest: Mutex::new(newest),
        })
    }

    /// Refuses ([`AgentError::Rollback`]) assignment `a` if it hands over weights older than
    /// the newest this agent has seen of the job, or none when it has seen some. Visit ids grow
    /// with a job's visiting order (the coordinator creates a job's visits in that order), and
    /// the sealed weights bind the id of the visit that sealed them.
    pub fn check(&self, a: &VisitAssignment) -> Result<(), AgentError> {
        let Some(&newest) = lock(&self.newest).get(&a.job_id) else {
            return Ok(());
        };
        match &a.handoff {
            Some(h) if h.from_visit_id >= newest => Ok(()),
            Some(h) => Err(AgentError::Rollback(format!(
                "visit {} of job {} hands over the weights of visit {}, but this agent has \
                 already had those of visit {newest}",
                a.visit_id, a.job_id, h.from_visit_id
            ))),
            None => Err(AgentError::Rollback(format!(
                "visit {} of job {} starts from the initial weights, but this agent has already \
                 had those of visit {newest}",
                a.visit_id, a.job_id
            ))),
        }
    }

    /// Records that this agent completed assignment `a`: it opened `a`'s hand-off and sealed
    /// the weights of `a`'s visit.
    pub fn completed(&self, a: &VisitAssignment) -> Result<(), AgentError> {
        let seen = a
            .handoff
            .as_ref()
            .map_or(a.visit_id, |h| h.from_visit_id.max(a.visit_id));
        let mut newest = lock(&self.newest);
        let entry = newest.entry(a.job_id).or_insert(seen);
        *entry = (*entry).max(seen);
        match &self.path {
            Some(path) => state::write_json(path, &*newest),
            None => Ok(()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "medsplit-approvals-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn job(id: i64, batch: u32) -> JobToApprove {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": "j", "owner": "r@example.org", "status": "pending",
            "spec": { "name": "j", "hospitals": ["a"], "batch_size": batch },
        }))
        .unwrap()
    }

    fn assignment(job: &JobToApprove, visit: i64, from: Option<i64>) -> VisitAssignment {
        VisitAssignment {
            visit_id: visit,
            attempt: 1,
            job_id: job.id,
            round: 0,
            position: 0,
            spec: job.spec.clone(),
            handoff: from.map(|v| medsplit_engine::api::Handoff {
                from_visit_id: v,
                sender_agent_id: 2,
                sender_public_key: String::new(),
                sealed: String::new(),
            }),
            recipients: Vec::new(),
            lease_seconds: 30,
            max_epsilon: None,
            epsilon_spent: None,
            owner: Some(job.owner.clone()),
        }
    }

    #[test]
    fn only_an_approved_job_with_its_approved_digest_is_trained() {
        let dir = temp_dir();
        let approvals = Approvals::in_state_dir(&dir);
        let seven = job(7, 8);
        let a = assignment(&seven, 1, None);
        let e = approvals.check(&a).unwrap_err();
        assert!(e.to_string().contains("medsplit-agent approve 7"), "{e}");
        approvals.approve(&seven).unwrap();
        // Another process (the daemon) reads the same file.
        Approvals::in_state_dir(&dir).check(&a).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(APPROVALS))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The coordinator changes the batch size, or the owner, after the approval.
        let changed = assignment(&job(7, 1), 1, None);
        let e = approvals.check(&changed).unwrap_err();
        assert!(e.to_string().contains("changed since"), "{e}");
        let mut other_owner = a.clone();
        other_owner.owner = Some("someone@example.org".into());
        assert!(approvals.check(&other_owner).is_err());
        // Another job's approval does not cover it; a withdrawn approval no longer counts.
        assert!(approvals.check(&assignment(&job(8, 8), 1, None)).is_err());
        assert!(approvals.withdraw(7).unwrap());
        assert!(!approvals.withdraw(7).unwrap());
        assert!(approvals.check(&a).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn older_weights_than_already_seen_are_refused() {
        let dir = temp_dir();
        let seen = Handoffs::in_state_dir(&dir).unwrap();
        let j = job(7, 8);
        // Nothing seen yet: any hand-off, or none.
        seen.check(&assignment(&j, 3, Some(1))).unwrap();
        seen.check(&assignment(&j, 1, None)).unwrap();
        seen.completed(&assignment(&j, 3, Some(2))).unwrap();
        // Kept across restarts.
        let seen = Handoffs::in_state_dir(&dir).unwrap();
        // The same visit's weights again (a retried visit) or newer ones pass.
        seen.check(&assignment(&j, 5, Some(3))).unwrap();
        seen.check(&assignment(&j, 6, Some(4))).unwrap();
        for rollback in [assignment(&j, 5, Some(2)), assignment(&j, 5, None)] {
            let e = seen.check(&rollback).unwrap_err();
            assert!(matches!(e, AgentError::Rollback(_)), "{e}");
            assert!(e.to_string().contains("visit 3"), "{e}");
        }
        // Other jobs are their own.
        seen.check(&assignment(&job(8, 8), 1, None)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
