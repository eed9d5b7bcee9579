//! `medsplit-agent` as an operator runs it: clear errors, never a panic.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_medsplit-agent"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stderr)
}

#[test]
fn run_refuses_missing_configs_and_exposed_state() {
    let dir = std::env::temp_dir().join(format!("medsplit-agent-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let (ok, err) = agent(&["run", "--config", dir.join("none.toml").to_str().unwrap()]);
    assert!(!ok && err.contains("none.toml"), "{err}");

    // A state directory whose key file others can read is refused before anything else.
    let state = dir.join("state");
    let key = medsplit_agent::state::new_key();
    let identity = medsplit_agent::state::Identity {
        coordinator: "http://127.0.0.1:9".into(),
        agent_id: 1,
        hospital_id: 1,
        credential: "c".into(),
    };
    medsplit_agent::state::save(&state, &identity, &key).unwrap();
    std::fs::set_permissions(
        state.join("identity.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[[sources]]\nformat = \"synthetic\"\npatients = 3\nbeats = 50\nseed = 1\n",
            state.display().to_string()
        ),
    )
    .unwrap();
    let (ok, err) = agent(&["run", "--config", config.to_str().unwrap()]);
    assert!(!ok && err.contains("can be read by other users"), "{err}");

    // Enrolling again into a used state directory is refused; so is an unreachable coordinator.
    let (ok, err) = agent(&[
        "enrol",
        "--coordinator",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("already holds an enrolled agent"),
        "{err}"
    );
    let (ok, err) = agent(&[
        "enrol",
        "--coordinator",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--state-dir",
        dir.join("fresh").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("unreachable"), "{err}");
    let (ok, err) = agent(&["enrol", "--coordinator", "ftp://x", "--token", "t"]);
    assert!(!ok && err.contains("not http(s)"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn enrol_checks_the_state_directory_before_it_spends_the_token() {
    let dir = std::env::temp_dir().join(format!("medsplit-agent-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A directory that cannot be created (a file is in the way): refused before the coordinator
    // is contacted, so the token is not spent (the coordinator here is unreachable).
    let blocker = dir.join("file");
    std::fs::write(&blocker, "").unwrap();
    let state = blocker.join("state");
    let (ok, err) = agent(&[
        "enrol",
        "--coordinator",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains(state.to_str().unwrap()), "{err}");
    assert!(!err.contains("unreachable"), "{err}");
    // A writable directory passes the check and leaves nothing behind.
    let fresh = dir.join("fresh");
    medsplit_agent::state::prepare(&fresh).unwrap();
    assert_eq!(std::fs::read_dir(&fresh).unwrap().count(), 0);
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o700
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh directory holding an enrolled agent's state (its coordinator unreachable) and its
/// configuration (a small synthetic cohort): the directory and the configuration's path.
fn enrolled_agent(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("medsplit-agent-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    let identity = medsplit_agent::state::Identity {
        coordinator: "http://127.0.0.1:9".into(),
        agent_id: 1,
        hospital_id: 1,
        credential: "c".into(),
    };
    medsplit_agent::state::save(&state, &identity, &medsplit_agent::state::new_key()).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[[sources]]\nformat = \"synthetic\"\npatients = 3\nbeats = 50\nseed = 1\n",
            state.display().to_string()
        ),
    )
    .unwrap();
    (dir, config)
}

#[test]
fn an_idle_agent_stops_on_sigterm_without_speaking_of_a_visit() {
    use std::io::{BufRead, BufReader};
    let (dir, config) = enrolled_agent("term");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medsplit-agent"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The coordinator is unreachable: the agent retries its claim, idle.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("claim failed") {
            break;
        }
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "{log}");
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(!log.contains("will be retried"), "{log}");
    // Before it connects, the agent reports its data: the source, then the split.
    for needle in [
        "data source source=synthetic (3 patients, seed 1) beats=50 patients=3 classes=N ",
        "preprocessing=inter_patient labels=aami",
        "held-out test set: patient-wise (test patients unseen in training) kind=patient",
        "train_patients=2 test_patients=syn1-",
    ] {
        assert!(log.contains(needle), "{needle:?} not in {log}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn logs_to_a_pipe_carry_no_colours() {
    use std::io::{BufRead, BufReader};
    let (_dir, config) = enrolled_agent("logs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_medsplit-agent"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .find_map(|l| l.ok().filter(|l| l.contains("agent starting")))
        .expect("the agent logged its start");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!line.contains('\u{1b}'), "ANSI escapes in {line:?}");
    assert!(line.contains("INFO"), "{line:?}");
}

#[test]
fn predict_takes_an_exported_model_or_a_job_and_says_which_is_missing() {
    let (ok, err) = agent(&["predict", "beats.f32"]);
    assert!(!ok && err.contains("--model"), "{err}");
    let (ok, err) = agent(&["predict", "--job", "1", "--model", "/tmp", "beats.f32"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // Private inference reads the agent's configuration for its identity and coordinator.
    let (ok, err) = agent(&[
        "predict",
        "--job",
        "1",
        "--config",
        "/nonexistent/agent.toml",
        "beats.f32",
    ]);
    assert!(!ok && err.contains("/nonexistent/agent.toml"), "{err}");
}

/// `approve` without a coordinator: the list, a withdrawal of nothing, and an approval that
/// cannot reach the coordinator records nothing.
#[test]
fn approve_lists_withdraws_and_records_nothing_it_could_not_show() {
    let (dir, config) = enrolled_agent("approve");
    let state = dir.join("state");
    let config = config.to_str().unwrap();
    let stdout = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_medsplit-agent"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            err,
        )
    };
    let (ok, out, _) = stdout(&["approve", "--config", config]);
    assert!(ok && out.contains("no job approved"), "{out}");
    let (ok, out, _) = stdout(&["approve", "7", "--withdraw", "--config", config]);
    assert!(ok && out.contains("was not approved"), "{out}");
    let (ok, _, err) = stdout(&["approve", "7", "--yes", "--config", config]);
    assert!(!ok && err.contains("unreachable"), "{err}");
    assert!(!state.join("approvals.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
