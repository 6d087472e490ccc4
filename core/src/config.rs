//! Configuration: one TOML file plus environment overrides (`SLUICE__SECTION__KEY`), the same
//! for every binary. Each component reads its own section into its own serde config struct.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

/// Every section of the configuration (`sluice.example.toml` has them all).
pub const SECTIONS: [&str; 9] =
    ["store", "worker", "telemetry", "model", "ingest", "features", "inference", "results", "monitor"];

/// The environment variables that override the file: `SLUICE__SECTION__KEY`.
fn env() -> Env {
    Env::prefixed("SLUICE__").split("__")
}

/// The `SLUICE__…` variables as written: figment's own `Env` reads a value that looks like a
/// number as one, so a setting that is text could not be set to `2` (a model version,
/// `SLUICE__INFERENCE__SAGEMAKER__MODEL_VERSION=2`: "found unsigned int, expected a string")
/// and `1.10` would arrive as `1.1`. Here a value is text unless it is written as a list, a
/// table or a quoted string; [`Settings::section`] reads text as a number or a boolean where one
/// is wanted (`extract_lossy`).
struct EnvText(Env);

impl figment::Provider for EnvText {
    fn metadata(&self) -> figment::Metadata {
        figment::Provider::metadata(&self.0)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, text) in self.0.iter() {
            let text = text.trim();
            let value = if text.starts_with(['[', '{', '"']) {
                text.parse().expect("figment's parse is infallible")
            } else {
                Value::from(text.to_owned())
            };
            insert(&mut dict, &key.as_str().split('.').collect::<Vec<_>>(), value);
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// Puts `value` at `path` (`store.aws.prefix`) in `dict`, making the tables on the way; a table
/// where one is already (`SLUICE__STORE__AWS={…}` beside `SLUICE__STORE__AWS__REGION`) is merged
/// into it. Values are left untagged, for the figment that merges them to tag as this provider's
/// (a figment merged into another keeps its own tags, and an error would not name its variable).
fn insert(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [key] => match (dict.get_mut(*key), value) {
            (Some(Value::Dict(_, old)), Value::Dict(_, new)) => {
                for (inner, value) in new {
                    insert(old, &[inner.as_str()], value);
                }
            }
            (_, value) => {
                dict.insert((*key).to_owned(), value);
            }
        },
        [key, rest @ ..] => {
            let entry = dict.entry((*key).to_owned()).or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// Each of figment's errors in a section, by the name its user wrote: `inference.batch_sise`
/// in a file, `SLUICE__INFERENCE__BATCH_SISE` in the environment (figment's own message names
/// its profile, `default.batch_sise`, or the bare `BATCH_SISE`).
fn describe(section: &str, errors: figment::Error) -> String {
    let from_env = figment::Provider::metadata(&env());
    let described: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = std::iter::once(section).chain(e.path.iter().map(String::as_str)).collect::<Vec<_>>();
            let place = match &e.metadata {
                Some(md) if *md == from_env => format!("SLUICE__{}", key.join("__").to_ascii_uppercase()),
                Some(md) => match &md.source {
                    Some(source) => format!("{} in {source}", key.join(".")),
                    None => format!("{} ({})", key.join("."), md.name),
                },
                None => key.join("."),
            };
            format!("{place}: {}", e.kind)
        })
        .collect();
    described.join("; ")
}

/// The layered configuration every binary starts from.
#[derive(Debug, Clone)]
pub struct Settings {
    figment: Figment,
}

impl Settings {
    /// Reads `file` (which must exist when given), then `SLUICE__SECTION__KEY` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!("config file {} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvText(env()));
        // A section no binary reads is a typo (`[inferenc]`, `SLUICE__INFERNCE__BATCH_SIZE`):
        // passed over, its settings would be lost without a word.
        let data = figment::Provider::data(&figment).map_err(|e| ConfigError(e.to_string()))?;
        for key in data.values().flat_map(|dict| dict.keys()) {
            if !SECTIONS.contains(&key.as_str()) {
                let from = figment
                    .find_metadata(key)
                    .map(|m| {
                        let source = m.source.as_ref().map(|s| format!(" {s}")).unwrap_or_default();
                        format!(" (from {}{source})", m.name)
                    })
                    .unwrap_or_default();
                return Err(ConfigError(format!(
                    "unknown section {key:?}{from}: the sections are {}",
                    SECTIONS.join(", ")
                )));
            }
        }
        Ok(Self { figment })
    }

    /// Settings from TOML text alone (no file, no environment): what a config file would give.
    pub fn from_toml(text: &str) -> Self {
        Self { figment: Figment::new().merge(Toml::string(text)) }
    }

    /// Overrides one value, as a command-line flag does (`key` is `section.field`).
    pub fn set(mut self, key: &str, value: impl Serialize) -> Self {
        self.figment = self.figment.merge(Serialized::default(key, value));
        self
    }

    /// One section, with defaults for whatever it leaves out. Unknown keys are errors.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T, ConfigError> {
        self.figment.focus(name).extract_lossy().map_err(|e| ConfigError(describe(name, e)))
    }

