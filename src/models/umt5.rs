//! UMT5 text encoder (transformers' `UMT5EncoderModel`) and its tokenizer.
//!
//! UMT5 is T5 v1.1 with one difference that matters here: *every* encoder layer owns its own
//! relative-position bias table (T5 shares block 0's), so candle-transformers' `t5.rs` cannot
//! load it. Layer layout (pre-norm, no biases, no attention scaling):
//! `x += o(attn(q(n), k(n), v(n)) + rel_bias_i + pad_mask)` with `n = rms(x)`, then
//! `x += wo(act(wi_0(n)) * wi_1(n))` with `n = rms(x)`, and a final RMS norm.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::fused::Linear;
use serde::Deserialize;

use crate::nn::attention::attention;
use crate::nn::norm::rms_norm;

/// `eos_token_id` is an integer or a list of integers in transformers configs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

/// Encoder hyper-parameters, read from transformers' `config.json` (`UMT5Config`). Unknown
/// fields are ignored; missing ones take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct Umt5Config {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    #[serde(default = "defaults::d_kv")]
    pub d_kv: usize,
    #[serde(default = "defaults::d_ff")]
    pub d_ff: usize,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    #[serde(default = "defaults::num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "defaults::max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "defaults::eps")]
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (gelu_new, the tanh approximation) or `"gated-relu"`.
    #[serde(default = "defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: TokenIds,
}

mod defaults {
    use super::TokenIds;
    pub fn vocab_size() -> usize {
        250112
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        1024
    }
    pub fn num_layers() -> usize {
        8
    }
    pub fn num_heads() -> usize {
        6
    }
    pub fn num_buckets() -> usize {
        32
    }
    pub fn max_distance() -> usize {
        128
    }
    pub fn eps() -> f64 {
        1e-6
    }
    pub fn feed_forward_proj() -> String {
        "gated-gelu".into()
    }
    pub fn eos_token_id() -> TokenIds {
        TokenIds::One(1)
    }
}

/// The gate activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnActivation {
    /// transformers' `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluNew,
    Relu,
}

impl Umt5Config {
    /// google/umt5-xxl, the text encoder of Wan2.1 (≈5.7B parameters).
    pub fn umt5_xxl() -> Self {
        Self {
            vocab_size: 256384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            pad_token_id: 0,
            eos_token_id: TokenIds::One(1),
        }
    }

    /// The tiny random test checkpoint in `tests/fixtures/wan-tiny/text_encoder`.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 98,
            d_model: 32,
            d_kv: 8,
            d_ff: 64,
            num_layers: 2,
            num_heads: 4,
            ..Self::umt5_xxl()
        }
    }

    /// Reads and validates a transformers `config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let cfg: Self = crate::weights::read_config(path)?;
        cfg.ffn_activation()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{} is not a supported UMT5 config", path.display()))?;
        Ok(cfg)
    }

    /// The feed-forward activation named by `feed_forward_proj`, or an error naming the field.
    pub fn ffn_activation(&self) -> std::result::Result<FfnActivation, String> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" | "gated-gelu_new" => Ok(FfnActivation::GeluNew),
            "gated-relu" => Ok(FfnActivation::Relu),
            other => Err(format!(
                "config field `feed_forward_proj` is {other:?}; sora's UMT5 supports \"gated-gelu\" and \"gated-relu\""
            )),
        }
    }

    /// Parameters implied by the config (embedding counted once, as `shared` and
    /// `encoder.embed_tokens` are tied).
    pub fn param_count(&self) -> usize {
        let d = self.d_model;
        let inner = self.num_heads * self.d_kv;
        let per_layer = 4 * d * inner
            + self.relative_attention_num_buckets * self.num_heads
            + 3 * d * self.d_ff
            + 2 * d;
        self.vocab_size * d + self.num_layers * per_layer + d
    }
}

