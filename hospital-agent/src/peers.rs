//! Pinned peer keys. Agents learn each other's public keys from the coordinator (an
//! assignment's recipients and its hand-off's sender), so a coordinator could put a key of its
//! own in their place and open the client weights sealed to it. The agent remembers the key of
//! every agent id the first time it sees it (`peer-keys.json` in the state directory) and
//! refuses, before any data is read, an assignment that gives a known agent another key, or
//! this agent a key that is not its own. Hospitals compare fingerprints out of band
//! (`medsplit-agent keys`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use medsplit_engine::api::{VisitAssignment, key_fingerprint};
use serde::{Deserialize, Serialize};

use crate::{AgentError, state};

const FILE: &str = "peer-keys.json";

#[derive(Default, Serialize, Deserialize)]
struct PinFile {
    /// Public key (base64) per agent id, as first seen.
    agents: BTreeMap<i64, String>,
}

/// The keys this agent has pinned: kept in memory, and in the state directory when it has one.
#[derive(Debug, Default)]
pub struct PeerKeys {
    path: Option<PathBuf>,
    pinned: Mutex<BTreeMap<i64, String>>,
}

impl PeerKeys {
    /// The pins of the agent whose state directory is `dir` (none yet if the file is absent).
    pub fn in_state_dir(dir: &Path) -> Result<Self, AgentError> {
        let path = dir.join(FILE);
        let pinned = read(&path)?;
        Ok(Self {
            path: Some(path),
            pinned: Mutex::new(pinned),
        })
    }

    /// The pinned keys by agent id.
    pub fn pinned(&self) -> BTreeMap<i64, String> {
        self.lock().clone()
    }

    /// Checks the keys that assignment `a` gives for agents against the pins, and this agent's
    /// own (`own_id`, `own_key`); pins the keys of agents seen for the first time.
    pub fn check(&self, a: &VisitAssignment, own_id: i64, own_key: &str) -> Result<(), AgentError> {
        let given = a
            .recipients
            .iter()
            .map(|r| (r.agent_id, r.public_key.as_str(), "a recipient"))
            .chain(a.handoff.iter().map(|h| {
                (
                    h.sender_agent_id,
                    h.sender_public_key.as_str(),
                    "the hand-off's sender",
                )
            }));
        let mut pinned = self.lock();
        let mut new = Vec::new();
        for (agent, key, role) in given {
            let expected = if agent == own_id {
                Some(own_key)
            } else {
                pinned.get(&agent).map(String::as_str)
            };
            match expected {
                Some(k) if k != key => {
                    return Err(AgentError::KeyChanged(format!(
                        "the coordinator gives agent {agent} ({role}) the key {}, but this agent \
                         {} {}",
                        fingerprint(key),
                        if agent == own_id { "holds" } else { "pinned" },
                        fingerprint(k)
                    )));
                }
                Some(_) => {}
                None => new.push((agent, key.to_string())),
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        pinned.extend(new);
        if let Some(path) = &self.path {
            write(path, &pinned)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, String>> {
        self.pinned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read(path: &Path) -> Result<BTreeMap<i64, String>, AgentError> {
    Ok(state::read_json::<PinFile>(path, "a key file")?.agents)
}

/// Writes the pins (0600, then renamed into place).
fn write(path: &Path, agents: &BTreeMap<i64, String>) -> Result<(), AgentError> {
    state::write_json(
        path,
        &PinFile {
            agents: agents.clone(),
        },
    )
}

/// A key's fingerprint ([`key_fingerprint`]); a key that is not base64 is fingerprinted as
/// text.
pub fn fingerprint(key: &str) -> String {
    key_fingerprint(&B64.decode(key).unwrap_or_else(|_| key.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn key(byte: u8) -> String {
        B64.encode([byte; 32])
    }

    fn assignment(recipients: &[(i64, String)], sender: Option<(i64, String)>) -> VisitAssignment {
        serde_json::from_value(serde_json::json!({
            "visit_id": 1, "attempt": 1, "job_id": 7, "round": 1, "position": 0,
            "spec": { "name": "j", "hospitals": ["a"] },
            "handoff": sender.map(|(id, k)| serde_json::json!({
                "from_visit_id": 1, "sender_agent_id": id, "sender_public_key": k, "sealed": "",
            })),
            "recipients": recipients.iter().map(|(id, k)| serde_json::json!({
                "agent_id": id, "public_key": k,
            })).collect::<Vec<_>>(),
            "lease_seconds": 30,
        }))
        .unwrap()
    }

    #[test]
    fn keys_are_pinned_on_first_sight_and_a_changed_one_is_refused() {
        let dir = std::env::temp_dir().join(format!(
            "medsplit-peers-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        let own = key(1);
        let peers = PeerKeys::in_state_dir(&dir).unwrap();
        let first = assignment(&[(1, own.clone()), (2, key(2))], Some((3, key(3))));
        peers.check(&first, 1, &own).unwrap();
        assert_eq!(peers.pinned().len(), 2, "the peers, not this agent itself");
        // Read back after a restart: the same pins, kept 0600.
        let again = PeerKeys::in_state_dir(&dir).unwrap();
        assert_eq!(again.pinned(), peers.pinned());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        again.check(&first, 1, &own).unwrap();
        // A substituted recipient, a substituted sender, a key for this agent that is not its own.
        for (bad, who) in [
            (assignment(&[(2, key(9))], None), "agent 2 (a recipient)"),
            (
                assignment(&[], Some((3, key(9)))),
                "agent 3 (the hand-off's sender)",
            ),
            (assignment(&[(1, key(9))], None), "agent 1 (a recipient)"),
        ] {
            let e = again.check(&bad, 1, &own).unwrap_err();
            assert!(
                matches!(&e, AgentError::KeyChanged(m) if m.contains(who)),
                "{e}"
            );
            assert!(e.to_string().contains(&fingerprint(&key(9))), "{e}");
        }
        // A new agent is pinned; nothing about the known ones changed.
        again
            .check(&assignment(&[(4, key(4))], None), 1, &own)
            .unwrap();
        assert_eq!(again.pinned().len(), 3);
        assert_eq!(again.pinned()[&2], key(2));
    }

    #[test]
    fn fingerprints_are_short_stable_hex() {
        let f = fingerprint(&key(2));
        assert_eq!(f.len(), 8 * 4 + 7);
        assert_eq!(f, fingerprint(&key(2)));
        assert_ne!(f, fingerprint(&key(3)));
    }
}