    pub fn store(&self) -> Result<StoreConfig, ConfigError> {
        let store: StoreConfig = self.section("store")?;
        // One key without the other would be passed over for the standard chain: against a
        // local endpoint, an account's own credentials.
        if store.aws.access_key_id.is_some() != store.aws.secret_access_key.is_some() {
            return Err(ConfigError(
                "store.aws.access_key_id and store.aws.secret_access_key are set together or not at all".to_owned(),
            ));
        }
        Ok(store)
    }

    pub fn worker(&self) -> Result<WorkerConfig, ConfigError> {
        self.section("worker")
    }

    pub fn model(&self) -> Result<ModelConfig, ConfigError> {
        self.section("model")
    }

    pub fn telemetry(&self) -> Result<crate::telemetry::health::TelemetryConfig, ConfigError> {
        self.section("telemetry")
    }
}

/// `[model]`: the bundle the features, inference and results stages share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Directory holding `model.toml` and `model.safetensors`.
    pub dir: PathBuf,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("models/digits") }
    }
}

/// Which implementation of the backend traits to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// One SQLite file: the default, for one machine.
    #[default]
    Embedded,
    /// Kinesis, SQS, DynamoDB and S3.
    Aws,
}

/// The command-line flags that choose the store, shared by every binary.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// The embedded store file (overrides `store.path`; without `--backend`, means `--backend
    /// embedded`).
    #[arg(long, conflicts_with_all = ["endpoint_url", "prefix"])]
    pub store: Option<PathBuf>,
    /// `embedded` or `aws` (overrides `store.backend`).
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    /// A local AWS-compatible endpoint such as `http://127.0.0.1:5000` (overrides
    /// `store.aws.endpoint_url`; without `--backend`, means `--backend aws`).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Prefix of every AWS resource name (overrides `store.aws.prefix`; without `--backend`,
    /// means `--backend aws`).
    #[arg(long)]
    pub prefix: Option<String>,
}

impl StoreArgs {
    pub fn apply(&self, mut settings: Settings) -> Settings {
        if let Some(path) = &self.store {
            settings = settings.set("store.path", path);
        }
        // An AWS prefix or endpoint named alone means AWS: the embedded default would pass
        // them over and open (or miss) sluice.sqlite. A store file named alone means that file,
        // whatever backend the file or the environment names (the images set
        // `SLUICE__STORE__BACKEND=aws`: `sluice dlq purge --store copy.sqlite` would purge AWS).
        let aws_named = self.prefix.is_some() || self.endpoint_url.is_some();
        match self.backend {
            Some(backend) => settings = settings.set("store.backend", backend),
            None if aws_named => settings = settings.set("store.backend", BackendKind::Aws),
            None if self.store.is_some() => settings = settings.set("store.backend", BackendKind::Embedded),
            None => {}
        }
        if let Some(url) = &self.endpoint_url {
            settings = settings.set("store.aws.endpoint_url", url);
        }
        if let Some(prefix) = &self.prefix {
            settings = settings.set("store.aws.prefix", prefix);
        }
        settings
    }
}