/// T5's bucket for `relative_position = key_pos - query_pos`, bidirectional (encoder) or causal.
///
/// Half the buckets (per direction) are exact offsets, the rest log-spaced up to
/// `max_distance`. The log branch is evaluated in f32, in the order torch does, so that
/// truncation at exact powers (16, 32, 64, ...) lands in the same bucket as transformers.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut num_buckets = num_buckets as i64;
    let mut bucket = 0i64;
    let rp = if bidirectional {
        num_buckets /= 2;
        if relative_position > 0 {
            bucket += num_buckets;
        }
        relative_position.abs()
    } else {
        (-relative_position).max(0)
    };
    let max_exact = num_buckets / 2;
    if rp < max_exact {
        bucket += rp;
    } else {
        let log_ratio = (rp as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (num_buckets - max_exact) as f32;
        let large = (max_exact + log_ratio as i64).min(num_buckets - 1);
        bucket += large;
    }
    bucket as usize
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[buckets, heads]`.
    rel_bias: Tensor,
    ffn_norm: Tensor,
    wi_0: Linear,
    wi_1: Linear,
    /// Kept in f32 when computing in f16, as transformers does (`_keep_in_fp32_modules`), since
    /// its activations overflow f16.
    wo: Linear,
}

/// The UMT5 encoder stack, returning `last_hidden_state`.
pub struct Umt5Encoder {
    /// `[vocab, d_model]`.
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    cfg: Umt5Config,
    act: FfnActivation,
    dtype: DType,
}

impl std::fmt::Debug for Umt5Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Umt5Encoder")
            .field("cfg", &self.cfg)
            .field("dtype", &self.dtype)
            .finish()
    }
}

fn linear(vb: &VarBuilder, out: usize, inp: usize, name: &str) -> Result<Linear> {
    Linear::new(vb.get((out, inp), name)?, None)
}

impl Umt5Encoder {
    /// Loads transformers key names (`shared.weight`, `encoder.block.{i}...`); a checkpoint
    /// holding only `encoder.embed_tokens.weight` (Comfy single files) is accepted too.
    /// Computes in the VarBuilder's dtype; norms and softmax run in f32.
    pub fn load(vb: VarBuilder, cfg: &Umt5Config) -> Result<Self> {
        let act = cfg.ffn_activation().map_err(candle_core::Error::Msg)?;
        let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
        let embed_name = if vb.contains_tensor("shared.weight")
            || !vb.contains_tensor("encoder.embed_tokens.weight")
        {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let embed = vb.get((cfg.vocab_size, d), embed_name)?;
        let enc = vb.pp("encoder");
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let blk = enc.pp(format!("block.{i}.layer"));
            let sa = blk.pp("0.SelfAttention");
            let ffn = blk.pp("1.DenseReluDense");
            let mut wo = linear(&ffn, d, ff, "wo.weight")?;
            if vb.dtype() == DType::F16 {
                wo = Linear::new(wo.weight().to_dtype(DType::F32)?, None)?;
            }
            layers.push(Layer {
                attn_norm: blk.get(d, "0.layer_norm.weight")?,
                q: linear(&sa, inner, d, "q.weight")?,
                k: linear(&sa, inner, d, "k.weight")?,
                v: linear(&sa, inner, d, "v.weight")?,
                o: linear(&sa, d, inner, "o.weight")?,
                rel_bias: sa.get(
                    (cfg.relative_attention_num_buckets, cfg.num_heads),
                    "relative_attention_bias.weight",
                )?,
                ffn_norm: blk.get(d, "1.layer_norm.weight")?,
                wi_0: linear(&ffn, ff, d, "wi_0.weight")?,
                wi_1: linear(&ffn, ff, d, "wi_1.weight")?,
                wo,
            });
        }
        let final_norm = enc.get(d, "final_layer_norm.weight")?;
        Ok(Self {
            embed,
            layers,
            final_norm,
            cfg: cfg.clone(),
            act,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    /// Bucket indices `[L·L]` (u32) for query `i`, key `j` at `i·L + j`.
    fn bucket_indices(&self, len: usize, device: &Device) -> Result<Tensor> {
        let mut idx = Vec::with_capacity(len * len);
        for i in 0..len as i64 {
            for j in 0..len as i64 {
                idx.push(relative_position_bucket(
                    j - i,
                    true,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                ) as u32);
            }
        }
        Tensor::from_vec(idx, len * len, device)
    }

    /// `input_ids`: `[B, L]` (u32 or i64); `attention_mask`: `[B, L]`, 1 for tokens and 0 for
    /// padding (any dtype). Returns `last_hidden_state` `[B, L, d_model]` in the compute dtype.
    /// Padded keys get an additive `f32::MIN` (transformers' `finfo.min`); padded query rows
    /// are computed like any other, as transformers does.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let (d, h, dk) = (self.cfg.d_model, self.cfg.num_heads, self.cfg.d_kv);
        let device = input_ids.device();
        let ids = match input_ids.dtype() {
            DType::U32 | DType::I64 => input_ids.flatten_all()?,
            _ => input_ids.to_dtype(DType::U32)?.flatten_all()?,
        };
        // The residual stream is f32: transformers' f32 `wo` output promotes it there too.
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .reshape((b, l, d))?
            .to_dtype(DType::F32)?;
        let buckets = self.bucket_indices(l, device)?;
        let mask_bias = match attention_mask {
            Some(m) => {
                let keep = m.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
                Some(((1.0 - keep)? * f32::MIN as f64)?)
            }
            None => None,
        };
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, h, dk))?.transpose(1, 2)?.contiguous()
        };
        for layer in &self.layers {
            // [L·L, H] -> [1, H, L, L]
            let pos = layer
                .rel_bias
                .to_dtype(DType::F32)?
                .index_select(&buckets, 0)?
                .reshape((l, l, h))?
                .permute((2, 0, 1))?
                .unsqueeze(0)?;
            let bias = match &mask_bias {
                Some(m) => pos.broadcast_add(m)?,
                None => pos,
            };
            let n = rms_norm(&x, &layer.attn_norm, self.cfg.layer_norm_epsilon)?
                .to_dtype(self.dtype)?;
            let q = heads(layer.q.forward(&n)?)?;
            let k = heads(layer.k.forward(&n)?)?;
            let v = heads(layer.v.forward(&n)?)?;
            let a = attention(&q, &k, &v, 1.0, Some(&bias))?
                .transpose(1, 2)?
                .reshape((b, l, h * dk))?;
            x = (x + layer.o.forward(&a)?.to_dtype(DType::F32)?)?;

            let n =
                rms_norm(&x, &layer.ffn_norm, self.cfg.layer_norm_epsilon)?.to_dtype(self.dtype)?;
            let gate = layer.wi_0.forward(&n)?;
            let gate = match self.act {
                FfnActivation::GeluNew => crate::nn::fused::gelu_tanh(&gate)?,
                FfnActivation::Relu => gate.relu()?,
            };
            let g = (gate * layer.wi_1.forward(&n)?)?;
            let g = g.to_dtype(layer.wo.weight().dtype())?;
            x = (x + layer.wo.forward(&g)?.to_dtype(DType::F32)?)?;
        }
        rms_norm(&x, &self.final_norm, self.cfg.layer_norm_epsilon)?.to_dtype(self.dtype)
    }
}

/// One row of `u32` per text (token ids or attention mask), all the same length.
pub type TokenRows = Vec<Vec<u32>>;

/// The UMT5 tokenizer (`tokenizer.json`), padded and truncated like transformers'
/// `tokenizer(texts, padding="max_length", max_length=n, truncation=True)`.
#[derive(Debug)]
pub struct Umt5Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    pad_token: String,
    path: PathBuf,
}

impl Umt5Tokenizer {
    /// Loads `tokenizer.json`. The pad token is `pad_token` of a sibling
    /// `tokenizer_config.json` when there is one, else `<pad>`; it must be in the vocabulary.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let cfg_path = path.with_file_name("tokenizer_config.json");
        let mut pad_token = "<pad>".to_string();
        if cfg_path.exists() {
            let cfg: serde_json::Value = crate::weights::read_config(&cfg_path)?;
            match cfg.get("pad_token") {
                Some(serde_json::Value::String(s)) => pad_token = s.clone(),
                Some(serde_json::Value::Object(o)) => {
                    if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                        pad_token = s.to_string();
                    }
                }
                _ => {}
            }
        }
        let pad_id = inner.token_to_id(&pad_token).with_context(|| {
            format!(
                "tokenizer {} has no pad token {pad_token:?} in its vocabulary",
                path.display()
            )
        })?;
        Ok(Self {
            inner,
            pad_id,
            pad_token,
            path: path.to_path_buf(),
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids and attention masks, each `texts.len()` rows of exactly `max_len`: special
    /// tokens added (`</s>`), truncated on the right keeping the special tokens, right-padded
    /// with the pad id (mask 0).
    pub fn encode_padded(
        &self,
        texts: &[&str],
        max_len: usize,
    ) -> anyhow::Result<(TokenRows, TokenRows)> {
        let mut tok = self.inner.clone();
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            strategy: tokenizers::TruncationStrategy::LongestFirst,
            stride: 0,
            direction: tokenizers::TruncationDirection::Right,
        }))
        .map_err(|e| {
            anyhow::anyhow!(
                "tokenizer {}: cannot truncate to {max_len}: {e}",
                self.path.display()
            )
        })?;
        tok.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(max_len),
            direction: tokenizers::PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let encodings = tok
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", self.path.display()))?;
        Ok(encodings
            .into_iter()
            .map(|e| (e.get_ids().to_vec(), e.get_attention_mask().to_vec()))
            .unzip())
    }

    /// [`Self::encode_padded`] as `[B, max_len]` u32 tensors `(input_ids, attention_mask)`.
    pub fn encode_tensors(
        &self,
        texts: &[&str],
        max_len: usize,
        device: &Device,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let (ids, mask) = self.encode_padded(texts, max_len)?;
        Ok((
            rows_to_tensor(&ids, device)?,
            rows_to_tensor(&mask, device)?,
        ))
    }
}

/// Equal-length rows as a `[rows, len]` u32 tensor.
pub fn rows_to_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let len = rows.first().map_or(0, Vec::len);
    if let Some(r) = rows.iter().find(|r| r.len() != len) {
        candle_core::bail!("rows of unequal length: {} and {}", len, r.len());
    }
    Tensor::from_vec(rows.concat(), (rows.len(), len), device)
}
