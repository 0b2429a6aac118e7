//! Safetensors checkpoints: single files, directories and sharded indexes, with key remapping
//! and errors that name the file and the tensor.
//!
//! A [`TensorStore`] indexes every tensor of one model component by its *canonical* name (the
//! diffusers/transformers name). Native or Comfy checkpoints are read through a key map (see
//! [`crate::models::wan::keys`]) that turns their names into canonical ones at open time, so model
//! code only ever sees one naming scheme.

pub mod hub;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// A weight-loading failure. Every variant names the file (or directory) and, where there is
/// one, the tensor, so the user can tell which download is broken or mismatched.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file ({reason}); it may be truncated or corrupt: download it again")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no safetensors weights in {dir}: expected `*.safetensors` files or a `*.safetensors.index.json`")]
    NoWeights { dir: PathBuf },
    #[error(
        "{index} lists shard `{shard}`, which is missing from {dir}: the download is incomplete"
    )]
    MissingShard {
        index: PathBuf,
        shard: String,
        dir: PathBuf,
    },
    #[error("{index} is not a valid sharded-checkpoint index: {reason}")]
    BadIndex { index: PathBuf, reason: String },
    #[error("tensor `{name}` is missing from {source_desc}: the checkpoint does not match the model config ({hint})")]
    Missing {
        name: String,
        source_desc: String,
        hint: String,
    },
    #[error("tensor `{name}` in {file} has shape {actual:?}, but the config implies {expected:?}: the config.json does not match these weights")]
    Shape {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{name}` in {file} has dtype {dtype}, which sora cannot use (expected f32, f16 or bf16)")]
    Dtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },
    #[error("tensor `{name}` appears in both {first} and {second}")]
    Duplicate {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

struct Entry {
    file: usize,
    stored_name: String,
}

/// Memory-mapped safetensors files of one model component, indexed by canonical tensor name.
pub struct TensorStore {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    index: HashMap<String, Entry>,
    /// What the store was opened from, for error messages.
    label: String,
}

impl std::fmt::Debug for TensorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorStore")
            .field("label", &self.label)
            .field("tensors", &self.index.len())
            .finish()
    }
}

fn open_file(path: &Path) -> Result<MmapedSafetensors, WeightError> {
    std::fs::metadata(path).map_err(|source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it not being
    // truncated while we run.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| WeightError::Corrupt {
        path: path.to_path_buf(),
        reason: root_cause(&e),
    })
}

fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}

impl TensorStore {
    /// Opens the given safetensors files, validating every header up front.
    pub fn open_files(paths: &[PathBuf], label: impl Into<String>) -> Result<Self, WeightError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index: HashMap<String, Entry> = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let st = open_file(path)?;
            for (name, view) in st.tensors() {
                match view.dtype() {
                    safetensors::Dtype::F32
                    | safetensors::Dtype::F16
                    | safetensors::Dtype::BF16 => {}
                    other => {
                        return Err(WeightError::Dtype {
                            name,
                            file: path.clone(),
                            dtype: format!("{other:?}"),
                        })
                    }
                }
                if let Some(prev) = index.get(&name) {
                    return Err(WeightError::Duplicate {
                        name,
                        first: paths[prev.file].clone(),
                        second: path.clone(),
                    });
                }
                index.insert(
                    name.clone(),
                    Entry {
                        file: i,
                        stored_name: name,
                    },
                );
            }
            files.push((path.clone(), st));
        }
        Ok(Self {
            files,
            index,
            label: label.into(),
        })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self, WeightError> {
        Self::open_files(&[path.to_path_buf()], path.display().to_string())
    }

    /// Opens a component directory: a `*.safetensors.index.json` shard index when present
    /// (every listed shard must exist), otherwise every `*.safetensors` file in it.
    pub fn open_dir(dir: &Path) -> Result<Self, WeightError> {
        let entries = std::fs::read_dir(dir).map_err(|source| WeightError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        if let Some(index_name) = names
            .iter()
            .find(|n| n.ends_with(".safetensors.index.json"))
        {
            let index_path = dir.join(index_name);
            let shards = read_shard_index(&index_path)?;
            let mut paths = Vec::new();
            for shard in shards {
                let p = dir.join(&shard);
                if !p.exists() {
                    return Err(WeightError::MissingShard {
                        index: index_path,
                        shard,
                        dir: dir.to_path_buf(),
                    });
                }
                paths.push(p);
            }
            return Self::open_files(&paths, dir.display().to_string());
        }
        let paths: Vec<PathBuf> = names
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .map(|n| dir.join(n))
            .collect();
        if paths.is_empty() {
            return Err(WeightError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        Self::open_files(&paths, dir.display().to_string())
    }

    /// Renames every tensor with `map` (stored name -> canonical name; `None` drops the tensor).
    pub fn remap(mut self, map: impl Fn(&str) -> Option<String>) -> Result<Self, WeightError> {
        let mut index = HashMap::with_capacity(self.index.len());
        for (_, entry) in self.index.drain() {
            if let Some(canonical) = map(&entry.stored_name) {
                if let Some(prev) = index.get(&canonical) {
                    let prev: &Entry = prev;
                    return Err(WeightError::Duplicate {
                        name: format!(
                            "{canonical} (from `{}` and `{}`)",
                            prev.stored_name, entry.stored_name
                        ),
                        first: self.files[prev.file].0.clone(),
                        second: self.files[entry.file].0.clone(),
                    });
                }
                index.insert(canonical, entry);
            }
        }
        self.index = index;
        Ok(self)
    }

    /// Canonical names of every tensor, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let e = self.index.get(name)?;
        let view = self.files[e.file].1.get(&e.stored_name).ok()?;
        Some(view.shape().to_vec())
    }

    /// Loads a tensor by canonical name, converted to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, WeightError> {
        let e = self.index.get(name).ok_or_else(|| self.missing(name))?;
        let (path, st) = &self.files[e.file];
        let t = st
            .load(&e.stored_name, device)
            .map_err(|err| WeightError::Corrupt {
                path: path.clone(),
                reason: format!("tensor `{}`: {}", e.stored_name, root_cause(&err)),
            })?;
        t.to_dtype(dtype).map_err(|err| WeightError::Corrupt {
            path: path.clone(),
            reason: format!("tensor `{}`: {}", e.stored_name, root_cause(&err)),
        })
    }

    /// Loads a tensor and checks its shape.
    pub fn load_shaped(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, WeightError> {
        if let Some(e) = self.index.get(name) {
            let actual = self.shape(name).unwrap_or_default();
            if actual != shape {
                return Err(WeightError::Shape {
                    name: name.to_string(),
                    file: self.files[e.file].0.clone(),
                    expected: shape.to_vec(),
                    actual,
                });
            }
        }
        self.load(name, dtype, device)
    }

    fn missing(&self, name: &str) -> WeightError {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|(p, _)| {
                p.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        WeightError::Missing {
            name: name.to_string(),
            source_desc: format!("{} [{}]", self.label, files.join(", ")),
            hint: format!("{} tensors present", self.index.len()),
        }
    }

    /// A candle `VarBuilder` over this store: model code asks for canonical names and shapes,
    /// and gets [`WeightError`]s (wrapped in `candle_core::Error`) when they do not match.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self);
        VarBuilder::from_backend(backend, dtype, device.clone())
    }
}

impl SimpleBackend for TensorStore {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load_shaped(name, s.dims(), dtype, dev)
            .map_err(candle_core::Error::wrap)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
            .map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

fn read_shard_index(index_path: &Path) -> Result<Vec<String>, WeightError> {
    let text = std::fs::read_to_string(index_path).map_err(|source| WeightError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| WeightError::BadIndex {
        index: index_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| WeightError::BadIndex {
            index: index_path.to_path_buf(),
            reason: "no `weight_map` object".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Reads a component's `config.json` into `T`, naming the file on failure.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid config", path.display()))
}
