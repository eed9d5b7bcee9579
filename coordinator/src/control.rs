//! Ending sessions wherever they are open. Several replicas share one database, and a session
//! lives in the process that accepted its WebSocket: a revocation, a hospital's disabling, a
//! cancellation, a lost lease or a failed job decided on one replica must reach sessions on all.
//!
//! The deciding transaction calls [`announce`], a `NOTIFY` on [`db::CONTROL_CHANNEL`] that
//! Postgres delivers to every listening replica when (and only if) the transaction commits; the
//! decider also applies it at once with [`apply`]. A replica that was not listening (its
//! connection dropped) catches up through [`check_open_sessions`], which the sweep runs every
//! tick: it asks the database whether each open session's attempt still holds its visit.

use crate::{AppState, Sessions, db};

/// Which sessions to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The training session of one visit (lease lost, released, re-queued).
    Visit(i64),
    /// Every session of a job (cancelled, failed).
    Job(i64),
    /// Every session of an agent (revoked).
    Agent(i64),
    /// Every session of a hospital's agents (disabled).
    Hospital(i64),
}

impl Stop {
    /// `kind:id:code`, e.g. `agent:12:4403`.
    fn payload(self, code: u16) -> String {
        let (kind, id) = match self {
            Self::Visit(id) => ("visit", id),
            Self::Job(id) => ("job", id),
            Self::Agent(id) => ("agent", id),
            Self::Hospital(id) => ("hospital", id),
        };
        format!("{kind}:{id}:{code}")
    }

    /// The inverse of [`Stop::payload`]; `None` for anything else.
    fn parse(payload: &str) -> Option<(Self, u16)> {
        let mut parts = payload.split(':');
        let (kind, id, code) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let id: i64 = id.parse().ok()?;
        let stop = match kind {
            "visit" => Self::Visit(id),
            "job" => Self::Job(id),
            "agent" => Self::Agent(id),
            "hospital" => Self::Hospital(id),
            _ => return None,
        };
        Some((stop, code.parse().ok()?))
    }
}

/// Tells every replica, when the transaction commits, to end the sessions `stop` names with
/// close code `code`.
pub async fn announce(e: impl sqlx::PgExecutor<'_>, stop: Stop, code: u16) -> sqlx::Result<()> {
    db::notify_control(e, &stop.payload(code)).await
}

/// Ends the sessions `stop` names that are open on this replica.
pub fn apply(sessions: &Sessions, stop: Stop, code: u16) {
    sessions.stop_where(code, |key, s| match stop {
        Stop::Visit(id) => key == id,
        Stop::Job(id) => s.job_id == id,
        Stop::Agent(id) => s.agent_id == id,
        Stop::Hospital(id) => s.hospital_id == id,
    });
}

/// Applies a notification received on [`db::CONTROL_CHANNEL`]; ignores one it cannot read.
pub fn received(state: &AppState, payload: &str) {
    match Stop::parse(payload) {
        Some((stop, code)) => apply(&state.sessions, stop, code),
        None => tracing::warn!(payload, "unreadable control notification"),
    }
}

/// The polling fallback: ends open training sessions whose attempt no longer holds its visit
/// (with [`close::FENCED`](medsplit_engine::api::close::FENCED)) or whose agent may no longer
/// train (with [`close::REVOKED`](medsplit_engine::api::close::REVOKED)).
pub async fn check_open_sessions(state: &AppState) -> sqlx::Result<()> {
    let open = state.sessions.training();
    if open.is_empty() {
        return Ok(());
    }
    let visits: Vec<i64> = open.iter().map(|o| o.0).collect();
    let attempts: Vec<i32> = open.iter().map(|o| o.1).collect();
    let agents: Vec<i64> = open.iter().map(|o| o.2).collect();
    for s in db::check_sessions(&state.db, &visits, &attempts, &agents).await? {
        let code = if !s.active {
            medsplit_engine::api::close::REVOKED
        } else if !s.held {
            medsplit_engine::api::close::FENCED
        } else {
            continue;
        };
        tracing::info!(
            visit = s.visit_id,
            code,
            "session ended by the periodic check"
        );
        apply(&state.sessions, Stop::Visit(s.visit_id), code);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_read_back_and_nothing_else_reads() {
        for stop in [
            Stop::Visit(7),
            Stop::Job(1),
            Stop::Agent(i64::MAX),
            Stop::Hospital(3),
        ] {
            assert_eq!(Stop::parse(&stop.payload(4409)), Some((stop, 4409)));
        }
        for bad in [
            "",
            "visit",
            "visit:7",
            "visit:x:4409",
            "visit:7:99999",
            "user:7:4409",
            "visit:7:4409:1",
        ] {
            assert_eq!(Stop::parse(bad), None, "{bad}");
        }
    }
}
