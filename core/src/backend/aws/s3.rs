//! Claim-check blobs on S3, readable only from allowlisted buckets: a reference anywhere else
//! is a permanent error, never a fetch.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;

use super::{classify, error_code};
use crate::backend::BlobStore;
use crate::envelope::RecordId;
use crate::error::{ReasonCode, Result, SluiceError};

pub(super) struct S3BlobStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    allowed: Vec<String>,
}

impl S3BlobStore {
    pub(super) fn new(client: aws_sdk_s3::Client, bucket: String, extra_allowed: &[String]) -> Self {
        let mut allowed = vec![bucket.clone()];
        allowed.extend(extra_allowed.iter().cloned());
        Self { client, bucket, allowed }
    }

    /// The object `reference` names, of at most `limit` bytes where one is given.
    async fn get_within(&self, reference: &str, limit: Option<usize>) -> Result<Vec<u8>> {
        let (bucket, key) = self.parse(reference)?;
        get_object(&self.client, bucket, key, limit)
            .await?
            .ok_or_else(|| SluiceError::permanent(ReasonCode::ClaimCheckMissing, format!("no object {reference}")))
    }

    /// A claim-check's object. Refused in a producer's bucket, the read is the record's failure
    /// (`claim_check_rejected`), not the deployment's: S3 answers AccessDenied for a key that
    /// does not exist where the reader may not list the bucket, and a producer's object may be
    /// encrypted with a key sluice may not use; taken as a misconfiguration, one such reference
    /// would stop ingest and stall its shard for good. Refused among sluice's own claim-checks
    /// (its bucket, under the prefix whose keys the workers may read and list, so that a missing
    /// one is `claim_check_missing`), it is the deployment's.
    async fn get_claim_checked(&self, reference: &str, limit: Option<usize>) -> Result<Vec<u8>> {
        match self.get_within(reference, limit).await {
            Err(e) if e.is_misconfiguration() && !self.is_own(reference) => Err(SluiceError::permanent(
                ReasonCode::ClaimCheckRejected,
                format!("claim-check {reference}: {}", e.detail()),
            )),
            read => read,
        }
    }

    fn is_own(&self, reference: &str) -> bool {
        self.parse(reference).is_ok_and(|(bucket, key)| {
            bucket == self.bucket && key.starts_with(super::resources::claim_check_key_prefix())
        })
    }

    /// `s3://bucket/key` → (bucket, key), if the bucket is allowlisted.
    fn parse<'a>(&self, reference: &'a str) -> Result<(&'a str, &'a str)> {
        let rejected = |why: &str| {
            SluiceError::permanent(ReasonCode::ClaimCheckRejected, format!("claim-check {reference:?}: {why}"))
        };
        let rest = reference.strip_prefix("s3://").ok_or_else(|| rejected("not an s3:// reference"))?;
        let (bucket, key) = rest.split_once('/').ok_or_else(|| rejected("no key"))?;
        if key.is_empty() {
            return Err(rejected("no key"));
        }
        if !self.allowed.iter().any(|b| b == bucket) {
            return Err(rejected(&format!("bucket {bucket:?} is not in the allowlist")));
        }
        Ok((bucket, key))
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, data: Vec<u8>) -> Result<String> {
        let key = format!("{}{}", super::resources::claim_check_key_prefix(), RecordId::from_content(&data));
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify("PutObject", e))?;
        Ok(format!("s3://{}/{key}", self.bucket))
    }

    async fn get(&self, reference: &str) -> Result<Vec<u8>> {
        self.get_claim_checked(reference, None).await
    }

    async fn get_at_most(&self, reference: &str, limit: usize) -> Result<Vec<u8>> {
        self.get_claim_checked(reference, Some(limit)).await
    }
}

/// An object's bytes; `None` when there is no such key. One of more than `limit` bytes is
/// refused by its size before its body is read.
pub(super) async fn get_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    limit: Option<usize>,
) -> Result<Option<Vec<u8>>> {
    let object = match client.get_object().bucket(bucket).key(key).send().await {
        Ok(object) => object,
        Err(e) if error_code(&e) == Some("NoSuchKey") => return Ok(None),
        Err(e) => return Err(classify("GetObject", e)),
    };
    if let Some(limit) = limit
        && let Some(len) = object.content_length().and_then(|l| u64::try_from(l).ok()).filter(|&l| l > limit as u64)
    {
        return Err(crate::backend::blob_too_large(&format!("s3://{bucket}/{key}"), len, limit));
    }
    let bytes = object
        .body
        .collect()
        .await
        .map_err(|e| SluiceError::retryable(ReasonCode::StoreUnavailable, format!("GetObject body: {e}")))?;
    Ok(Some(bytes.into_bytes().to_vec()))
}
