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
    /// one is `claim_check_missing`), it is the deployment's, unless the object itself is the
    /// one refused: producers write there too (`sluice produce`), and one put there under a KMS
    /// key of its own, or in an archive storage class, would otherwise stop ingest on it for
    /// good (a stream has no redrive to move it aside).
    async fn get_claim_checked(&self, reference: &str, limit: Option<usize>) -> Result<Vec<u8>> {
        let rejected = |e: SluiceError| {
            SluiceError::permanent(ReasonCode::ClaimCheckRejected, format!("claim-check {reference}: {}", e.detail()))
        };
        match self.get_within(reference, limit).await {
            Err(e) if e.is_misconfiguration() && !self.is_own(reference) => Err(rejected(e)),
            Err(e) if e.is_misconfiguration() => match self.refused_alone(reference).await {
                Some(why) => Err(SluiceError::permanent(
                    ReasonCode::ClaimCheckRejected,
                    format!("claim-check {reference}: {why}; {}", e.detail()),
                )),
                None => Err(e),
            },
            read => read,
        }
    }

    /// Why the object `reference` names is refused when objects beside it are not: this role
    /// may look at it (HeadObject needs what GetObject does, but neither the object's KMS key
    /// nor a restore), so the refusal is the object's. `None` when it may not, or the look fails:
    /// the refusal is the deployment's.
    async fn refused_alone(&self, reference: &str) -> Option<String> {
        let (bucket, key) = self.parse(reference).ok()?;
        let head = self.client.head_object().bucket(bucket).key(key).send().await.ok()?;
        let mut why = vec!["this object alone is refused".to_owned()];
        if let Some(class) = head.storage_class() {
            why.push(format!("storage class {}", class.as_str()));
        }
        if let Some(encryption) = head.server_side_encryption() {
            why.push(format!("encrypted with {}", encryption.as_str()));
        }
        if let Some(kms_key) = head.ssekms_key_id() {
            why.push(format!("key {kms_key}"));
        }
        Some(why.join(", "))
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
        if !self.allowed.iter().any(|entry| allows(entry, bucket, key)) {
            return Err(rejected(&format!("bucket {bucket:?} (or that key in it) is not in the allowlist")));
        }
        Ok((bucket, key))
    }
}

/// Whether an allowlist entry, `bucket` (any key in it) or `bucket/prefix` (keys under that
/// prefix only: one producer's part of a shared bucket), lets `key` in `bucket` be read.
fn allows(entry: &str, bucket: &str, key: &str) -> bool {
    match entry.split_once('/') {
        Some((allowed, prefix)) => allowed == bucket && key.starts_with(prefix),
        None => entry == bucket,
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

#[cfg(test)]
mod tests {
    use super::allows;

    #[test]
    fn an_entry_allows_a_bucket_or_the_keys_under_a_prefix_of_it() {
        assert!(allows("photos", "photos", "a/b.jpg"));
        assert!(!allows("photos", "photos-b", "a/b.jpg"));
        assert!(allows("shared/team-a/", "shared", "team-a/b.jpg"));
        assert!(!allows("shared/team-a/", "shared", "team-b/b.jpg"));
        assert!(!allows("shared/team-a/", "shared", "team-a"));
        assert!(!allows("shared/team-a/", "other", "team-a/b.jpg"));
    }
}
