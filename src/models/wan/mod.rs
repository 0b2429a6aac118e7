//! Wan2.1 text-to-video: a UMT5 text encoder ([`crate::models::umt5`]), the causal spacetime VAE
//! `AutoencoderKLWan` ([`vae`]: 4× time, 8×8 space, 16 latent channels) and the Diffusion
//! Transformer `WanTransformer3DModel` ([`dit`]: 1×2×2 spacetime patches, 3D RoPE over
//! (t, y, x), cross-attention to the text, flow-matching velocity output).
//!
//! Tensors are `[B, C, T, H, W]` for video and latents and `[B, N, D]` for tokens.

pub mod config;
pub mod dit;
pub mod keys;
pub mod rope;
pub mod vae;
pub mod vae_keys;

pub use config::{WanTransformerConfig, WanVaeConfig};
