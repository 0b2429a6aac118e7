//! Hugging Face Hub models: resolved in the local cache first (the layout huggingface-cli and
//! diffusers use, so downloads are shared), then downloaded with hf-hub unless offline.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The hub cache directory: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for no network access.
pub fn offline_from_env() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("1") | Ok("true") | Ok("yes") | Ok("on")
    )
}

/// Whether `s` has the shape of a repo id (`org/name`, not an existing path).
pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with('.')
        })
}

/// The cached snapshot directory of `repo` (model repo, `main`), if the cache has one.
pub fn cached_snapshot(cache: &Path, repo: &str) -> Option<PathBuf> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(folder.join("refs").join("main")).ok()?;
    let snap = folder.join("snapshots").join(commit.trim());
    snap.is_dir().then_some(snap)
}

/// Files of a diffusers Wan repo that sora reads (configs, tokenizer, safetensors).
fn wanted(path: &str) -> bool {
    let top_level = ["model_index.json"];
    let dirs = [
        "scheduler/",
        "tokenizer/",
        "text_encoder/",
        "transformer/",
        "vae/",
    ];
    top_level.contains(&path)
        || (dirs.iter().any(|d| path.starts_with(d))
            && (path.ends_with(".json")
                || path.ends_with(".safetensors")
                || path.ends_with(".model")))
}

/// Resolves a repo id to a local directory in the diffusers layout, downloading what is
/// missing unless `offline`.
pub fn resolve(repo: &str, offline: bool, progress: bool) -> Result<PathBuf> {
    let cache = cache_dir();
    if let Some(snap) = cached_snapshot(&cache, repo) {
        if crate::pipeline::model::check_model_dir(&snap).is_ok() {
            return Ok(snap);
        }
        if offline {
            crate::pipeline::model::check_model_dir(&snap).with_context(|| {
                format!(
                    "the cached copy of {repo} in {} is incomplete and sora is offline",
                    cache.display()
                )
            })?;
        }
    }
    if offline {
        bail!(
            "model {repo} is not in the Hugging Face cache ({}) and sora is offline (--offline or HF_HUB_OFFLINE): download it first, e.g. without --offline",
            cache.display()
        );
    }
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.clone())
        .with_progress(progress)
        .build()
        .context("cannot set up the Hugging Face Hub client")?;
    let r = api.model(repo.to_string());
    let info = r
        .info()
        .with_context(|| format!("cannot find model {repo} on the Hugging Face Hub (check the repo id, your network, or HF_TOKEN for gated repos)"))?;
    let files: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| wanted(f))
        .collect();
    if !files.iter().any(|f| f == "transformer/config.json") {
        bail!("{repo} is not a diffusers-layout Wan repository (no transformer/config.json); try the `-Diffusers` variant of the repo");
    }
    for f in &files {
        r.get(f)
            .with_context(|| format!("downloading {f} from {repo}"))?;
    }
    let snap = cached_snapshot(&cache, repo).with_context(|| {
        format!(
            "downloaded {repo} but found no snapshot in {}",
            cache.display()
        )
    })?;
    crate::pipeline::model::check_model_dir(&snap)?;
    Ok(snap)
}