/// `[store]`: where the pipeline's state lives and how its queues behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: BackendKind,
    /// The embedded store's SQLite file.
    pub path: PathBuf,
    /// Shards of the stream (1 to [`MAX_SHARDS`]), fixed when the store or stream is made.
    #[serde(deserialize_with = "shard_count")]
    pub shards: u32,
    /// How long a received message stays invisible to other receivers (1 s at least).
    #[serde(deserialize_with = "a_second_or_more")]
    pub visibility_timeout_ms: u64,
    /// Receives after which an unacknowledged message moves to its stage's DLQ.
    pub max_receives: u32,
    /// How long a shard lease lasts without renewal before another worker may take it (1 s at
    /// least).
    #[serde(deserialize_with = "a_second_or_more")]
    pub lease_duration_ms: u64,
    /// The embedded stream deletes a record ingest has checkpointed once it is this old (from
    /// its arrival, as Kinesis keeps records 24 hours by default): the store file stops
    /// growing. A record not yet checkpointed is kept however old. 0 keeps every record.
    pub stream_retention_hours: u64,
    /// The embedded store keeps a feature vector this long after it was written (as the
    /// DynamoDB table's TTL, `store.aws.feature_ttl_days`: past a DLQ entry's replay), then
    /// deletes it: an image's vector is 147 KiB. A claim-checked payload too, once nothing
    /// refers to it (as the claim-check bucket's expiry on AWS). 0 keeps every vector and payload.
    pub feature_retention_days: u64,
    /// How long a write waits for another process's write to finish.
    pub busy_timeout_ms: u64,
    /// The embedded store: how often its checkpoint thread copies the write-ahead log into the
    /// database file, syncing both. Commits are not synced one by one (`synchronous = NORMAL`):
    /// a killed process loses nothing, but a power loss can take the commits since the last
    /// checkpoint. Longer: fewer copies of pages written again and again (each batch rewrites
    /// most of the record-id indexes' pages) — ~10% more records/s at 1,000 ms in
    /// `sluice bench pipeline` — for a longer window of commits a power loss can take.
    pub checkpoint_interval_ms: u64,
    /// `[store.aws]`: used when `backend = "aws"`.
    pub aws: AwsConfig,
    /// `[store.capture]`: the embedded store's prediction capture files.
    pub capture: CaptureFilesConfig,
}

/// `[store.capture]`: where the embedded store keeps its prediction capture log (on AWS it is
/// the `capture/` prefix of the `<prefix>-claims` bucket) and when a file is rotated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureFilesConfig {
    /// The directory of JSON-lines files; default: beside the store file, named after it
    /// (`sluice.sqlite` → `sluice.capture/`).
    pub dir: Option<PathBuf>,
    /// A file is closed and a new one started past this size…
    pub rotate_bytes: u64,
    /// …or once it is this old.
    pub rotate_after_s: u64,
    /// A file last written this long ago is deleted when the next one is started (as the
    /// claim-check bucket's lifecycle expires capture on AWS): at 100 records a second the
    /// files grow by a few GiB a day. Longer than `monitor.window_hours`. 0 keeps them all.
    pub retention_days: u64,
}

impl Default for CaptureFilesConfig {
    fn default() -> Self {
        Self { dir: None, rotate_bytes: 64 << 20, rotate_after_s: 3600, retention_days: 30 }
    }
}

impl StoreConfig {
    /// The embedded store's capture directory.
    pub fn capture_dir(&self) -> PathBuf {
        self.capture.dir.clone().unwrap_or_else(|| self.path.with_extension("capture"))
    }

    /// How often a stream reader that is busy with a batch renews its shard leases: a tenth of
    /// the embedded store's lease, a sixth of the AWS failover time (the coordinator renews a
    /// lease once a third of it has passed), well before another worker may take them.
    pub fn lease_renewal_every(&self) -> std::time::Duration {
        std::time::Duration::from_millis(match self.backend {
            BackendKind::Embedded => self.lease_duration_ms / 10,
            BackendKind::Aws => self.aws.lease_failover_ms / 6,
        })
    }

    /// Which store this is, the same from any process that opens it, made or not yet: the
    /// embedded file's whole path (its folder's links and `..` resolved), or the AWS prefix (the
    /// region or endpoint as configured may be spelt differently by two processes of one
    /// pipeline). `sluice top` reads only the workers of its own store by it.
    pub fn identity(&self) -> String {
        match self.backend {
            BackendKind::Embedded => {
                let absolute = std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone());
                let resolved = match (absolute.parent(), absolute.file_name()) {
                    (Some(folder), Some(name)) => std::fs::canonicalize(folder).map(|f| f.join(name)).ok(),
                    _ => None,
                };
                format!("embedded {}", resolved.unwrap_or(absolute).display())
            }
            BackendKind::Aws => format!("aws {}", self.aws.prefix),
        }
    }
}

