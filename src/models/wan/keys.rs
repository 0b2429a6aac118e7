//! Transformer key layouts as data: the native Wan / Comfy names (`blocks.N.self_attn.q.weight`,
//! optionally under `model.diffusion_model.`) and the diffusers names
//! (`blocks.N.attn1.to_q.weight`). The forward table is diffusers'
//! `TRANSFORMER_KEYS_RENAME_DICT` (`convert_wan_transformer_to_diffusers`), applied in order
//! as substring replacements, so both agree on every key; note the norm2/norm3 swap.

use crate::weights::TensorStore;

/// Prefix some single-file repacks (Comfy) put before every native key.
pub const COMFY_PREFIX: &str = "model.diffusion_model.";

/// Native → diffusers substring replacements, applied in order.
pub const NATIVE_TO_DIFFUSERS: &[(&str, &str)] = &[
    (
        "time_embedding.0",
        "condition_embedder.time_embedder.linear_1",
    ),
    (
        "time_embedding.2",
        "condition_embedder.time_embedder.linear_2",
    ),
    (
        "text_embedding.0",
        "condition_embedder.text_embedder.linear_1",
    ),
    (
        "text_embedding.2",
        "condition_embedder.text_embedder.linear_2",
    ),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("cross_attn", "attn2"),
    ("self_attn", "attn1"),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
];

/// Diffusers → native substring replacements, applied in order (after the top-level
/// `scale_shift_table` → `head.modulation` special case).
pub const DIFFUSERS_TO_NATIVE: &[(&str, &str)] = &[
    (
        "condition_embedder.time_embedder.linear_1",
        "time_embedding.0",
    ),
    (
        "condition_embedder.time_embedder.linear_2",
        "time_embedding.2",
    ),
    (
        "condition_embedder.text_embedder.linear_1",
        "text_embedding.0",
    ),
    (
        "condition_embedder.text_embedder.linear_2",
        "text_embedding.2",
    ),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("proj_out", "head.head"),
    ("scale_shift_table", "modulation"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
];

fn apply(table: &[(&str, &str)], key: &str) -> String {
    table
        .iter()
        .fold(key.to_string(), |k, (from, to)| k.replace(from, to))
}

/// Maps a native (or Comfy-prefixed) transformer key to its diffusers name.
pub fn native_to_diffusers(key: &str) -> String {
    apply(
        NATIVE_TO_DIFFUSERS,
        key.strip_prefix(COMFY_PREFIX).unwrap_or(key),
    )
}

/// Maps a diffusers transformer key to its native name (without the Comfy prefix).
pub fn diffusers_to_native(key: &str) -> String {
    if key == "scale_shift_table" {
        return "head.modulation".to_string();
    }
    apply(DIFFUSERS_TO_NATIVE, key)
}

/// Which naming a transformer checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Diffusers,
    /// Native Wan names, possibly under [`COMFY_PREFIX`].
    Native,
}

/// Detects the layout from the names in a store (`blocks.0.self_attn.q.weight` vs
/// `blocks.0.attn1.to_q.weight`). `None` when it is neither: not a Wan transformer.
pub fn detect_layout(store: &TensorStore) -> Option<Layout> {
    if store.contains("blocks.0.attn1.to_q.weight") {
        Some(Layout::Diffusers)
    } else if store.contains("blocks.0.self_attn.q.weight")
        || store.contains(&format!("{COMFY_PREFIX}blocks.0.self_attn.q.weight"))
    {
        Some(Layout::Native)
    } else {
        None
    }
}
