//! The agent's state directory: its identity key and credential, written at enrolment.
//!
//! Files are created 0600 in a 0700 directory and refused at start-up if group or others can
//! read them. The HE secret key is not here: a fresh one is drawn for every visit and never
//! leaves memory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crypto_box::SecretKey;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} can be read by other users (mode {mode:o}); run `chmod go-rwx {path}`", path = .path.display())]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{0}: not a valid agent state file")]
    Invalid(PathBuf),
    #[error("{0} already holds an enrolled agent; remove it to enrol again")]
    Exists(PathBuf),
}

/// What enrolment left behind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub coordinator: String,
    pub agent_id: i64,
    pub hospital_id: i64,
    /// Long-lived credential, exchanged for short-lived tokens.
    pub credential: String,
}

pub struct AgentState {
    pub identity: Identity,
    pub secret_key: SecretKey,
}

const IDENTITY: &str = "identity.json";
const KEY: &str = "identity.key";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn check_private(path: &Path) -> Result<(), StateError> {
    let mode = fs::metadata(path).map_err(io(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StateError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// A new X25519 identity key.
pub fn new_key() -> SecretKey {
    SecretKey::generate(&mut crypto_box::aead::OsRng)
}

/// Makes sure the state can be written to `dir` before an enrolment token is spent on it:
/// creates the directory (0700), refuses one that already holds an identity, and writes,
/// syncs and removes a probe file.
pub fn prepare(dir: &Path) -> Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    if dir.join(IDENTITY).exists() {
        return Err(StateError::Exists(dir.to_path_buf()));
    }
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    let _ = fs::remove_file(&probe);
    let written = write_private(&probe, b"probe");
    let removed = fs::remove_file(&probe).map_err(io(&probe));
    written.and(removed)?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Writes the state after enrolment; refuses to overwrite an existing one.
pub fn save(dir: &Path, identity: &Identity, key: &SecretKey) -> Result<(), StateError> {
    prepare(dir)?;
    let id_path = dir.join(IDENTITY);
    let key_path = dir.join(KEY);
    let _ = fs::remove_file(&key_path);
    write_private(&key_path, &key.to_bytes())?;
    let json = serde_json::to_vec_pretty(identity).expect("serializable");
    write_private(&id_path, &json)
}

/// Reads the state, refusing files that others can read.
pub fn load(dir: &Path) -> Result<AgentState, StateError> {
    check_private(dir)?;
    let id_path = dir.join(IDENTITY);
    let key_path = dir.join(KEY);
    check_private(&id_path)?;
    check_private(&key_path)?;
    let identity: Identity = serde_json::from_slice(&fs::read(&id_path).map_err(io(&id_path))?)
        .map_err(|_| StateError::Invalid(id_path.clone()))?;
    let key: [u8; 32] = fs::read(&key_path)
        .map_err(io(&key_path))?
        .try_into()
        .map_err(|_| StateError::Invalid(key_path.clone()))?;
    Ok(AgentState {
        identity,
        secret_key: SecretKey::from(key),
    })
}

/// Whether a key file's bytes appear anywhere in `haystack` (for leak tests).
pub fn contains_key(haystack: &[u8], key: &SecretKey) -> bool {
    let k = key.to_bytes();
    haystack.windows(k.len()).any(|w| w == k)
}

/// Reads a JSON file of the state directory (pins, ledgers, approvals): its default if it does
/// not exist yet. `what` names the file's kind in errors.
pub fn read_json<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    what: &str,
) -> Result<T, crate::AgentError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| crate::AgentError::Config(format!("{}: not {what}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(crate::AgentError::Config(format!(
            "{}: {e}",
            path.display()
        ))),
    }
}

/// Replaces a JSON file of the state directory: written 0600 beside it, synced, then renamed
/// into place, so that a crash leaves the old file or the new one, never half of either.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), crate::AgentError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(value).expect("serializable"))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| crate::AgentError::Config(format!("{}: {e}", path.display())))
}