/// `[store.aws]`: where the AWS resources are and what they are called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    /// Region; default from the standard chain (`AWS_REGION`, profile), else `us-east-1`.
    pub region: Option<String>,
    /// A local AWS-compatible endpoint (e.g. `http://127.0.0.1:5000`) instead of AWS.
    pub endpoint_url: Option<String>,
    /// A separate local endpoint for Kinesis only (e.g. a Kinesis emulator beside moto).
    pub kinesis_endpoint_url: Option<String>,
    /// Every resource is named `<prefix>-…`: stream `<prefix>-records`, queue
    /// `<prefix>-features`, table `<prefix>-results`, bucket `<prefix>-claims`, and so on.
    pub prefix: String,
    /// Buckets claim-check references may point into, besides `<prefix>-claims`: `bucket` (any
    /// key in it), or `bucket/prefix` (only keys under that prefix: one producer's part of a
    /// bucket others write too).
    pub claim_check_buckets: Vec<String>,
    /// A shard lease whose counter has not moved for this long (on the observer's clock) has
    /// expired and may be taken (1 s at least).
    #[serde(deserialize_with = "a_second_or_more")]
    pub lease_failover_ms: u64,
    /// Results expire this many days after they are written (DynamoDB TTL); 0 keeps them.
    pub result_ttl_days: u64,
    /// Feature vectors expire this many days after they are written (DynamoDB TTL; those
    /// offloaded to the bucket expire by its lifecycle): a vector is read by inference moments
    /// after it is written, and again only by a replay of an inference DLQ entry or a review.
    /// Longer than a message is kept in a work queue and then its DLQ (14 days each: an entry a
    /// worker dead-letters is a new message), so that a replay finds its vector. 0 keeps them (they would pile up for good: 147 KiB an
    /// ImageNet-sized image).
    pub feature_ttl_days: u64,
    /// The largest feature vector kept in its DynamoDB item (at most 380,000 bytes: the item
    /// limit is 400 KB); a larger one goes to the bucket and the item holds its reference.
    /// DynamoDB bills a write unit per KB, S3 a request per object: a 147 KiB ImageNet-sized
    /// vector costs ~148 write units and ~37 read units in its item (~$0.097 a thousand records
    /// on demand) against a PUT and a GET in S3 (~$0.0054 a thousand), for two more requests a
    /// record and S3's latency. Digits-sized vectors (under 1 KB) cost a unit either way.
    #[serde(deserialize_with = "an_item_or_less")]
    pub inline_vector_bytes: usize,
    /// Static credentials, for local endpoints only (they accept any). On AWS leave these
    /// unset: the standard chain (environment, profile, ECS task role…) is used.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
}

/// A credential: read from the configuration like a string, but shown as `***` by `Debug`, so
/// that a settings value in a log line, an error or a panic does not give it away.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for the one place that hands it to the SDK.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Default for AwsConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            kinesis_endpoint_url: None,
            prefix: "sluice".to_owned(),
            claim_check_buckets: Vec::new(),
            lease_failover_ms: 10_000,
            result_ttl_days: 0,
            feature_ttl_days: 30,
            inline_vector_bytes: INLINE_VECTOR_MOST,
            access_key_id: None,
            secret_access_key: None,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Embedded,
            path: PathBuf::from("sluice.sqlite"),
            shards: default_shards(),
            visibility_timeout_ms: 30_000,
            max_receives: 5,
            lease_duration_ms: 10_000,
            stream_retention_hours: 24,
            feature_retention_days: 21,
            busy_timeout_ms: 10_000,
            checkpoint_interval_ms: 100,
            aws: AwsConfig::default(),
            capture: CaptureFilesConfig::default(),
        }
    }
}

const fn default_shards() -> u32 {
    4
}

/// The most stream shards a store or stream is made with: far more than one machine's ingest
/// workers can use (a shard is read by one worker at a time), and over Kinesis's default
/// account quota, which AWS would refuse anyway.
pub const MAX_SHARDS: u32 = 1024;

fn shard_count<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let shards = u32::deserialize(deserializer)?;
    if !(1..=MAX_SHARDS).contains(&shards) {
        return Err(serde::de::Error::custom(format!("{shards} shards: a stream has 1 to {MAX_SHARDS}")));
    }
    Ok(shards)
}

