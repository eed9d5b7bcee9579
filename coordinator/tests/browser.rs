//! The dashboard in a real browser: `web/tests/walkthrough.mjs` (playwright-core driving
//! Debian's Chromium) against a real coordinator process on a fresh database and a real
//! `medsplit-agent` process. `scripts/browser-deps` installs what it needs; this test fails,
//! naming the missing piece, when something is not installed. Its screenshots go to
//! `target/tmp/screenshots`, or to `MEDSPLIT_SCREENSHOT_DIR` (`scripts/screenshots` refreshes
//! `docs/screenshots` that way).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{PASSWORD, Server, database_url};
use sqlx::PgPool;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn dashboard_walkthrough_in_chromium(pool: PgPool) {
    let tests = repo().join("web/tests");
    assert!(
        tests.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/browser-deps (npm ci --prefix web/tests)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: install Debian's package `chromium` (scripts/browser-deps does)"
    );
    let agent = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("medsplit-agent");
    assert!(
        agent.exists(),
        "medsplit-agent is not built at {}",
        agent.display()
    );

    medsplit_coordinator::create_admin(&pool, "root@medsplit.example", PASSWORD)
        .await
        .unwrap();
    // The production lease: a visit here lasts longer than the short lease other tests use.
    let server = Server::start(&database_url(&pool).await, 0, &["--lease-seconds", "30"]).await;
    let screenshots = std::env::var_os("MEDSPLIT_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots"));
    let work = server.dir.join("walkthrough");
    std::fs::create_dir_all(&work).unwrap();
    let status = tokio::process::Command::new("node")
        .arg(tests.join("walkthrough.mjs"))
        .env("MEDSPLIT_URL", &server.url)
        .env("ADMIN_EMAIL", "root@medsplit.example")
        .env("ADMIN_PASSWORD", PASSWORD)
        .env("AGENT_BIN", &agent)
        .env("WORK_DIR", &work)
        .env("SCREENSHOT_DIR", screenshots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .expect("node runs (install Node.js 20 or later)");
    assert!(
        status.success(),
        "the browser walk-through failed ({status})"
    );
}
