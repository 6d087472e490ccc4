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
    /// nor a restore), and it is archived, or encrypted under another KMS key than the bucket's
    /// own (which sluice's objects are written under). `None` otherwise, or when either look
    /// fails: the refusal is the deployment's (its own key disabled, its role short of a right).
    async fn refused_alone(&self, reference: &str) -> Option<String> {
        use aws_sdk_s3::types::StorageClass;
        let (bucket, key) = self.parse(reference).ok()?;
        let head = self.client.head_object().bucket(bucket).key(key).send().await.ok()?;
        let class = head.storage_class();
        if matches!(class, Some(StorageClass::Glacier | StorageClass::DeepArchive)) || head.archive_status().is_some() {
            let class = class.map_or("an archive tier", StorageClass::as_str);
            return Some(format!("this object alone is refused: it is archived ({class}) and must be restored first"));
        }
        let object_key = head.ssekms_key_id()?;
        let encryption = self.client.get_bucket_encryption().bucket(bucket).send().await.ok()?;
        let bucket_key = encryption.server_side_encryption_configuration().and_then(|c| {
            c.rules().iter().find_map(|r| r.apply_server_side_encryption_by_default()?.kms_master_key_id())
        });
        match bucket_key {
            Some(ours) if same_kms_key(ours, object_key) => None,
            _ => Some(format!(
                "this object alone is refused: it is encrypted under KMS key {object_key}, not the bucket's own"
            )),
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
        if !self.allowed.iter().any(|entry| allows(entry, bucket, key)) {
            return Err(rejected(&format!("bucket {bucket:?} (or that key in it) is not in the allowlist")));
        }
        Ok((bucket, key))
    }
}

/// Whether an allowlist entry, `bucket` (any key in it) or `bucket/prefix` (keys under that
/// prefix, as a folder: `team-a` is `team-a/`, not `team-ab/`; one producer's part of a shared
/// bucket), lets `key` in `bucket` be read.
fn allows(entry: &str, bucket: &str, key: &str) -> bool {
    match entry.split_once('/') {
        Some((allowed, prefix)) => {
            let folder = prefix.trim_end_matches('/');
            allowed == bucket
                && (folder.is_empty() || key.strip_prefix(folder).is_some_and(|rest| rest.starts_with('/')))
        }
        None => entry == bucket,
    }
}

/// Whether two names of KMS keys (a key id, a key ARN) may be the same key. An alias cannot be
/// told apart from the key it names without asking KMS: taken as the same (the refusal is then
/// the deployment's, and the worker stops rather than dead-letter records it may not be at
/// fault for).
fn same_kms_key(a: &str, b: &str) -> bool {
    let id = |k: &str| k.rsplit_once("key/").map_or(k, |(_, id)| id).to_owned();
    a.contains("alias/") || b.contains("alias/") || id(a) == id(b)
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
        assert!(allows("shared/team-a", "shared", "team-a/b.jpg"), "a prefix is a folder");
        assert!(!allows("shared/team-a", "shared", "team-ab/b.jpg"), "not another folder it begins");
        assert!(allows("shared/", "shared", "any/b.jpg"));
    }

    #[test]
    fn kms_keys_named_by_id_or_arn_are_told_apart() {
        use super::same_kms_key;
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert!(same_kms_key(arn, "1234abcd-12ab-34cd-56ef-1234567890ab"));
        assert!(same_kms_key(arn, arn));
        assert!(!same_kms_key(arn, "arn:aws:kms:eu-west-1:444455556666:key/0000abcd-12ab-34cd-56ef-1234567890ab"));
        assert!(same_kms_key("alias/sluice", arn), "an alias cannot be told apart: taken as the same");
    }
}
