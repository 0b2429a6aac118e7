//! The Wan2.1 causal video VAE, diffusers' `AutoencoderKLWan` (non-residual, no patchify).
//!
//! Video is `[B, 3, F, H, W]` in `[-1, 1]`; latents are `[B, z_dim, 1 + (F-1)/4, H/8, W/8]` for
//! the Wan2.1 config. Every temporal convolution is causal, and both directions run chunk by
//! chunk through a feature cache exactly as diffusers does (`CACHE_T = 2` frames per causal
//! conv, the `"Rep"` marker of `upsample3d`'s first chunk, the last frame kept by
//! `downsample3d`): encode takes the first frame alone then 4 frames at a time, decode takes one
//! latent frame at a time. Decoding is exposed as a stream so memory does not grow with the
//! number of frames.
//!
//! Norms run in f32 whatever the weight dtype; everything else in the VarBuilder's dtype.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::conv2d::Conv2d;

use super::config::WanVaeConfig;
use crate::nn::attention;
use crate::nn::conv3d::CausalConv3d;
use crate::nn::norm::{channel_rms_norm, channel_rms_norm_silu};

/// Frames of input each causal conv keeps for the next chunk (diffusers' `CACHE_T`).
pub const CACHE_T: usize = 2;

/// Pixel frames the encoder takes per chunk after the first frame (hard-coded in diffusers).
const ENCODE_CHUNK: usize = 4;

/// One slot of the feature cache (one per causal conv / resample, in call order).
#[derive(Debug, Clone)]
enum Slot {
    /// Nothing cached yet (`None` in diffusers).
    Empty,
    /// `upsample3d` has seen its first chunk, which it passes through without time upsampling.
    Rep,
    /// The last input frames `[B, C, ≤CACHE_T, H, W]` of the previous chunk.
    Frames(Tensor),
}

/// diffusers' `feat_cache` list plus its `feat_idx` counter, reset to 0 at each chunk.
#[derive(Debug, Default)]
struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

impl FeatCache {
    fn begin_chunk(&mut self) {
        self.idx = 0;
    }

    /// Takes the current slot's content (leaving it empty); [`FeatCache::put`] advances.
    fn take(&mut self) -> Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        std::mem::replace(&mut self.slots[self.idx], Slot::Empty)
    }

    fn put(&mut self, slot: Slot) {
        self.slots[self.idx] = slot;
        self.idx += 1;
    }
}

/// The last `n` frames (or all, if fewer) of `[B, C, T, H, W]`, copied so the chunk can be freed.
fn last_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let t = x.dim(2)?;
    let n = n.min(t);
    x.narrow(2, t - n, n)?.contiguous()
}

/// A causal conv run on one chunk with its cache slot: the previous chunk's last frames replace
/// the zero padding, and this chunk's last `CACHE_T` frames (topped up with the previous last
/// frame when the chunk has one frame) are stored for the next.
fn cached_conv(conv: &CausalConv3d, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
    let prev = match cache.take() {
        Slot::Frames(t) => Some(t),
        Slot::Empty | Slot::Rep => None,
    };
    let mut cache_x = last_frames(x, CACHE_T)?;
    if cache_x.dim(2)? < CACHE_T {
        if let Some(p) = &prev {
            cache_x = Tensor::cat(&[&last_frames(p, 1)?, &cache_x], 2)?;
        }
    }
    let y = conv.forward(x, prev.as_ref())?;
    cache.put(Slot::Frames(cache_x));
    Ok(y)
}

/// `[B, C, T, H, W]` -> `[B*T, C, H, W]`.
fn frames_to_images(x: &Tensor) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    x.permute((0, 2, 1, 3, 4))?.reshape((b * t, c, h, w))
}

/// `[B*T, C, H, W]` -> `[B, C, T, H, W]`.
fn images_to_frames(x: &Tensor, b: usize) -> Result<Tensor> {
    let (bt, c, h, w) = x.dims4()?;
    x.reshape((b, bt / b, c, h, w))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()
}

/// The resampling mode of a `WanResample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleMode {
    Downsample2d,
    Downsample3d,
    Upsample2d,
    Upsample3d,
}

/// One entry of the encoder's flat `down_blocks` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownLayer {
    /// `WanResidualBlock(in_dim, out_dim)`.
    Res { in_dim: usize, out_dim: usize },
    /// `WanResample(dim, mode)`.
    Resample { dim: usize, mode: ResampleMode },
}

