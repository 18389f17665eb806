//! Where files are stored and how large they may be.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;

use super::FileLimits;

/// The file store (`/v1/files`).
#[derive(Debug, Clone, clap::Args)]
pub struct FileSettings {
    /// Where uploaded and batch output files are kept: a local directory (`/var/lib/sluice`,
    /// `file:///var/lib/sluice`) or an object store URL (`s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`), whose credentials come from the usual
    /// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `GOOGLE_SERVICE_ACCOUNT`,
    /// `AZURE_STORAGE_ACCOUNT_NAME`, ...). Every API replica must see the same store.
    /// Default: `sluice-files` in the system's temporary directory (fine for one machine's
    /// trials, not for keeping files).
    #[arg(long, env = "SLUICE_FILES_STORE", default_value_t = default_store())]
    pub files_store: String,
    /// Largest upload, in bytes (OpenAI's batch limit: 200 MB).
    #[arg(long, env = "SLUICE_FILES_MAX_BYTES", default_value_t = 200 * 1024 * 1024)]
    pub files_max_bytes: u64,
    /// Most requests (lines) in one batch input file (OpenAI's: 50,000).
    #[arg(long, env = "SLUICE_FILES_MAX_LINES", default_value_t = 50_000)]
    pub files_max_lines: u64,
    /// How long an upload's body may take, in seconds (other requests' bodies have
    /// `--body-read-timeout-secs`).
    #[arg(long, env = "SLUICE_FILES_UPLOAD_TIMEOUT_SECS", default_value_t = 600)]
    pub files_upload_timeout_secs: u64,
}

fn default_store() -> String {
    std::env::temp_dir()
        .join("sluice-files")
        .to_string_lossy()
        .into_owned()
}

impl FileSettings {
    /// The limits of one upload; a line may be as long as one request's body.
    pub fn limits(&self, body_limit_bytes: usize) -> FileLimits {
        FileLimits {
            max_bytes: self.files_max_bytes,
            max_lines: self.files_max_lines,
            max_line_bytes: body_limit_bytes,
        }
    }

    /// The object store and the prefix inside it. A local directory is created if missing.
    pub fn open(&self) -> anyhow::Result<(Arc<dyn ObjectStore>, ObjectPath)> {
        let spec = self.files_store.trim();
        if !spec.contains("://") {
            std::fs::create_dir_all(spec)
                .map_err(|e| anyhow::anyhow!("files store {spec}: {e}"))?;
            let dir = std::fs::canonicalize(spec)
                .map_err(|e| anyhow::anyhow!("files store {spec}: {e}"))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| anyhow::anyhow!("files store {}: {e}", dir.display()))?;
            return Ok((Arc::new(local), ObjectPath::default()));
        }
        let url = url::Url::parse(spec).map_err(|e| anyhow::anyhow!("files store {spec}: {e}"))?;
        if url.scheme() == "file" {
            let dir = url
                .to_file_path()
                .map_err(|()| anyhow::anyhow!("files store {spec}: not a local path"))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| anyhow::anyhow!("files store {}: {e}", dir.display()))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| anyhow::anyhow!("files store {}: {e}", dir.display()))?;
            return Ok((Arc::new(local), ObjectPath::default()));
        }
        // Cloud stores read their credentials and region from the environment, as their own
        // SDKs do (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
        let options = std::env::vars()
            .filter(|(k, _)| {
                k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_")
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v));
        let (store, prefix) = object_store::parse_url_opts(&url, options)
            .map_err(|e| anyhow::anyhow!("files store {spec}: {e}"))?;
        Ok((Arc::from(store), prefix))
    }
}
