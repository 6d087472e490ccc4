//! Support for tests that need an AWS-compatible endpoint on 127.0.0.1.
//!
//! `SLUICE_TEST_AWS_ENDPOINT` names one (CI starts moto server once for the whole run); without
//! it, the first caller starts moto server (from `pip install "moto[server]"`, through
//! `scripts/moto-server`, which fixes three of moto's faults first) on a free loopback port,
//! watched so that it stops when the test process does. The Kinesis emulator and the local
//! SageMaker XGBoost endpoint are found, or started, the same way. [`FaultProxy`] puts
//! AWS's bad days (throttling, 5xx, latency, dropped connections) between a test and the stand-in.
//! [`images`] makes the small images tests feed the image stages; [`Logged`] keeps what a test logs.

mod fault_proxy;
pub mod images;
mod logged;
pub use logged::Logged;

pub use fault_proxy::{FaultCounts, FaultProxy, FaultRates};

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ENDPOINT_VAR: &str = "SLUICE_TEST_AWS_ENDPOINT";
/// A Kinesis emulator that behaves like Kinesis where moto does not (closed shards end).
pub const KINESIS_ENDPOINT_VAR: &str = "SLUICE_TEST_KINESIS_ENDPOINT";

static ENDPOINT: OnceLock<String> = OnceLock::new();
static KINESIS_ENDPOINT: OnceLock<String> = OnceLock::new();

/// A local stand-in for a SageMaker XGBoost endpoint (`deploy/sagemaker/local_endpoint.py`).
pub const XGBOOST_ENDPOINT_VAR: &str = "SLUICE_TEST_XGBOOST_ENDPOINT";
/// What `deploy/sagemaker/train_xgboost.py` wrote for the model that endpoint serves.
pub const XGBOOST_MODEL_VAR: &str = "SLUICE_TEST_XGBOOST_MODEL";
/// The Python with `deploy/sagemaker/requirements.txt` installed (default `python3`).
pub const PYTHON_VAR: &str = "SLUICE_TEST_PYTHON";

/// What a test that lacks a local stand-in tells the developer to run.
pub const SETUP_HINT: &str =
    "scripts/test (the README's test command) installs every local stand-in and runs the tests with them";

/// The local XGBoost endpoint and the training run behind the model it serves.
#[derive(Debug, Clone)]
pub struct XgboostEndpoint {
    pub url: String,
    /// `model.tar.gz`, `test_features.csv`, `test_predictions.csv`, `metrics.json`.
    pub model_dir: std::path::PathBuf,
}

static XGBOOST: OnceLock<XgboostEndpoint> = OnceLock::new();

/// The local SageMaker XGBoost endpoint: `SLUICE_TEST_XGBOOST_ENDPOINT` with
/// `SLUICE_TEST_XGBOOST_MODEL`, or else the model is trained into a temporary folder and the
/// endpoint started on a free loopback port, with `SLUICE_TEST_PYTHON` (or `python3`).
///
/// # Panics
/// If there is none and the Python side cannot train or serve.
pub fn xgboost_endpoint() -> XgboostEndpoint {
    XGBOOST
        .get_or_init(|| {
            if let (Ok(url), Ok(dir)) = (std::env::var(XGBOOST_ENDPOINT_VAR), std::env::var(XGBOOST_MODEL_VAR)) {
                return XgboostEndpoint { url, model_dir: dir.into() };
            }
            let python = std::env::var(PYTHON_VAR).unwrap_or_else(|_| "python3".to_owned());
            let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sagemaker");
            let model_dir = std::env::temp_dir().join(format!("sluice-xgboost-{}", std::process::id()));
            let hint = format!("pip install -r deploy/sagemaker/requirements.txt, or {SETUP_HINT}");
            let trained = Command::new(&python)
                .arg(scripts.join("train_xgboost.py"))
                .arg("--out")
                .arg(&model_dir)
                .stdout(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("{python}: {e} ({hint})"));
            assert!(trained.success(), "train_xgboost.py failed ({hint}; or set {XGBOOST_ENDPOINT_VAR})");
            let url = start_watched(&format!(
                "exec {python} {} --model {} --port {{port}}",
                scripts.join("local_endpoint.py").display(),
                model_dir.join("model.tar.gz").display()
            ))
            .unwrap_or_else(|e| panic!("the local XGBoost endpoint did not start: {e} ({hint})"));
            XgboostEndpoint { url, model_dir }
        })
        .clone()
}

