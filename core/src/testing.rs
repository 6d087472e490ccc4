//! Support for tests that need an AWS-compatible endpoint on 127.0.0.1.
//!
//! `SLUICE_TEST_AWS_ENDPOINT` names one (CI starts moto server once for the whole run); without
//! it, the first caller starts `moto_server` (from `pip install "moto[server]"`) on a free
//! loopback port, watched so that it stops when the test process does.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ENDPOINT_VAR: &str = "SLUICE_TEST_AWS_ENDPOINT";

static ENDPOINT: OnceLock<String> = OnceLock::new();

/// Store settings for a fresh, uniquely named set of resources on the test endpoint, with the
/// dummy credentials local endpoints accept.
pub fn aws_store_config(prefix: &str) -> crate::config::StoreConfig {
    let mut config = crate::config::StoreConfig { backend: crate::config::BackendKind::Aws, ..Default::default() };
    config.aws.endpoint_url = Some(aws_endpoint());
    config.aws.region = Some("us-east-1".to_owned());
    config.aws.prefix = prefix.to_owned();
    config.aws.access_key_id = Some("testing".to_owned());
    config.aws.secret_access_key = Some("testing".to_owned());
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
            start_moto().unwrap_or_else(|e| {
                panic!("AWS tests need an endpoint: set {ENDPOINT_VAR}, or `pip install \"moto[server]\"` ({e})")
            })
        })
        .clone()
}

fn start_moto() -> Result<String, String> {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
    let script = format!(
        "moto_server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & child=$!; \
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(format!("http://127.0.0.1:{port}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("moto_server did not start listening within 30 s (is it installed?)".to_owned())
}
