//! Files: JSONL inputs a tenant uploads for batches, and the output and error files batches
//! write. The bytes live in an object store (`object_store`: S3, GCS, Azure or a local
//! directory, from `--files-store`); the metadata in Redis, under the tenant's keys, so another
//! tenant's file id finds nothing.
//!
//! An upload is streamed: each line is checked ([`lines::LineChecker`]) as it arrives and
//! written to a multipart upload that is only completed once every line passed. A bad line
//! aborts the upload, so nothing is stored.

pub mod lines;
mod settings;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sluice_jobs::keyspace::Keyspace;
use sluice_jobs::redis_pool::{Pool, PoolError};
use sluice_jobs::store::StoreError;
use sluice_proto::ErrorCode;
use utoipa::ToSchema;
use uuid::Uuid;

pub use settings::FileSettings;

use crate::error::ApiError;

/// What a file is for: `batch` for uploads, `batch_output` for what a batch writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Batch,
    BatchOutput,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Batch => "batch",
            Purpose::BatchOutput => "batch_output",
        }
    }
}

/// A file, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileObject {
    /// `file-` and 32 hexadecimal digits (a batch's output and error files: the batch's
    /// digits and `-output` or `-errors`).
    pub id: String,
    /// Always `file`.
    #[schema(pattern = "^file$")]
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Never expires on its own: `null`.
    #[schema(value_type = Option<u64>)]
    pub expires_at: Option<u64>,
    pub filename: String,
    pub purpose: Purpose,
    /// Always `processed`: a file is listed only once it is completely stored.
    #[schema(pattern = "^processed$")]
    pub status: String,
    /// Lines in the file.
    pub lines: u64,
}

/// The file tier: an object store for the bytes, Redis for the metadata.
#[derive(Clone)]
pub struct FileStore {
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    pool: Pool,
    ks: Keyspace,
    pub limits: FileLimits,
}

/// What one upload may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimits {
    pub max_bytes: u64,
    pub max_lines: u64,
    /// The longest line: the body limit of one request.
    pub max_line_bytes: usize,
}

/// A failure of the file tier.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("object store: {0}")]
    Objects(#[from] object_store::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("file metadata is corrupt: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for FileError {
    fn from(e: redis::RedisError) -> Self {
        FileError::Store(StoreError::from(e))
    }
}

impl From<PoolError> for FileError {
    fn from(e: PoolError) -> Self {
        FileError::Store(StoreError::from(e))
    }
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Store(e) => ApiError::Store(e),
            FileError::Objects(e) => {
                tracing::error!(error = %e, "file store failed");
                ApiError::client(
                    ErrorCode::StorageUnavailable,
                    "the file store is unavailable; retry later",
                )
            }
            FileError::Corrupt(e) => ApiError::Internal(e),
        }
    }
}

/// The upper score bound (for `ZREVRANGEBYSCORE`) of a newest-first page of the sorted set
/// `index` that starts after the member `after`, or `None` when `after` is not in it (an
/// empty page). Files and batches list their ids this way.
pub(crate) async fn page_start(
    conn: &mut sluice_jobs::redis_pool::Connection,
    index: &str,
    after: Option<&str>,
) -> Result<Option<String>, redis::RedisError> {
    let Some(after) = after else {
        return Ok(Some("+inf".to_string()));
    };
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(index)
        .arg(after)
        .query_async(conn)
        .await?;
    Ok(score.map(|score| format!("({score}")))
}

/// A new file id: `file-` and a UUID v7's 32 hexadecimal digits.
pub fn new_file_id() -> String {
    format!("file-{}", Uuid::now_v7().simple())
}