/// One decoder `WanUpBlock`: `(in, out)` channels of each resnet, then an optional upsampler
/// on `out_dim` channels (which halves them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpBlockPlan {
    pub resnets: Vec<(usize, usize)>,
    pub out_dim: usize,
    pub upsample: Option<ResampleMode>,
}

/// The encoder's `down_blocks`, in order, as `WanEncoder3d.__init__` builds them.
pub fn encoder_plan(cfg: &WanVaeConfig) -> Vec<DownLayer> {
    let n = cfg.dim_mult.len();
    let mut dims = vec![cfg.base_dim];
    dims.extend(cfg.dim_mult.iter().map(|m| cfg.base_dim * m));
    let mut layers = Vec::new();
    for i in 0..n {
        let mut in_dim = dims[i];
        let out_dim = dims[i + 1];
        for _ in 0..cfg.num_res_blocks {
            layers.push(DownLayer::Res { in_dim, out_dim });
            in_dim = out_dim;
        }
        if i != n - 1 {
            let mode = if cfg.temperal_downsample[i] {
                ResampleMode::Downsample3d
            } else {
                ResampleMode::Downsample2d
            };
            layers.push(DownLayer::Resample { dim: out_dim, mode });
        }
    }
    layers
}

/// Channels at the encoder's and decoder's middle blocks.
fn mid_dims(cfg: &WanVaeConfig) -> (usize, usize) {
    let last = *cfg.dim_mult.last().unwrap_or(&1);
    (cfg.base_dim * last, cfg.decoder_base_dim() * last)
}

/// The decoder's `up_blocks`, as `WanDecoder3d.__init__` builds them for Wan2.1 (each block
/// after the first takes half the previous block's channels, the upsampler's output).
pub fn decoder_plan(cfg: &WanVaeConfig) -> Vec<UpBlockPlan> {
    let n = cfg.dim_mult.len();
    let base = cfg.decoder_base_dim();
    let mut dims = vec![mid_dims(cfg).1];
    dims.extend(cfg.dim_mult.iter().rev().map(|m| base * m));
    let temperal_upsample: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
    (0..n)
        .map(|i| {
            let out_dim = dims[i + 1];
            let mut in_dim = if i > 0 { dims[i] / 2 } else { dims[i] };
            let resnets = (0..=cfg.num_res_blocks)
                .map(|_| {
                    let r = (in_dim, out_dim);
                    in_dim = out_dim;
                    r
                })
                .collect();
            let upsample = (i != n - 1).then(|| {
                if temperal_upsample[i] {
                    ResampleMode::Upsample3d
                } else {
                    ResampleMode::Upsample2d
                }
            });
            UpBlockPlan {
                resnets,
                out_dim,
                upsample,
            }
        })
        .collect()
}

fn push_conv3d(v: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, cout: usize, k: [usize; 3]) {
    v.push((format!("{p}.weight"), vec![cout, cin, k[0], k[1], k[2]]));
    v.push((format!("{p}.bias"), vec![cout]));
}

fn push_conv2d(v: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, cout: usize, k: usize) {
    v.push((format!("{p}.weight"), vec![cout, cin, k, k]));
    v.push((format!("{p}.bias"), vec![cout]));
}

fn push_res(v: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, cout: usize) {
    v.push((format!("{p}.norm1.gamma"), vec![cin, 1, 1, 1]));
    push_conv3d(v, &format!("{p}.conv1"), cin, cout, [3, 3, 3]);
    v.push((format!("{p}.norm2.gamma"), vec![cout, 1, 1, 1]));
    push_conv3d(v, &format!("{p}.conv2"), cout, cout, [3, 3, 3]);
    if cin != cout {
        push_conv3d(v, &format!("{p}.conv_shortcut"), cin, cout, [1, 1, 1]);
    }
}

fn push_resample(v: &mut Vec<(String, Vec<usize>)>, p: &str, dim: usize, mode: ResampleMode) {
    match mode {
        ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
            push_conv2d(v, &format!("{p}.resample.1"), dim, dim, 3)
        }
        ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
            push_conv2d(v, &format!("{p}.resample.1"), dim, dim / 2, 3)
        }
    }
    match mode {
        ResampleMode::Downsample3d => {
            push_conv3d(v, &format!("{p}.time_conv"), dim, dim, [3, 1, 1])
        }
        ResampleMode::Upsample3d => {
            push_conv3d(v, &format!("{p}.time_conv"), dim, 2 * dim, [3, 1, 1])
        }
        _ => {}
    }
}

