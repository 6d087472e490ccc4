//! Helpers for tests that run the real binaries against a store file.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_core::backend::Backend;
use sluice_core::config::StoreConfig;
use sluice_core::stats::PipelineStats;

/// A binary of this workspace, built beside `sluice` by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_sluice")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits")
}

/// What every process a test starts shares: the shipped model bundle, a grace period, logs.
/// Health endpoints are off: tests run many workers on one host at once, and those that probe
/// them choose free ports. Their log filter is `info`, or `SLUICE_TEST_WORKER_LOG` when set
/// (e.g. `info,sluice_core=debug,aws_smithy_runtime=debug` to see a stuck worker's requests).
fn base_env(cmd: &mut Command) -> &mut Command {
    cmd.env("SLUICE__MODEL__DIR", model_dir())
        .env("SLUICE__WORKER__SHUTDOWN_GRACE_MS", "10000")
        .env("SLUICE__TELEMETRY__PORT", "0")
        .env("RUST_LOG", std::env::var("SLUICE_TEST_WORKER_LOG").as_deref().unwrap_or("info"))
}

/// Environment every process of an embedded-store test shares: short timeouts so a killed
/// worker's messages come back quickly, and the shipped model bundle.
pub fn test_env(cmd: &mut Command) -> &mut Command {
    base_env(cmd).env("SLUICE__STORE__VISIBILITY_TIMEOUT_MS", "3000").env("SLUICE__STORE__LEASE_DURATION_MS", "3000")
}

/// The dummy credentials and region local AWS stand-ins accept.
pub fn dummy_aws_credentials(cmd: &mut Command) -> &mut Command {
    cmd.env("AWS_ACCESS_KEY_ID", "testing").env("AWS_SECRET_ACCESS_KEY", "testing").env("AWS_REGION", "us-east-1")
}

/// The AWS backend on the test endpoint, under `prefix`, with the dummy credentials local
/// endpoints accept; the store's timeouts stay at their defaults.
pub fn aws_env<'a>(cmd: &'a mut Command, prefix: &str) -> &'a mut Command {
    dummy_aws_credentials(base_env(cmd))
        .env("SLUICE__STORE__BACKEND", "aws")
        .env("SLUICE__STORE__AWS__ENDPOINT_URL", sluice_core::testing::aws_endpoint())
        .env("SLUICE__STORE__AWS__PREFIX", prefix)
}

/// Runs `cmd` (a `sluice demo --json`), and checks its summary accounts for every record: the
/// 355 held-out digits and six corrupt ones, each in results, review or a DLQ, the six in
/// the ingest DLQ.
pub fn demo_summary(cmd: &mut Command) -> serde_json::Value {
    let summary = demo_output(cmd);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    let dlq: u64 = summary["dlq"].as_object().unwrap().values().map(n).sum();
    assert_eq!(n(&summary["records_in"]), n(&summary["results"]) + n(&summary["review"]) + dlq, "{summary}");
    assert_eq!(n(&summary["records_in"]), 355 + 6, "the held-out digits plus six corrupt records: {summary}");
    assert_eq!(n(&summary["dlq"]["ingest"]), 6, "{summary}");
    summary
}

/// Runs `cmd` (a `sluice demo --json`) and returns its summary, checking only that it succeeded.
pub fn demo_output(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn store_config(path: &Path) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        visibility_timeout_ms: 3000,
        lease_duration_ms: 3000,
        ..StoreConfig::default()
    }
}

/// A worker process whose stderr goes to a log file.
pub struct Worker {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn start(binary: &str, name: &str, store: &Path, logs: &Path) -> Self {
        Self::spawn(binary, name, logs, |cmd| {
            test_env(cmd).args(["--store", store.to_str().unwrap()]);
        })
    }

    /// `binary` as worker `name`, its stderr in `logs`, set up by `configure` (store, env).
    pub fn spawn(binary: &str, name: &str, logs: &Path, configure: impl FnOnce(&mut Command)) -> Self {
        let log = logs.join(format!("{name}.log"));
        let mut cmd = Command::new(bin(binary));
        configure(&mut cmd);
        cmd.args(["--worker-id", name]).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        Self { name: name.to_owned(), child: cmd.spawn().unwrap(), log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(self, within: Duration) -> String {
        let pid = self.child.id();
        self.terminate_process(pid, within)
    }

    /// SIGTERM to `pid` (the worker itself, where `child` is a sandbox around it), then wait for
    /// `child` to exit cleanly.
    pub fn terminate_process(mut self, pid: u32, within: Duration) -> String {
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                assert!(exit.success(), "{} exited with {exit} after SIGTERM:\n{}", self.name, self.log_text());
                return self.log_text();
            }
            assert!(Instant::now() < deadline, "{} did not stop within {within:?} of SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to finish or acknowledge anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Polls the store until `done` holds, or fails after `timeout`.
pub async fn wait_for(
    backend: &Backend,
    timeout: Duration,
    what: &str,
    done: impl Fn(&PipelineStats) -> bool,
) -> PipelineStats {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = PipelineStats::collect(backend).await.unwrap();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {stats:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `handled: N` a worker logs when it stops.
pub fn handled(log: &str) -> u64 {
    log.lines()
        .rev()
        .filter_map(|l| l.split("handled: ").nth(1))
        .find_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0)
}