/// Whether `id` looks like a file id at all (anything else is a 404 without a lookup).
pub fn plausible_file_id(id: &str) -> bool {
    id.strip_prefix("file-").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 64
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// A filename as the client gave it, reduced to its last path component and 255 bytes of
/// printable text.
pub fn clean_filename(name: Option<&str>) -> String {
    let name = name.unwrap_or("upload.jsonl");
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let mut clean: String = last.chars().filter(|c| !c.is_control()).collect();
    while clean.len() > 255 {
        clean.pop();
    }
    if clean.is_empty() {
        "upload.jsonl".to_string()
    } else {
        clean
    }
}

impl FileStore {
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        pool: Pool,
        ks: Keyspace,
        limits: FileLimits,
    ) -> Self {
        Self {
            objects,
            prefix,
            pool,
            ks,
            limits,
        }
    }

    fn path(&self, tenant: &str, id: &str) -> ObjectPath {
        let name = format!("{id}.jsonl");
        self.prefix
            .parts()
            .chain([
                PathPart::from(self.ks.namespace()),
                PathPart::from(tenant),
                PathPart::from(name.as_str()),
            ])
            .collect()
    }

    /// Streams `body` into a new file of `tenant`, checking each line with `checker`. Nothing
    /// is stored unless every line passes and the whole upload is written; the first bad line
    /// is the error.
    pub async fn upload<S, E>(
        &self,
        tenant: &str,
        filename: String,
        body: S,
        checker: &mut lines::LineChecker<'_>,
    ) -> Result<FileObject, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        ApiError: From<E>,
    {
        let id = new_file_id();
        let path = self.path(tenant, &id);
        let upload = self
            .objects
            .put_multipart(&path)
            .await
            .map_err(FileError::from)?;
        let mut writer = WriteMultipart::new(upload);
        match self.stream_into(body, checker, &mut writer).await {
            Ok(bytes) => {
                let lines = checker.finish()?;
                writer.finish().await.map_err(FileError::from)?;
                let file = FileObject {
                    id,
                    object: "file".into(),
                    bytes,
                    created_at: sluice_proto::now_ms() / 1000,
                    expires_at: None,
                    filename,
                    purpose: Purpose::Batch,
                    status: "processed".into(),
                    lines,
                };
                if let Err(e) = self.record(tenant, &file).await {
                    let _ = self.objects.delete(&path).await;
                    return Err(e.into());
                }
                Ok(file)
            }
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(error = %abort, "could not abort a refused upload");
                }
                Err(e)
            }
        }
    }

    async fn stream_into<S, E>(
        &self,
        mut body: S,
        checker: &mut lines::LineChecker<'_>,
        writer: &mut WriteMultipart,
    ) -> Result<u64, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        ApiError: From<E>,
    {
        let mut bytes = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            if bytes > self.limits.max_bytes {
                return Err(ApiError::client(
                    ErrorCode::PayloadTooLarge,
                    format!("the file is larger than {} bytes", self.limits.max_bytes),
                ));
            }
            checker.feed(&chunk)?;
            writer.wait_for_capacity(4).await.map_err(FileError::from)?;
            writer.put(chunk);
        }
        Ok(bytes)
    }

    /// Stores a file Sluice wrote itself (a batch's output or errors) under a fixed `id`:
    /// writing it again replaces it, so a retried finalization leaves one file.
    pub async fn put_output(
        &self,
        tenant: &str,
        id: &str,
        filename: String,
        content: Vec<u8>,
        lines: u64,
    ) -> Result<FileObject, FileError> {
        let bytes = content.len() as u64;
        self.objects
            .put(&self.path(tenant, id), PutPayload::from(content))
            .await?;
        let file = FileObject {
            id: id.to_string(),
            object: "file".into(),
            bytes,
            created_at: sluice_proto::now_ms() / 1000,
            expires_at: None,
            filename,
            purpose: Purpose::BatchOutput,
            status: "processed".into(),
            lines,
        };
        self.record(tenant, &file).await?;
        Ok(file)
    }

    async fn record(&self, tenant: &str, file: &FileObject) -> Result<(), FileError> {
        let json = serde_json::to_string(file).map_err(|e| FileError::Corrupt(e.to_string()))?;
        let mut conn = self.pool.get().await?;
        let _: () = redis::pipe()
            .atomic()
            .set(self.ks.file(tenant, &file.id), json)
            .zadd(
                self.ks.tenant_files(tenant),
                &file.id,
                sluice_proto::now_ms(),
            )
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The tenant's file, or `None` (also for another tenant's).
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<FileObject>, FileError> {
        if !plausible_file_id(id) {
            return Ok(None);
        }
        let mut conn = self.pool.get().await?;
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.ks.file(tenant, id))
            .query_async(&mut conn)
            .await?;
        raw.map(|r| serde_json::from_str(&r).map_err(|e| FileError::Corrupt(e.to_string())))
            .transpose()
    }

    /// A file's bytes, as a stream.
    pub async fn content(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<
        futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>,
        FileError,
    > {
        Ok(self
            .objects
            .get(&self.path(tenant, id))
            .await?
            .into_stream())
    }

    /// Bytes `range` of a file.
    pub async fn read_range(
        &self,
        tenant: &str,
        id: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, FileError> {
        Ok(self
            .objects
            .get_range(&self.path(tenant, id), range)
            .await?)
    }

    /// Deletes the tenant's file; `false` if there was none.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<bool, FileError> {
        if !plausible_file_id(id) {
            return Ok(false);
        }
        let mut conn = self.pool.get().await?;
        let (deleted, _): (u64, u64) = redis::pipe()
            .atomic()
            .del(self.ks.file(tenant, id))
            .zrem(self.ks.tenant_files(tenant), id)
            .query_async(&mut conn)
            .await?;
        if deleted == 0 {
            return Ok(false);
        }
        match self.objects.delete(&self.path(tenant, id)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => {
                // The metadata is gone, so the file is deleted for every reader; the bytes
                // stay until an operator's lifecycle rule or a retry removes them.
                tracing::warn!(error = %e, file = id, "file deleted, its bytes were not");
                Ok(true)
            }
        }
    }

    /// The tenant's files, newest first: up to `limit` after the file `after` (its id),
    /// optionally of one purpose, and whether there are more.
    pub async fn list(
        &self,
        tenant: &str,
        purpose: Option<Purpose>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<FileObject>, bool), FileError> {
        let mut conn = self.pool.get().await?;
        let index = self.ks.tenant_files(tenant);
        let Some(max) = crate::files::page_start(&mut conn, &index, after).await? else {
            return Ok((Vec::new(), false));
        };
        let mut found = Vec::new();
        let mut offset = 0usize;
        const PAGE: usize = 100;
        loop {
            let ids: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&index)
                .arg(&max)
                .arg("-inf")
                .arg("LIMIT")
                .arg(offset)
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            if ids.is_empty() {
                return Ok((found, false));
            }
            offset += ids.len();
            let keys: Vec<String> = ids.iter().map(|id| self.ks.file(tenant, id)).collect();
            let raws: Vec<Option<String>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
            for raw in raws.into_iter().flatten() {
                let file: FileObject =
                    serde_json::from_str(&raw).map_err(|e| FileError::Corrupt(e.to_string()))?;
                if purpose.is_some_and(|p| p != file.purpose) {
                    continue;
                }
                if found.len() == limit {
                    return Ok((found, true));
                }
                found.push(file);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_and_names() {
        assert!(plausible_file_id(&new_file_id()));
        assert!(plausible_file_id("file-0193abc-output"));
        for bad in ["", "file-", "batch_1", "file-a/b", "file-../x", "file-a b"] {
            assert!(!plausible_file_id(bad), "{bad}");
        }
        assert_eq!(clean_filename(Some("../../etc/passwd")), "passwd");
        assert_eq!(clean_filename(Some("C:\\x\\in.jsonl")), "in.jsonl");
        assert_eq!(clean_filename(Some("a\nb.jsonl")), "ab.jsonl");
        assert_eq!(clean_filename(None), "upload.jsonl");
        assert_eq!(clean_filename(Some("")), "upload.jsonl");
        assert!(clean_filename(Some(&"é".repeat(300))).len() <= 255);
    }
}