fn push_mid(v: &mut Vec<(String, Vec<usize>)>, p: &str, dim: usize) {
    push_res(v, &format!("{p}.resnets.0"), dim, dim);
    v.push((format!("{p}.attentions.0.norm.gamma"), vec![dim, 1, 1]));
    push_conv2d(v, &format!("{p}.attentions.0.to_qkv"), dim, 3 * dim, 1);
    push_conv2d(v, &format!("{p}.attentions.0.proj"), dim, dim, 1);
    push_res(v, &format!("{p}.resnets.1"), dim, dim);
}

/// Every tensor of the model (diffusers names, PyTorch shapes), derived from the config alone.
pub fn tensor_specs(cfg: &WanVaeConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    let (enc_mid, dec_mid) = mid_dims(cfg);
    let z = cfg.z_dim;
    push_conv3d(
        &mut v,
        "encoder.conv_in",
        cfg.in_channels,
        cfg.base_dim,
        [3, 3, 3],
    );
    for (i, layer) in encoder_plan(cfg).into_iter().enumerate() {
        let p = format!("encoder.down_blocks.{i}");
        match layer {
            DownLayer::Res { in_dim, out_dim } => push_res(&mut v, &p, in_dim, out_dim),
            DownLayer::Resample { dim, mode } => push_resample(&mut v, &p, dim, mode),
        }
    }
    push_mid(&mut v, "encoder.mid_block", enc_mid);
    v.push(("encoder.norm_out.gamma".into(), vec![enc_mid, 1, 1, 1]));
    push_conv3d(&mut v, "encoder.conv_out", enc_mid, 2 * z, [3, 3, 3]);
    push_conv3d(&mut v, "quant_conv", 2 * z, 2 * z, [1, 1, 1]);
    push_conv3d(&mut v, "post_quant_conv", z, z, [1, 1, 1]);
    push_conv3d(&mut v, "decoder.conv_in", z, dec_mid, [3, 3, 3]);
    push_mid(&mut v, "decoder.mid_block", dec_mid);
    let plan = decoder_plan(cfg);
    for (i, block) in plan.iter().enumerate() {
        for (j, &(cin, cout)) in block.resnets.iter().enumerate() {
            push_res(
                &mut v,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                cin,
                cout,
            );
        }
        if let Some(mode) = block.upsample {
            push_resample(
                &mut v,
                &format!("decoder.up_blocks.{i}.upsamplers.0"),
                block.out_dim,
                mode,
            );
        }
    }
    let out_dim = plan.last().map_or(dec_mid, |b| b.out_dim);
    v.push(("decoder.norm_out.gamma".into(), vec![out_dim, 1, 1, 1]));
    push_conv3d(
        &mut v,
        "decoder.conv_out",
        out_dim,
        cfg.out_channels,
        [3, 3, 3],
    );
    v
}

