//! Wan2.1 component configs. Each reads the component's own diffusers `config.json` (unknown
//! fields ignored) and has named constructors for the published sizes and the test sizes.

use serde::{Deserialize, Serialize};

fn default_patch() -> [usize; 3] {
    [1, 2, 2]
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_len() -> usize {
    1024
}
fn default_true() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".to_string())
}

/// `transformer/config.json` of `WanTransformer3DModel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WanTransformerConfig {
    #[serde(default = "default_patch")]
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    #[serde(default = "default_true")]
    pub cross_attn_norm: bool,
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub image_dim: Option<usize>,
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: usize,
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
}

impl WanTransformerConfig {
    /// Wan-AI/Wan2.1-T2V-1.3B.
    pub fn t2v_1_3b() -> Self {
        Self {
            patch_size: [1, 2, 2],
            num_attention_heads: 12,
            attention_head_dim: 128,
            in_channels: 16,
            out_channels: Some(16),
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: 8960,
            num_layers: 30,
            cross_attn_norm: true,
            qk_norm: default_qk_norm(),
            eps: 1e-6,
            image_dim: None,
            added_kv_proj_dim: None,
            rope_max_seq_len: 1024,
            pos_embed_seq_len: None,
        }
    }

    /// Wan-AI/Wan2.1-T2V-14B.
    pub fn t2v_14b() -> Self {
        Self {
            num_attention_heads: 40,
            ffn_dim: 13824,
            num_layers: 40,
            ..Self::t2v_1_3b()
        }
    }

    /// A tiny random-weight size used by the parity fixtures.
    pub fn tiny() -> Self {
        Self {
            num_attention_heads: 2,
            attention_head_dim: 24,
            in_channels: 4,
            out_channels: Some(4),
            text_dim: 32,
            freq_dim: 32,
            ffn_dim: 96,
            num_layers: 2,
            rope_max_seq_len: 64,
            ..Self::t2v_1_3b()
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Rejects configs this implementation does not cover, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.image_dim.is_some()
            || self.added_kv_proj_dim.is_some()
            || self.pos_embed_seq_len.is_some()
        {
            anyhow::bail!("image-conditioned Wan transformers (image_dim / added_kv_proj_dim / pos_embed_seq_len set) are not supported: sora runs text-to-video checkpoints");
        }
        match self.qk_norm.as_deref() {
            Some("rms_norm_across_heads") => {}
            other => anyhow::bail!(
                "qk_norm {other:?} is not supported (expected \"rms_norm_across_heads\")"
            ),
        }
        if !self.attention_head_dim.is_multiple_of(2) || self.attention_head_dim < 6 {
            anyhow::bail!(
                "attention_head_dim {} must be even and at least 6 for the 3D RoPE split",
                self.attention_head_dim
            );
        }
        if !self.freq_dim.is_multiple_of(2) {
            anyhow::bail!("freq_dim {} must be even", self.freq_dim);
        }
        Ok(())
    }

    /// Number of parameters, from the config alone.
    pub fn param_count(&self) -> u64 {
        let d = self.inner_dim() as u64;
        let [pt, ph, pw] = self.patch_size.map(|v| v as u64);
        let patch = self.in_channels as u64 * pt * ph * pw;
        let lin = |i: u64, o: u64| i * o + o;
        let globals = lin(patch, d) // patch_embedding (conv3d = linear over a patch)
            + lin(self.freq_dim as u64, d) + lin(d, d) // time_embedder
            + lin(d, 6 * d) // time_proj
            + lin(self.text_dim as u64, d) + lin(d, d) // text_embedder
            + lin(d, self.out_channels() as u64 * pt * ph * pw) // proj_out
            + 2 * d; // scale_shift_table
        let ffn = self.ffn_dim as u64;
        let block = 2 * (4 * lin(d, d) + 2 * d) // attn1, attn2 (q,k,v,o + norm_q/k)
            + if self.cross_attn_norm { 2 * d } else { 0 }
            + lin(d, ffn) + lin(ffn, d)
            + 6 * d;
        globals + self.num_layers as u64 * block
    }
}

fn default_latents_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ]
}
fn default_latents_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
        1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ]
}
fn default_dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn default_temporal_down() -> Vec<bool> {
    vec![false, true, true]
}
fn default_three() -> usize {
    3
}
fn default_two() -> usize {
    2
}
fn default_scale_t() -> Option<usize> {
    Some(4)
}
fn default_scale_s() -> Option<usize> {
    Some(8)
}

/// `vae/config.json` of `AutoencoderKLWan`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WanVaeConfig {
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    #[serde(default = "default_dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "default_two")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    #[serde(default = "default_temporal_down")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_latents_mean")]
    pub latents_mean: Vec<f64>,
    #[serde(default = "default_latents_std")]
    pub latents_std: Vec<f64>,
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "default_scale_t")]
    pub scale_factor_temporal: Option<usize>,
    #[serde(default = "default_scale_s")]
    pub scale_factor_spatial: Option<usize>,
}

impl WanVaeConfig {
    /// The Wan2.1 VAE (`Wan2.1_VAE.pth`), shared by the 1.3B and 14B models.
    pub fn wan2_1() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: default_dim_mult(),
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: default_temporal_down(),
            dropout: 0.0,
            latents_mean: default_latents_mean(),
            latents_std: default_latents_std(),
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
        }
    }

    /// A tiny random-weight size used by the parity fixtures.
    pub fn tiny() -> Self {
        Self {
            base_dim: 8,
            z_dim: 4,
            latents_mean: vec![0.1, -0.2, 0.3, -0.4],
            latents_std: vec![1.5, 0.8, 1.2, 2.0],
            ..Self::wan2_1()
        }
    }

    pub fn decoder_base_dim(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// Pixel frames per latent frame after the first (4 for Wan2.1).
    pub fn temporal_factor(&self) -> usize {
        1 << self.temperal_downsample.iter().filter(|b| **b).count()
    }

    /// Pixels per latent cell along each spatial axis (8 for Wan2.1).
    pub fn spatial_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Number of parameters of the full `AutoencoderKLWan`, from the config alone.
    pub fn param_count(&self) -> u64 {
        super::vae::param_count(self)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.is_residual || self.patch_size.is_some() {
            anyhow::bail!("this VAE config is the Wan2.2 kind (is_residual / patch_size set); sora supports the Wan2.1 VAE");
        }
        if !self.attn_scales.is_empty() {
            anyhow::bail!(
                "attn_scales {:?} is not supported (the Wan2.1 VAE has none)",
                self.attn_scales
            );
        }
        if self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            anyhow::bail!(
                "temperal_downsample has {} entries but dim_mult has {}: expected one fewer",
                self.temperal_downsample.len(),
                self.dim_mult.len()
            );
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            anyhow::bail!(
                "latents_mean/latents_std have {}/{} entries but z_dim is {}",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            );
        }
        Ok(())
    }
}
