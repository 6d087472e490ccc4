//! The capture log on S3: one object per chunk the results stage writes, under
//! `capture/YYYY/MM/DD/HH/` of the `<prefix>-claims` bucket (SageMaker's data capture layout),
//! so a window is read by listing only the hours it spans.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;

use super::{classify, resources};
use crate::backend::CaptureLog;
use crate::capture::hour_path;
use crate::error::Result;

pub(super) struct S3CaptureLog {
    client: aws_sdk_s3::Client,
    bucket: String,
}

/// How long after its last line a chunk may be written: listing this far past a window's end
/// finds the chunk that holds its last lines.
const WRITE_DELAY_MARGIN_MS: u64 = 3_600_000;

impl S3CaptureLog {
    pub(super) fn new(client: aws_sdk_s3::Client, bucket: String) -> Self {
        Self { client, bucket }
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        super::s3::get_object(&self.client, &self.bucket, key, None).await
    }

    async fn put(&self, key: &str, data: Vec<u8>, content_type: &str) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify("PutObject", e))?;
        Ok(())
    }
}

#[async_trait]
impl CaptureLog for S3CaptureLog {
    async fn append(&self, lines: Vec<u8>, at_ms: u64) -> Result<()> {
        let key = format!(
            "{}{}/{at_ms:013}-{}.jsonl",
            resources::capture_key_prefix(),
            hour_path(at_ms),
            uuid::Uuid::new_v4().simple()
        );
        self.put(&key, lines, "application/x-ndjson").await
    }

    async fn chunks(&self, since_ms: u64, until_ms: u64) -> Result<Vec<String>> {
        let prefix = resources::capture_key_prefix();
        // Keys sort by hour, then by write time: start just before the window's first hour.
        let start_after = format!("{prefix}{}/", hour_path(since_ms));
        let last_hour = format!("{prefix}{}/~", hour_path(until_ms.saturating_add(WRITE_DELAY_MARGIN_MS)));
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        'pages: loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .start_after(&start_after)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify("ListObjectsV2", e))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                if key > last_hour.as_str() {
                    break 'pages;
                }
                keys.push(key.to_owned());
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(keys)
    }

    async fn chunk(&self, name: &str) -> Result<Option<Vec<u8>>> {
        // An object expired between the listing and now is simply not there.
        self.get(name).await
    }

    async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.get(&format!("{}{name}", resources::monitor_key_prefix())).await
    }

    async fn put_meta(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.put(&format!("{}{name}", resources::monitor_key_prefix()), data, "application/json").await
    }

    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, resources::capture_key_prefix())
    }
}
