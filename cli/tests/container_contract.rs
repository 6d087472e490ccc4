//! The images' runtime contract, proven without a container engine: each worker binary starts as
//! its ECS task's command would start it in the image (deploy/docker) — no flags, configuration
//! from `SLUICE__…` variables alone, user 65532 (distroless's nonroot) without capabilities, a
//! read-only root filesystem with only /tmp writable — drains a pipeline on the AWS stand-in,
//! answers its container health check (`--healthcheck`) and `/readyz` while it runs, logs JSON
//! lines (its stderr is no terminal), and exits 0 within its grace period after SIGTERM.
//!
//! The sandbox is bubblewrap (`bwrap`: a user namespace, `/` bound read-only, a tmpfs on /tmp);
//! `scripts/test` installs it where it is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, model_dir, wait_for};
use sluice_cli::digits::{Split, load_split};
use sluice_cli::produce::{DigitForm, digit_records, put_all, run_tag};
use sluice_core::backend::{Backend, StreamInput};
use sluice_core::telemetry::health::probe;
use sluice_core::testing::{SETUP_HINT, aws_endpoint, aws_store_config, free_port, unique_prefix};

const RECORDS: usize = 24;
const GRACE_MS: u64 = 10_000;

/// A worker's environment, as `(variable, value)` pairs.
type Environment = Vec<(&'static str, String)>;

/// What the ECS task definition sets (deploy/cdk/lib/compute-stack.ts) plus the image's own
/// `ENV`, pointed at the stand-in; the dummy credentials stand in for the task role's.
fn task_environment(prefix: &str, model: &Path) -> Environment {
    vec![
        ("SLUICE__STORE__BACKEND", "aws".to_owned()),
        ("SLUICE__STORE__AWS__PREFIX", prefix.to_owned()),
        ("SLUICE__STORE__AWS__REGION", "us-east-1".to_owned()),
        ("SLUICE__STORE__AWS__ENDPOINT_URL", aws_endpoint()),
        ("SLUICE__WORKER__SHUTDOWN_GRACE_MS", GRACE_MS.to_string()),
        ("SLUICE__MODEL__DIR", model.display().to_string()),
        ("RUST_LOG", "info".to_owned()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
    ]
}

/// `binary` as the container runs it: unprivileged, read-only `/`, a fresh /tmp, nothing but
/// `environment`, working directory `/`. The binary and the model stay readable where they are.
fn in_container(binary: &Path, model: &Path, environment: &[(&str, String)]) -> Command {
    let bwrap = which("bwrap").unwrap_or_else(|| {
        panic!(
            "the container-contract test runs the workers under bubblewrap: apt-get install bubblewrap, or {SETUP_HINT}"
        )
    });
    let mut cmd = Command::new(bwrap);
    cmd.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]);
    // After the tmpfs, so that a checkout or target directory under /tmp stays visible.
    for dir in [binary.parent().unwrap(), model] {
        cmd.arg("--ro-bind").arg(dir).arg(dir);
    }
    cmd.args(["--unshare-user", "--uid", "65532", "--gid", "65532", "--cap-drop", "ALL", "--die-with-parent"]);
    cmd.args(["--clearenv", "--chdir", "/"]);
    for (key, value) in environment {
        cmd.args(["--setenv", key, value]);
    }
    cmd.arg("--").arg(binary);
    cmd
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

#[test]
fn the_sandbox_is_read_only_and_unprivileged_but_for_tmp() {
    let run = |program: &str, args: &[&str]| {
        in_container(Path::new(program), &model_dir().canonicalize().unwrap(), &[]).args(args).output().unwrap()
    };
    let id = run("/usr/bin/id", &["-u"]);
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), "65532");
    let root = run("/usr/bin/touch", &["/sluice-probe"]);
    assert!(!root.status.success() && String::from_utf8_lossy(&root.stderr).contains("Read-only file system"));
    assert!(run("/usr/bin/touch", &["/tmp/sluice-probe"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_unprivileged_on_a_read_only_root_configured_by_environment_alone() {
    let prefix = unique_prefix("contract");
    let config = aws_store_config(&prefix);
    sluice_core::backend::aws::bootstrap::bootstrap(&config).await.unwrap();
    let backend = Backend::open_observer(&config).await.unwrap();
    let digits = load_split(Split::Test).unwrap();
    let mut records = digit_records(&digits[..RECORDS - 1], Split::Test, 1, DigitForm::Png, &run_tag());
    records.push(StreamInput { partition_key: "bad".to_owned(), data: b"{not json".to_vec() });
    put_all(&backend, records, &Default::default()).await.unwrap();

    let model = model_dir().canonicalize().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Each with a port of its own for its health endpoints (tests share the host).
    let workers: Vec<(common::Worker, Environment, u16)> =
        ["sluice-ingest", "sluice-features", "sluice-inference", "sluice-results"]
            .into_iter()
            .map(|name| {
                let port = free_port().unwrap();
                let mut environment = task_environment(&prefix, &model);
                environment.push(("SLUICE__TELEMETRY__PORT", port.to_string()));
                let log = dir.path().join(format!("{name}.log"));
                let child = in_container(&bin(name).canonicalize().unwrap(), &model, &environment)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap();
                (common::Worker { name: name.to_owned(), child, log }, environment, port)
            })
            .collect();

    let stats = wait_for(&backend, Duration::from_secs(120), "every record accounted for", |s| {
        s.records_in == RECORDS as u64 && s.accounted() == s.records_in && s.is_drained()
    })
    .await;
    assert_eq!(stats.dlq.values().sum::<u64>(), 1, "the bad record alone is in a DLQ: {stats:#?}");

    for (worker, environment, port) in workers {
        let binary = bin(&worker.name).canonicalize().unwrap();
        let healthcheck = || in_container(&binary, &model, &environment).arg("--healthcheck").output().unwrap();
        let answer = healthcheck();
        assert!(answer.status.success(), "{}: {}", worker.name, String::from_utf8_lossy(&answer.stderr));
        let address = ([127, 0, 0, 1], port).into();
        assert!(probe(address, "/readyz").await.unwrap(), "{} is ready", worker.name);
        // ECS signals the container's first process, the worker itself (bwrap passes no signal on).
        let pid = sandboxed_pid(worker.child.id());
        let log = worker.terminate_process(pid, Duration::from_millis(GRACE_MS + 5_000));
        assert!(log.contains("worker started"), "logged nothing useful:\n{log}");
        for line in log.lines() {
            let event: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
            assert!(event["level"].is_string() && event["message"].is_string(), "a log event: {line}");
        }
        assert!(!log.contains("Read-only file system"), "tried to write outside /tmp:\n{log}");
        assert!(!healthcheck().status.success(), "a stopped worker fails its health check");
    }
}

/// The worker bwrap started (its one child).
fn sandboxed_pid(bwrap: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{bwrap}/task/{bwrap}/children")).unwrap();
    children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("bwrap runs the worker as its child")
}