/// A decimal setting (a share, a threshold) read as written: from the environment it comes as
/// text, which figment's lossy reading takes as an `f32` when it is short (`0.85` would be
/// 0.8500000238…, and 85 of 100 would fall under it); here the text is parsed as an `f64`.
pub fn decimal<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    struct Decimal;
    impl serde::de::Visitor<'_> for Decimal {
        type Value = f64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number")
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<f64, E> {
            v.trim().parse().map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
    }
    deserializer.deserialize_any(Decimal)
}

/// The most [`AwsConfig::inline_vector_bytes`] may be: DynamoDB's 400 KB item limit, less room
/// for the key and the other attributes.
pub const INLINE_VECTOR_MOST: usize = 380_000;

fn an_item_or_less<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    let bytes = usize::deserialize(deserializer)?;
    if bytes > INLINE_VECTOR_MOST {
        return Err(serde::de::Error::custom(format!(
            "{bytes} bytes: at most {INLINE_VECTOR_MOST} (a DynamoDB item holds 400 KB)"
        )));
    }
    Ok(bytes)
}

/// A time in milliseconds of at least a second. Less, and the workers of a stage take one
/// another's messages (a visibility of 0 shows a message again the moment it is taken) or shard
/// leases, or an idle worker polls without pause (a busy core on the embedded store; short polls,
/// billed, on SQS).
fn a_second_or_more<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let ms = u64::deserialize(deserializer)?;
    if ms < 1000 {
        return Err(serde::de::Error::custom(format!("{ms} ms: at least 1000")));
    }
    Ok(ms)
}

