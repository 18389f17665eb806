//! Where a model comes from, and resolving it to local files.

use std::path::{Path, PathBuf};

use super::ModelError;

/// `--model`: a `.gguf` file, a directory with `config.json` + `*.safetensors` +
/// `tokenizer.json`, or a hub id such as `Qwen/Qwen2.5-7B-Instruct` (optionally `@revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    Dir(PathBuf),
    Hub { repo: String, revision: String },
}

/// The files of a safetensors model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub name: String,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub weights: Vec<PathBuf>,
}

/// A model on local disk, ready to load.
#[derive(Debug, Clone)]
pub enum LocalModel {
    Gguf(PathBuf),
    Files(ModelFiles),
}

impl ModelSource {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let path = Path::new(spec);
        if path.is_file() {
            return if spec.to_ascii_lowercase().ends_with(".gguf") {
                Ok(ModelSource::Gguf(path.to_path_buf()))
            } else {
                Err(format!("{spec} is a file but not a .gguf model"))
            };
        }
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (spec, "main"),
        };
        let looks_like_hub_id = repo.split('/').count() == 2
            && !repo.starts_with('/')
            && !repo.starts_with('.')
            && repo
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if looks_like_hub_id && !revision.is_empty() {
            Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            })
        } else {
            Err(format!(
                "{spec} is neither a .gguf file, a model directory, nor a hub id like Qwen/Qwen2.5-7B-Instruct"
            ))
        }
    }

    /// Resolves to local files, downloading from the hub (into its usual cache) if needed.
    pub async fn resolve(&self) -> Result<LocalModel, ModelError> {
        match self {
            ModelSource::Gguf(p) => Ok(LocalModel::Gguf(p.clone())),
            ModelSource::Dir(dir) => files_in_dir(dir).map(LocalModel::Files),
            ModelSource::Hub { repo, revision } => {
                download(repo, revision).await.map(LocalModel::Files)
            }
        }
    }
}

/// The `*.safetensors` files of a directory, sorted; an error if there are none.
pub fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    if weights.is_empty() {
        return Err(ModelError::Format(format!(
            "{} has no *.safetensors",
            dir.display()
        )));
    }
    Ok(weights)
}

pub(crate) fn files_in_dir(dir: &Path) -> Result<ModelFiles, ModelError> {
    let need = |name: &str| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(ModelError::Format(format!(
                "{} has no {name}",
                dir.display()
            )))
        }
    };
    let weights = safetensors_in(dir)?;
    let tokenizer_config = dir.join("tokenizer_config.json");
    Ok(ModelFiles {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
        config: need("config.json")?,
        tokenizer: need("tokenizer.json")?,
        tokenizer_config: tokenizer_config.is_file().then_some(tokenizer_config),
        weights,
    })
}

/// Downloads a safetensors model with `hf-hub` (honours `HF_HOME`, `HF_ENDPOINT` and
/// `HF_TOKEN`). Sharded checkpoints are found through `model.safetensors.index.json`.
async fn download(repo: &str, revision: &str) -> Result<ModelFiles, ModelError> {
    use hf_hub::api::tokio::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let err = |e: hf_hub::api::tokio::ApiError| ModelError::Download(format!("{repo}: {e}"));
    let api = ApiBuilder::from_env().build().map_err(err)?;
    let hub = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let config = hub.get("config.json").await.map_err(err)?;
    let tokenizer = hub.get("tokenizer.json").await.map_err(err)?;
    let tokenizer_config = hub.get("tokenizer_config.json").await.ok();
    let weights = match hub.get("model.safetensors.index.json").await {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let mut shards = shards_of_index(&text)?;
            shards.sort();
            shards.dedup();
            let mut paths = Vec::with_capacity(shards.len());
            for shard in shards {
                paths.push(hub.get(&shard).await.map_err(err)?);
            }
            paths
        }
        Err(_) => vec![hub.get("model.safetensors").await.map_err(err)?],
    };
    Ok(ModelFiles {
        name: repo.to_string(),
        config,
        tokenizer,
        tokenizer_config,
        weights,
    })
}

fn shards_of_index(text: &str) -> Result<Vec<String>, ModelError> {
    let index: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ModelError::Format(format!("model.safetensors.index.json: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Format("index has no weight_map".into()))?;
    Ok(map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse("Qwen/Qwen2.5-7B-Instruct").expect("hub"),
            ModelSource::Hub {
                repo: "Qwen/Qwen2.5-7B-Instruct".into(),
                revision: "main".into()
            }
        );
        assert!(matches!(
            ModelSource::parse("Qwen/Qwen2.5-7B-Instruct@abc123").expect("hub"),
            ModelSource::Hub { revision, .. } if revision == "abc123"
        ));
        assert!(ModelSource::parse("/nonexistent/model.gguf").is_err());
        assert!(ModelSource::parse("justaword").is_err());
        let dir = std::env::temp_dir();
        assert_eq!(
            ModelSource::parse(dir.to_str().expect("utf-8")).expect("dir"),
            ModelSource::Dir(dir)
        );
    }

    #[test]
    fn reads_the_shard_index() {
        assert_eq!(
            shards_of_index(r#"{"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}}"#)
                .expect("index")
                .len(),
            2
        );
    }
}
