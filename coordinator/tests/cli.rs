//! `medsplit-coordinator` as an operator runs it: plain errors, said once; no colours in logs
//! that go to a file or a pipe.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{PASSWORD, database_url};
use sqlx::PgPool as Pool;

/// Whether `create-admin` succeeded, and the error lines it printed.
fn create_admin(db_url: &str, email: &str, password: &str) -> (bool, Vec<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_medsplit-coordinator"))
        .args(["create-admin", "--email", email])
        .env("DATABASE_URL", db_url)
        .env("MEDSPLIT_ADMIN_PASSWORD", password)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("constraint") && !stderr.contains("duplicate key"),
        "{stderr}"
    );
    let errors = stderr
        .lines()
        .filter(|l| l.contains("error"))
        .map(str::to_string)
        .collect();
    (out.status.success(), errors)
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn create_admin_errors_are_said_once_and_plainly(pool: Pool) {
    let url = database_url(&pool).await;
    let (ok, err) = create_admin(&url, "root@example.org", PASSWORD);
    assert!(ok, "{err:?}");
    let (ok, err) = create_admin(&url, "root@example.org", PASSWORD);
    assert!(!ok);
    assert_eq!(err, ["error: a user with this email exists"]);
    let (ok, err) = create_admin(&url, "other@example.org", "short");
    assert!(!ok);
    assert_eq!(err, ["error: password: must be at least 12 characters"]);
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn logs_to_a_pipe_carry_no_colours(pool: Pool) {
    use std::os::unix::fs::OpenOptionsExt;
    let url = database_url(&pool).await;
    let dir = std::env::temp_dir().join(format!("medsplit-cli-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("jwt.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&key)
        .unwrap();
    std::io::Write::write_all(&mut f, b"test-signing-key-0123456789abcdef0123456789").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_medsplit-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--jwt-key-file"])
        .arg(&key)
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines
        .find_map(|l| l.ok().filter(|l| l.contains("listening")))
        .expect("the coordinator logged that it listens");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!line.contains('\u{1b}'), "ANSI escapes in {line:?}");
    assert!(line.contains("INFO"), "{line:?}");
}