/// The Kinesis emulator to test resharding against: `SLUICE_TEST_KINESIS_ENDPOINT`, or
/// `kinesis-local` (npm) started on a free loopback port.
///
/// # Panics
/// If there is none and `kinesis-local` cannot be started.
pub fn kinesis_endpoint() -> String {
    KINESIS_ENDPOINT
        .get_or_init(|| {
            if let Ok(url) = std::env::var(KINESIS_ENDPOINT_VAR) {
                return url;
            }
            let tls_port = free_port().unwrap_or(0);
            // kinesis-local reads its TLS certificate (server.json) from the working directory.
            start_watched(&format!(
                "cd \"$(dirname \"$(readlink -f \"$(command -v kinesis-local)\")\")\" && \
                 KINESIS_MOCK_PLAIN_PORT={{port}} KINESIS_MOCK_TLS_PORT={tls_port} SHARD_LIMIT=100 exec node main.js"
            ))
            .unwrap_or_else(|e| {
                panic!("resharding tests need a Kinesis emulator: {SETUP_HINT}; or set {KINESIS_ENDPOINT_VAR}, or `npm install -g kinesis-local` ({e})")
            })
        })
        .clone()
}

/// Store settings for a fresh, uniquely named set of resources on the test endpoint, with the
/// dummy credentials local endpoints accept.
pub fn aws_store_config(prefix: &str) -> crate::config::StoreConfig {
    let mut config = crate::config::StoreConfig { backend: crate::config::BackendKind::Aws, ..Default::default() };
    config.aws.endpoint_url = Some(aws_endpoint());
    config.aws.region = Some("us-east-1".to_owned());
    config.aws.prefix = prefix.to_owned();
    config.aws.access_key_id = Some("testing".to_owned());
    config.aws.secret_access_key = Some(crate::config::Secret::new("testing"));
    config
}

/// A resource prefix no other test uses.
pub fn unique_prefix(name: &str) -> String {
    format!("t-{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]).replace('_', "-").to_lowercase()
}

/// The endpoint URL to test against, starting moto server if needed.
///
/// # Panics
/// If there is no endpoint and `moto_server` cannot be started: the AWS tests cannot run.
pub fn aws_endpoint() -> String {
    ENDPOINT
        .get_or_init(|| {
            if let Ok(url) = std::env::var(ENDPOINT_VAR) {
                return url;
            }
            // The Python that `moto_server` runs on (its first line) runs the wrapper.
            let wrapper = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/moto-server");
            start_watched(&format!(
                "exec \"$(sed -n '1s/^#!//p' \"$(command -v moto_server)\")\" \"{}\" -H 127.0.0.1 -p {{port}}",
                wrapper.display()
            ))
            .unwrap_or_else(|e| {
                panic!("AWS tests need an endpoint: {SETUP_HINT}; or set {ENDPOINT_VAR}, or `pip install \"moto[server]\"` ({e})")
            })
        })
        .clone()
}

/// A loopback port nothing listens on now.
pub fn free_port() -> Result<u16, String> {
    Ok(TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port())
}

/// Starts `command` (with `{port}` replaced by a free loopback port) under a watcher that stops
/// it when this process ends, and waits until it listens.
fn start_watched(command: &str) -> Result<String, String> {
    let port = free_port()?;
    let command = command.replace("{port}", &port.to_string());
    let script = format!(
        "({command}) >/dev/null 2>&1 & child=$!; \
         while kill -0 {parent} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 1; done; kill $child 2>/dev/null",
        parent = std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(format!("http://127.0.0.1:{port}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("`{command}` did not start listening within 60 s (is it installed?)"))
}

/// A result as tests write one: confidence 0.9 of two classes, model `m` version `1` on the CPU,
/// no stage times.
pub fn prediction_result(
    record: &str,
    label: &str,
    status: crate::record::ResultStatus,
) -> crate::record::PredictionResult {
    crate::record::PredictionResult {
        record_id: crate::envelope::RecordId::parse(record).expect("a valid record id"),
        label: label.to_owned(),
        confidence: 0.9,
        probabilities: vec![0.1, 0.9],
        model: "m".to_owned(),
        model_version: "1".to_owned(),
        backend: "candle-cpu".to_owned(),
        status,
        ground_truth: None,
        reviewed_label: None,
        reviewed_ms: None,
        timestamps: crate::envelope::StageTimes::default(),
        attributes: std::collections::BTreeMap::new(),
        unknown: serde_json::Map::new(),
    }
}