/// Number of parameters of the full `AutoencoderKLWan` (encoder, decoder, quant convs).
pub fn param_count(cfg: &WanVaeConfig) -> u64 {
    tensor_specs(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// `WanResidualBlock`: RMS norm, SiLU, causal 3×3×3 conv, twice, plus a 1×1×1 shortcut when the
/// channel count changes. Dropout is the identity at inference.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: Tensor,
    conv1: CausalConv3d,
    norm2: Tensor,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResBlock {
    fn load(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let f32vb = vb.clone().set_dtype(DType::F32);
        let shortcut = if cin != cout {
            Some(CausalConv3d::load(
                vb.pp("conv_shortcut"),
                cin,
                cout,
                (1, 1, 1),
                (1, 1, 1),
                (0, 0, 0),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: f32vb.get((cin, 1, 1, 1), "norm1.gamma")?,
            conv1: CausalConv3d::load(vb.pp("conv1"), cin, cout, (3, 3, 3), (1, 1, 1), (1, 1, 1))?,
            norm2: f32vb.get((cout, 1, 1, 1), "norm2.gamma")?,
            conv2: CausalConv3d::load(vb.pp("conv2"), cout, cout, (3, 3, 3), (1, 1, 1), (1, 1, 1))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = channel_rms_norm_silu(x, &self.norm1)?;
        let y = cached_conv(&self.conv1, &y, cache)?;
        let y = channel_rms_norm_silu(&y, &self.norm2)?;
        let y = cached_conv(&self.conv2, &y, cache)?;
        y + h
    }
}

/// `WanAttentionBlock`: single-head self-attention over the `H×W` positions of each frame.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: Tensor,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttnBlock {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            norm: vb
                .clone()
                .set_dtype(DType::F32)
                .get((dim, 1, 1), "norm.gamma")?,
            to_qkv: Conv2d::load(vb.pp("to_qkv"), dim, 3 * dim, 1, 0, 1)?,
            proj: Conv2d::load(vb.pp("proj"), dim, dim, 1, 0, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let imgs = channel_rms_norm(&frames_to_images(x)?, &self.norm)?;
        let qkv = self.to_qkv.forward(&imgs)?; // [BT, 3C, H, W]
        let qkv = qkv
            .reshape((b * t, 1, 3 * c, h * w))?
            .permute((0, 1, 3, 2))?; // [BT, 1, HW, 3C]
        let q = qkv.narrow(3, 0, c)?;
        let k = qkv.narrow(3, c, c)?;
        let v = qkv.narrow(3, 2 * c, c)?;
        let o = attention(&q, &k, &v, 1.0 / (c as f64).sqrt(), None)?; // [BT, 1, HW, C]
        let o = o
            .squeeze(1)?
            .permute((0, 2, 1))?
            .reshape((b * t, c, h, w))?;
        let o = self.proj.forward(&o)?;
        images_to_frames(&o, b)? + x
    }
}

/// `WanMidBlock` with one attention layer: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResBlock,
    attn: AttnBlock,
    res1: ResBlock,
}

impl MidBlock {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            res0: ResBlock::load(vb.pp("resnets.0"), dim, dim)?,
            attn: AttnBlock::load(vb.pp("attentions.0"), dim)?,
            res1: ResBlock::load(vb.pp("resnets.1"), dim, dim)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

/// `WanResample`: spatial ×2 down (zero pad right/bottom, 3×3 stride-2 conv) or up (nearest ×2,
/// 3×3 conv to half the channels), and for the 3d modes a causal time conv (stride-2 down, or
/// 2× channels interleaved into 2× frames up).
#[derive(Debug, Clone)]
struct Resample {
    mode: ResampleMode,
    conv: Conv2d,
    /// The upsampling conv's weight for the shifted-GEMM CPU kernel (inference only).
    up_gemm_weight: Option<Tensor>,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    fn load(vb: VarBuilder, dim: usize, mode: ResampleMode) -> Result<Self> {
        // (out channels, padding, stride)
        let (cout, padding, stride) = match mode {
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => (dim, 0, 2),
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => (dim / 2, 1, 1),
        };
        let tvb = vb.pp("time_conv");
        let time_conv = match mode {
            ResampleMode::Downsample3d => Some(CausalConv3d::load(
                tvb,
                dim,
                dim,
                (3, 1, 1),
                (2, 1, 1),
                (0, 0, 0),
            )?),
            ResampleMode::Upsample3d => Some(CausalConv3d::load(
                tvb,
                dim,
                2 * dim,
                (3, 1, 1),
                (1, 1, 1),
                (1, 0, 0),
            )?),
            _ => None,
        };
        let conv = Conv2d::load(vb.pp("resample.1"), dim, cout, 3, padding, stride)?;
        let up = matches!(mode, ResampleMode::Upsample2d | ResampleMode::Upsample3d);
        let up_gemm_weight =
            if up && !crate::nn::differentiable() && conv.weight().device().is_cpu() {
                Some(crate::nn::kernels::conv3d_gemm_weight(
                    &conv.weight().unsqueeze(2)?,
                )?)
            } else {
                None
            };
        Ok(Self {
            mode,
            conv,
            up_gemm_weight,
            time_conv,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = x.clone();
        if let (ResampleMode::Upsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            match cache.take() {
                Slot::Empty => cache.put(Slot::Rep),
                prev => {
                    let mut cache_x = last_frames(&x, CACHE_T)?;
                    if cache_x.dim(2)? < CACHE_T {
                        let front = match &prev {
                            Slot::Frames(p) => last_frames(p, 1)?,
                            _ => cache_x.zeros_like()?,
                        };
                        cache_x = Tensor::cat(&[&front, &cache_x], 2)?;
                    }
                    let y = match &prev {
                        Slot::Frames(p) => tc.forward(&x, Some(p))?,
                        _ => tc.forward(&x, None)?,
                    };
                    cache.put(Slot::Frames(cache_x));
                    // [B, 2C, T, H, W] -> frames (t, first half), (t, second half), ...
                    let (b, c2, t, h, w) = y.dims5()?;
                    let c = c2 / 2;
                    let pair = Tensor::stack(&[y.narrow(1, 0, c)?, y.narrow(1, c, c)?], 3)?;
                    x = pair.reshape((b, c, 2 * t, h, w))?;
                }
            }
        }
        if let Some(gw) = &self.up_gemm_weight {
            if crate::nn::kernels::usable(&x) {
                // Nearest ×2 on [B, C·T, H, W] (no permute), then the 3×3 conv as shifted GEMMs.
                let (b, c, t, h, w) = x.dims5()?;
                let up = x
                    .contiguous()?
                    .reshape((b, c * t, h, w))?
                    .upsample_nearest2d(2 * h, 2 * w)?
                    .reshape((b, c, t, 2 * h, 2 * w))?;
                let p = self.conv.padding();
                return crate::nn::kernels::conv3d_shifted_gemm(
                    &[&up],
                    0,
                    gw,
                    self.conv.bias(),
                    1,
                    1,
                    p,
                    p,
                );
            }
        }
        let b = x.dim(0)?;
        let imgs = frames_to_images(&x)?;
        let imgs = match self.mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                let (_, _, h, w) = imgs.dims4()?;
                imgs.upsample_nearest2d(2 * h, 2 * w)?
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                imgs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?
            }
        };
        let mut x = images_to_frames(&self.conv.forward(&imgs)?, b)?;
        if let (ResampleMode::Downsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            match cache.take() {
                Slot::Frames(prev) => {
                    let cache_x = last_frames(&x, 1)?;
                    x = tc.forward(&Tensor::cat(&[&last_frames(&prev, 1)?, &x], 2)?, None)?;
                    cache.put(Slot::Frames(cache_x));
                }
                // First chunk: no time conv; only the last frame is ever read back.
                Slot::Empty | Slot::Rep => cache.put(Slot::Frames(last_frames(&x, 1)?)),
            }
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
enum DownBlock {
    Res(Box<ResBlock>),
    Resample(Resample),
}

/// `WanEncoder3d`: conv_in, flat down blocks, mid block, RMS norm, SiLU, conv_out to `2·z_dim`.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: CausalConv3d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: Tensor,
    conv_out: CausalConv3d,
}

impl Encoder {
    fn load(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let dim = mid_dims(cfg).0;
        let k3 = (3, 3, 3);
        let s1 = (1, 1, 1);
        let conv_in =
            CausalConv3d::load(vb.pp("conv_in"), cfg.in_channels, cfg.base_dim, k3, s1, s1)?;
        let down = encoder_plan(cfg)
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                let lvb = vb.pp(format!("down_blocks.{i}"));
                Ok(match layer {
                    DownLayer::Res { in_dim, out_dim } => {
                        DownBlock::Res(Box::new(ResBlock::load(lvb, in_dim, out_dim)?))
                    }
                    DownLayer::Resample { dim, mode } => {
                        DownBlock::Resample(Resample::load(lvb, dim, mode)?)
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::load(vb.pp("mid_block"), dim)?,
            norm_out: vb
                .clone()
                .set_dtype(DType::F32)
                .get((dim, 1, 1, 1), "norm_out.gamma")?,
            conv_out: CausalConv3d::load(vb.pp("conv_out"), dim, 2 * cfg.z_dim, k3, s1, s1)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = cached_conv(&self.conv_in, x, cache)?;
        for layer in &self.down {
            x = match layer {
                DownBlock::Res(r) => r.forward(&x, cache)?,
                DownBlock::Resample(r) => r.forward(&x, cache)?,
            };
        }
        let x = self.mid.forward(&x, cache)?;
        let x = channel_rms_norm_silu(&x, &self.norm_out)?;
        cached_conv(&self.conv_out, &x, cache)
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResBlock>,
    upsampler: Option<Resample>,
}

/// `WanDecoder3d`: conv_in, mid block, up blocks, RMS norm, SiLU, conv_out to RGB.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: Tensor,
    conv_out: CausalConv3d,
}

impl Decoder {
    fn load(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let dim = mid_dims(cfg).1;
        let plan = decoder_plan(cfg);
        let up = plan
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let bvb = vb.pp(format!("up_blocks.{i}"));
                let resnets = p
                    .resnets
                    .iter()
                    .enumerate()
                    .map(|(j, &(cin, cout))| {
                        ResBlock::load(bvb.pp(format!("resnets.{j}")), cin, cout)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let upsampler = match p.upsample {
                    Some(mode) => Some(Resample::load(bvb.pp("upsamplers.0"), p.out_dim, mode)?),
                    None => None,
                };
                Ok(UpBlock { resnets, upsampler })
            })
            .collect::<Result<Vec<_>>>()?;
        let out_dim = plan.last().map_or(dim, |b| b.out_dim);
        let k3 = (3, 3, 3);
        let s1 = (1, 1, 1);
        Ok(Self {
            conv_in: CausalConv3d::load(vb.pp("conv_in"), cfg.z_dim, dim, k3, s1, s1)?,
            mid: MidBlock::load(vb.pp("mid_block"), dim)?,
            up,
            norm_out: vb
                .clone()
                .set_dtype(DType::F32)
                .get((out_dim, 1, 1, 1), "norm_out.gamma")?,
            conv_out: CausalConv3d::load(vb.pp("conv_out"), out_dim, cfg.out_channels, k3, s1, s1)?,
        })
    }

    fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let x = cached_conv(&self.conv_in, x, cache)?;
        let mut x = self.mid.forward(&x, cache)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x, cache)?;
            }
            if let Some(u) = &block.upsampler {
                x = u.forward(&x, cache)?;
            }
        }
        let x = channel_rms_norm_silu(&x, &self.norm_out)?;
        cached_conv(&self.conv_out, &x, cache)
    }
}

/// diffusers' `AutoencoderKLWan` for the Wan2.1 config (no tiling, no slicing: batches run whole).
#[derive(Debug, Clone)]
pub struct AutoencoderKLWan {
    encoder: Encoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
    cfg: WanVaeConfig,
    dtype: DType,
}

impl AutoencoderKLWan {
    /// Loads from a VarBuilder with diffusers names; computes in the VarBuilder's dtype.
    pub fn load(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let z = cfg.z_dim;
        let one = (1, 1, 1);
        let zero = (0, 0, 0);
        Ok(Self {
            encoder: Encoder::load(vb.pp("encoder"), cfg)?,
            quant_conv: CausalConv3d::load(vb.pp("quant_conv"), 2 * z, 2 * z, one, one, zero)?,
            post_quant_conv: CausalConv3d::load(vb.pp("post_quant_conv"), z, z, one, one, zero)?,
            decoder: Decoder::load(vb.pp("decoder"), cfg)?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// The config the model was loaded with.
    pub fn config(&self) -> &WanVaeConfig {
        &self.cfg
    }

    /// Pixel frames decoded from `latent_frames` latent frames: `1 + 4·(n-1)` for Wan2.1.
    pub fn num_frames(&self, latent_frames: usize) -> usize {
        if latent_frames == 0 {
            0
        } else {
            1 + self.cfg.temporal_factor() * (latent_frames - 1)
        }
    }

    /// Encodes video `[B, in_channels, F, H, W]` in `[-1, 1]` to the diagonal Gaussian's
    /// `(mean, logvar)`, each `[B, z_dim, 1 + (F-1)/4, H/8, W/8]` f32; logvar is clamped to
    /// `[-30, 20]`. As in diffusers, frames past the last whole chunk of 4 are ignored.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = x.to_dtype(self.dtype)?;
        let f = x.dim(2)?;
        if f == 0 {
            candle_core::bail!("VAE encode: the video has no frames");
        }
        let mut cache = FeatCache::default();
        let chunks = 1 + (f - 1) / ENCODE_CHUNK;
        let mut outs = Vec::with_capacity(chunks);
        for i in 0..chunks {
            cache.begin_chunk();
            let chunk = if i == 0 {
                x.narrow(2, 0, 1)?
            } else {
                x.narrow(2, 1 + ENCODE_CHUNK * (i - 1), ENCODE_CHUNK)?
            };
            outs.push(self.encoder.forward(&chunk, &mut cache)?);
        }
        let out = Tensor::cat(&outs, 2)?;
        let enc = self.quant_conv.forward(&out, None)?.to_dtype(DType::F32)?;
        let z = self.cfg.z_dim;
        let mean = enc.narrow(1, 0, z)?;
        let logvar = enc.narrow(1, z, z)?.clamp(-30f32, 20f32)?;
        Ok((mean.contiguous()?, logvar))
    }

    /// Streams the decode of latents `[B, z_dim, T, h, w]` one latent frame at a time.
    pub fn decode_stream(&self, z: &Tensor) -> Result<VaeDecodeStream<'_>> {
        let (_, c, t, _, _) = z.dims5()?;
        if c != self.cfg.z_dim {
            candle_core::bail!(
                "VAE decode: latents have {c} channels, the VAE expects z_dim = {}",
                self.cfg.z_dim
            );
        }
        Ok(VaeDecodeStream {
            vae: self,
            z: z.to_dtype(self.dtype)?,
            next: 0,
            frames: t,
            cache: FeatCache::default(),
        })
    }

    /// Decodes latents `[B, z_dim, T, h, w]` to video `[B, 3, 1 + 4(T-1), 8h, 8w]` f32 in `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let chunks = self.decode_stream(z)?.collect::<Result<Vec<_>>>()?;
        Tensor::cat(&chunks, 2)
    }

    fn per_channel(&self, values: impl Fn(usize) -> f32, like: &Tensor) -> Result<Tensor> {
        let v: Vec<f32> = (0..self.cfg.z_dim).map(values).collect();
        Tensor::from_vec(v, (1, self.cfg.z_dim, 1, 1, 1), like.device())?.to_dtype(like.dtype())
    }

    /// DiT latent space -> VAE latent space, as `WanPipeline` does before decoding:
    /// `z / (1 / std) + mean` per channel, with `1 / std` rounded to f32 first.
    pub fn denormalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let inv_std = self.per_channel(|i| 1.0 / self.cfg.latents_std[i] as f32, z)?;
        let mean = self.per_channel(|i| self.cfg.latents_mean[i] as f32, z)?;
        z.broadcast_div(&inv_std)?.broadcast_add(&mean)
    }

    /// VAE latent space -> DiT latent space (`WanVideoToVideoPipeline`): `(mu - mean) * (1 / std)`.
    pub fn normalize_latents(&self, mu: &Tensor) -> Result<Tensor> {
        let inv_std = self.per_channel(|i| 1.0 / self.cfg.latents_std[i] as f32, mu)?;
        let mean = self.per_channel(|i| self.cfg.latents_mean[i] as f32, mu)?;
        mu.broadcast_sub(&mean)?.broadcast_mul(&inv_std)
    }
}

/// A decode in progress: each step decodes one latent frame, carrying only the feature cache
/// (at most [`CACHE_T`] frames per causal conv) between steps.
#[derive(Debug)]
pub struct VaeDecodeStream<'a> {
    vae: &'a AutoencoderKLWan,
    /// `[B, z_dim, T, h, w]` in the model dtype.
    z: Tensor,
    next: usize,
    frames: usize,
    cache: FeatCache,
}

impl VaeDecodeStream<'_> {
    /// Latent frames left to decode.
    pub fn remaining(&self) -> usize {
        self.frames - self.next
    }

    /// Decodes the next latent frame into pixel frames `[B, 3, n, H, W]` f32 clamped to
    /// `[-1, 1]` (n = 1 for the first latent frame, 4 after for Wan2.1); `None` when done.
    pub fn next_chunk(&mut self) -> Result<Option<Tensor>> {
        if self.next >= self.frames {
            return Ok(None);
        }
        let zi = self.z.narrow(2, self.next, 1)?;
        self.next += 1;
        let x = self.vae.post_quant_conv.forward(&zi, None)?;
        self.cache.begin_chunk();
        let out = self.vae.decoder.forward(&x, &mut self.cache)?;
        Ok(Some(out.to_dtype(DType::F32)?.clamp(-1f32, 1f32)?))
    }
}

impl Iterator for VaeDecodeStream<'_> {
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}