/// `[worker]`: the shared loop's timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Long-poll wait for the first message of a batch: while a queue is empty a worker sends one
    /// receive per wait (SQS waits at most 20 s). It returns as soon as a message arrives, and a
    /// stopping worker stops waiting at once, so a shorter wait only polls more often: 1 s at
    /// least (SQS waits in whole seconds).
    #[serde(deserialize_with = "a_second_or_more")]
    pub poll_wait_ms: u64,
    /// How long a worker may take to finish in-flight work after SIGTERM; the default stays under
    /// ECS's default 30 s stop timeout, so SIGKILL never cuts a batch short.
    pub shutdown_grace_ms: u64,
    /// Delay before a retryable failure is tried again (on SQS, rounded up to whole seconds).
    pub retry_delay_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { poll_wait_ms: 20_000, shutdown_grace_ms: 25_000, retry_delay_ms: 1_000 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        batch_size: usize,
    }

    #[test]
    fn a_prefix_or_endpoint_named_alone_means_aws() {
        let backend = |args: StoreArgs| args.apply(Settings::load(None).unwrap()).store().unwrap().backend;
        let prefix = || Some("ops".to_owned());
        assert_eq!(backend(StoreArgs::default()), BackendKind::Embedded);
        assert_eq!(backend(StoreArgs { prefix: prefix(), ..StoreArgs::default() }), BackendKind::Aws);
        assert_eq!(
            backend(StoreArgs { endpoint_url: Some("http://127.0.0.1:5000".into()), ..StoreArgs::default() }),
            BackendKind::Aws
        );
        let said = StoreArgs { prefix: prefix(), backend: Some(BackendKind::Embedded), ..StoreArgs::default() };
        assert_eq!(backend(said), BackendKind::Embedded);
    }

    /// `--store` alone is that file, whatever backend the file or the environment names.
    #[test]
    fn a_store_file_named_alone_means_embedded() {
        let aws = || Settings::from_toml("[store]\nbackend = \"aws\"\n");
        let file = || Some(PathBuf::from("copy.sqlite"));
        let store = StoreArgs { store: file(), ..StoreArgs::default() }.apply(aws()).store().unwrap();
        assert_eq!((store.backend, store.path), (BackendKind::Embedded, PathBuf::from("copy.sqlite")));
        assert_eq!(StoreArgs::default().apply(aws()).store().unwrap().backend, BackendKind::Aws);
        let said = StoreArgs { store: file(), backend: Some(BackendKind::Aws), ..StoreArgs::default() };
        assert_eq!(said.apply(aws()).store().unwrap().backend, BackendKind::Aws);
    }

    #[test]
    fn timings_under_a_second_and_half_a_key_pair_are_refused() {
        for (section, key) in [
            ("store", "visibility_timeout_ms"),
            ("store", "lease_duration_ms"),
            ("store.aws", "lease_failover_ms"),
            ("worker", "poll_wait_ms"),
        ] {
            let settings = |ms: u64| Settings::from_toml(&format!("[{section}]\n{key} = {ms}\n"));
            let read = |ms| match section {
                "worker" => settings(ms).worker().map(drop),
                _ => settings(ms).store().map(drop),
            };
            let err = read(999).unwrap_err().to_string();
            assert!(err.contains(&format!("{section}.{key}")) && err.contains("999 ms: at least 1000"), "{err}");
            assert!(read(1000).is_ok(), "{section}.{key} = 1000");
        }
        let half = Settings::from_toml("[store.aws]\naccess_key_id = \"local\"\n").store().unwrap_err();
        assert!(half.to_string().contains("set together or not at all"), "{half}");
        let both = "[store.aws]\naccess_key_id = \"local\"\nsecret_access_key = \"s3cr3t-value\"\n";
        let store = Settings::from_toml(both).store().unwrap();
        assert_eq!(store.aws.secret_access_key.as_ref().map(Secret::expose), Some("s3cr3t-value"));
        let shown = format!("{store:?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("secret_access_key: Some(***)"), "{shown}");
    }

    /// A store file and an AWS prefix or endpoint named together: one of them would be passed over.
    #[test]
    fn a_store_file_and_aws_names_are_refused_together() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            store: StoreArgs,
        }
        use clap::Parser as _;
        for aws in [["--prefix", "ops"], ["--endpoint-url", "http://127.0.0.1:5000"]] {
            let refused = Command::try_parse_from(["sluice", "--store", "s.sqlite", aws[0], aws[1]]).err();
            assert_eq!(refused.map(|e| e.kind()), Some(clap::error::ErrorKind::ArgumentConflict), "{aws:?}");
        }
        assert!(Command::try_parse_from(["sluice", "--store", "s.sqlite", "--backend", "embedded"]).is_ok());
    }

    /// One store is one identity however its path is written, before the file is made and after.
    #[test]
    fn a_store_is_known_by_its_whole_path_made_or_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let at = |path: PathBuf| StoreConfig { path, ..StoreConfig::default() }.identity();
        let plain = dir.path().join("d").join("p.sqlite");
        let roundabout = dir.path().join("d").join("..").join("d").join("p.sqlite");
        let before = at(roundabout.clone());
        assert_eq!(before, at(plain.clone()));
        std::fs::write(&plain, b"").unwrap();
        assert_eq!(at(roundabout), before, "made since");
        assert_ne!(at(dir.path().join("d").join("q.sqlite")), before);
        assert!(before.starts_with("embedded /"), "{before}");
    }

    #[test]
    fn sections_default_merge_and_reject_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sluice.toml");
        std::fs::write(&file, "[store]\nshards = 2\n[features]\nbatch_size = 7\n").unwrap();
        let settings = Settings::load(Some(&file)).unwrap();
        assert_eq!(settings.store().unwrap().shards, 2);
        assert_eq!(settings.section::<Demo>("features").unwrap().batch_size, 7);
        assert_eq!(settings.section::<Demo>("absent").unwrap(), Demo::default());
        let settings = settings.set("store.path", "/tmp/x.sqlite");
        assert_eq!(settings.store().unwrap().path, PathBuf::from("/tmp/x.sqlite"));

        std::fs::write(&file, "[store]\nshardz = 2\n").unwrap();
        let err = Settings::load(Some(&file)).unwrap().store().unwrap_err().to_string();
        assert!(err.starts_with("configuration: store.shardz in ") && err.contains("sluice.toml"), "{err}");
        assert!(err.contains("unknown field: found `shardz`"), "{err}");
        for shards in [0, MAX_SHARDS + 1] {
            std::fs::write(&file, format!("[store]\nshards = {shards}\n")).unwrap();
            let err = Settings::load(Some(&file)).unwrap().store().unwrap_err().to_string();
            assert!(err.contains("store.shards in ") && err.contains("a stream has 1 to 1024"), "{err}");
        }
        std::fs::write(&file, "[demo]\nbatch_size = 7\n").unwrap();
        assert!(Settings::load(Some(&file)).unwrap_err().to_string().contains("unknown section \"demo\""));
        assert!(Settings::load(Some(&dir.path().join("missing.toml"))).is_err());
    }
}
