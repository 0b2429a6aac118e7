//! Text → latent → video orchestration for the Wan family: prompt encoding, seeded noise, the
//! guided denoising loop, and the streamed VAE decode. Reports progress through [`Observer`]
//! and hands decoded frames to a caller-supplied sink; it never prints or writes files.

pub mod estimate;
pub mod model;
pub mod window;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

pub use model::{LateGuidance, ModelDefaults, SoraModelCard, WanModel};
pub use window::{AxisWindows, Blender, WindowPlan};

use crate::models::umt5::{Umt5Encoder, Umt5Tokenizer};
use crate::sched::guidance::{Guidance, Guider};
use crate::sched::{self, SamplerKind};

/// One generation, fully resolved (no defaults left to fill in).
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    pub prompt: String,
    pub negative_prompt: String,
    /// Generation size on the model's grid (multiples of [`WanModel::spatial_grid`]).
    pub width: usize,
    pub height: usize,
    /// Pixel frames (`1 + 4k` for Wan).
    pub frames: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Guidance at low noise (σ below its threshold) instead of `guidance`.
    pub cfg_late: Option<LateGuidance>,
    pub shift: f64,
    pub sampler: SamplerKind,
    /// How guided steps combine the prompt's and the negative prompt's predictions.
    pub guider: Guider,
    pub seed: u64,
    /// Temporal windows `(size, overlap)` in latent frames; `None`: one pass over the clip.
    pub window: Option<(usize, usize)>,
    /// Spatial tiles `(size, overlap)` in latent cells; `None`: the whole frame at once.
    pub tile: Option<(usize, usize)>,
}

impl GenRequest {
    /// The guidance scale of a step at noise level `sigma`: the late scale below its
    /// threshold, else `guidance`.
    pub fn guidance_at(&self, sigma: f32) -> f64 {
        match self.cfg_late {
            Some(l) if (sigma as f64) < l.below => l.scale,
            _ => self.guidance,
        }
    }

    /// Whether any step is guided (runs the negative prompt beside the prompt).
    pub fn guided(&self) -> bool {
        self.guidance > 1.0 || self.cfg_late.is_some_and(|l| l.scale > 1.0)
    }
}

/// Progress events of a generation. The CLI draws bars; tests and `--quiet` ignore them.
pub trait Observer {
    /// A stage begins; `total` units of work (steps, frames), 0 if unknown.
    fn stage(&mut self, _name: &str, _total: u64) {}
    /// `n` units of the current stage are done.
    fn advance(&mut self, _n: u64) {}
    /// The current stage finished after `elapsed`.
    fn stage_done(&mut self, _name: &str, _elapsed: Duration) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Wall time spent in each stage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub text_encode: Duration,
    pub denoise: Duration,
    /// VAE decode and the sink (frame conversion, encode, mux) together.
    pub decode: Duration,
    /// The part of `decode` spent in the sink.
    pub write: Duration,
}

impl Timings {
    /// The VAE's part of the decode stage (`decode` without the sink's `write`).
    pub fn vae_decode(&self) -> Duration {
        self.decode.saturating_sub(self.write)
    }
}

/// The latent shape `[1, C, T', H/8, W/8]` for a request.
pub fn latent_shape(
    model: &WanModel,
    width: usize,
    height: usize,
    frames: usize,
) -> Result<(usize, usize, usize, usize, usize)> {
    let tf = model.temporal_factor();
    if frames == 0 || !(frames - 1).is_multiple_of(tf) {
        bail!("{frames} frames cannot be generated: this model makes 1 + {tf}·k frames");
    }
    let grid = model.spatial_grid();
    if !width.is_multiple_of(grid) || !height.is_multiple_of(grid) || width == 0 || height == 0 {
        bail!("{width}×{height} is not on the model's {grid}-pixel grid");
    }
    let s = model.vae.config().spatial_factor();
    Ok((
        1,
        model.vae.config().z_dim,
        (frames - 1) / tf + 1,
        height / s,
        width / s,
    ))
}

/// Seeded standard-normal noise, identical on every run, platform and thread count
/// (ChaCha8 stream, row-major over the shape).
pub fn seeded_noise(
    shape: (usize, usize, usize, usize, usize),
    seed: u64,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3 * shape.4;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = rand_distr::StandardNormal
        .sample_iter(&mut rng)
        .take(n)
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// `prompt_clean` of the Wan pipeline: HTML entities unescaped, whitespace collapsed, trimmed.
pub fn clean_prompt(text: &str) -> String {
    let mut s = text.to_string();
    for _ in 0..2 {
        s = s
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&#x27;", "'")
            .replace("&nbsp;", "\u{a0}")
            .replace("&amp;", "&");
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Encodes prompts as the Wan pipeline does: UMT5 hidden states of the real tokens, zero rows
/// after them up to `text_len`. Returns `[B, text_len, d_model]`. The encoder runs only over
/// the longest prompt's tokens: masked padding cannot change the real tokens' states.
pub fn encode_text(
    tokenizer: &Umt5Tokenizer,
    encoder: &Umt5Encoder,
    prompts: &[&str],
    text_len: usize,
    device: &Device,
) -> Result<Tensor> {
    let cleaned: Vec<String> = prompts.iter().map(|p| clean_prompt(p)).collect();
    let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
    let (ids, mask) = tokenizer.encode_padded(&refs, text_len)?;
    let lens: Vec<usize> = mask
        .iter()
        .map(|m| m.iter().filter(|v| **v > 0).count())
        .collect();
    let used = lens.iter().copied().max().unwrap_or(0).max(1);
    let ids: Vec<Vec<u32>> = ids.iter().map(|r| r[..used].to_vec()).collect();
    let mask: Vec<Vec<u32>> = mask.iter().map(|r| r[..used].to_vec()).collect();
    let ids_t = crate::models::umt5::rows_to_tensor(&ids, device)?;
    let mask_t = crate::models::umt5::rows_to_tensor(&mask, device)?;
    let hidden = encoder
        .forward(&ids_t, Some(&mask_t))?
        .to_dtype(DType::F32)?;
    let mut rows = Vec::with_capacity(prompts.len());
    for (i, len) in lens.iter().enumerate() {
        let real = hidden.get(i)?.narrow(0, 0, *len)?;
        rows.push(real.pad_with_zeros(0, 0, text_len - len)?);
    }
    Ok(Tensor::stack(&rows, 0)?)
}

/// [`encode_text`] with a loaded model's tokenizer, encoder and text length.
pub fn encode_prompts(model: &WanModel, prompts: &[&str]) -> Result<Tensor> {
    encode_text(
        &model.tokenizer,
        &model.text_encoder,
        prompts,
        model.defaults.text_len,
        &model.device,
    )
}

/// The window plan of a request (`None` when neither windows nor tiles were asked for).
pub fn window_plan(
    model: &WanModel,
    req: &GenRequest,
    latent: &[usize],
) -> Result<Option<WindowPlan>> {
    if req.window.is_none() && req.tile.is_none() {
        return Ok(None);
    }
    let p = model.transformer.config().patch_size;
    let (t, h, w) = (latent[2], latent[3], latent[4]);
    let tw = match req.window {
        Some((win, ov)) => AxisWindows::new(t, win, ov, p[0])?,
        None => AxisWindows::whole(t),
    };
    let (hw, ww) = match req.tile {
        Some((tile, ov)) => (
            AxisWindows::new(h, tile, ov, p[1])?,
            AxisWindows::new(w, tile, ov, p[2])?,
        ),
        None => (AxisWindows::whole(h), AxisWindows::whole(w)),
    };
    Ok(Some(WindowPlan {
        t: tw,
        h: hw,
        w: ww,
    }))
}

/// The conditional and (when `guided`) unconditional velocities of latents `[B, C, T, H, W]`
/// (B windows of one size) from one DiT pass over `[cond…, uncond…]`. `ctx` is `[1 or 2, L, D]`.
fn predict(
    model: &WanModel,
    x: &Tensor,
    t: f32,
    ctx: &Tensor,
    guided: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let b = x.dim(0)?;
    let ctx2 = if guided {
        let c = ctx.narrow(0, 0, 1)?.repeat((b, 1, 1))?;
        let u = ctx.narrow(0, 1, 1)?.repeat((b, 1, 1))?;
        Tensor::cat(&[c, u], 0)?
    } else {
        ctx.narrow(0, 0, 1)?.repeat((b, 1, 1))?
    };
    let tt = Tensor::full(t, b, &model.device)?;
    // Both passes share the latent and the timestep: the transformer runs what does not see
    // the text once (see `forward_guided`).
    let v = model
        .transformer
        .forward_guided(x, &tt, &ctx2, (0, 0, 0))
        .context("denoising step")?;
    split_predictions(v, b, guided)
}

/// `[cond…, uncond…]` (2·`b` rows when `guided`, else `b`) as the conditional and unconditional
/// predictions.
fn split_predictions(v: Tensor, b: usize, guided: bool) -> Result<(Tensor, Option<Tensor>)> {
    if guided {
        Ok((v.narrow(0, 0, b)?, Some(v.narrow(0, b, b)?)))
    } else {
        Ok((v, None))
    }
}

/// Tokens per DiT call (before the guidance doubling) when windows are batched together:
/// enough for efficient GEMMs, small enough that peak memory does not grow with the number
/// of windows (a 60 s clip peaks like a 5 s one).
const WINDOW_BATCH_TOKENS: usize = 1536;

/// The conditional and (when `guided`) unconditional velocities of the whole latent
/// `[1, C, T, H, W]` from overlapping windows, each blended. Windows of equal size are batched.
/// Positions start at 0 in every window: RoPE attention depends only on position differences,
/// so this equals using each window's absolute offsets.
fn windowed_predict(
    model: &WanModel,
    latents: &Tensor,
    t: f32,
    ctx: &Tensor,
    guided: bool,
    plan: &WindowPlan,
) -> Result<(Tensor, Option<Tensor>)> {
    let dims = latents.dims5()?;
    let preds = if guided { 2 } else { 1 };
    let mut blender = Blender::new([preds * dims.0, dims.1, dims.2, dims.3, dims.4]);
    let p = model.transformer.config().patch_size;
    let mut groups: std::collections::BTreeMap<(usize, usize, usize), Vec<window::Window>> =
        Default::default();
    for win in plan.windows() {
        groups
            .entry((win[0].2, win[1].2, win[2].2))
            .or_default()
            .push(win);
    }
    for ((tn, hn, wn), wins) in groups {
        let tokens = (tn / p[0]) * (hn / p[1]) * (wn / p[2]);
        let per = (WINDOW_BATCH_TOKENS / tokens.max(1)).max(1);
        for chunk in wins.chunks(per) {
            let xs = chunk
                .iter()
                .map(|w| {
                    latents
                        .narrow(2, w[0].1, tn)?
                        .narrow(3, w[1].1, hn)?
                        .narrow(4, w[2].1, wn)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let x = Tensor::cat(&xs, 0)?;
            let (cond, uncond) = predict(model, &x, t, ctx, guided)?;
            for (i, w) in chunk.iter().enumerate() {
                let mut v = cond.narrow(0, i, 1)?;
                if let Some(u) = &uncond {
                    v = Tensor::cat(&[v, u.narrow(0, i, 1)?], 0)?;
                }
                blender.add(
                    &v,
                    (w[0].1, w[1].1, w[2].1),
                    &plan.t.weights(w[0].0),
                    &plan.h.weights(w[1].0),
                    &plan.w.weights(w[2].0),
                )?;
            }
        }
    }
    split_predictions(blender.finish(latents.device())?, dims.0, guided)
}

/// Pixel area above which the VAE decodes in spatial tiles.
pub const DECODE_TILE_ABOVE: usize = 512 * 512;
/// Decode tile side and overlap in pixels.
pub const DECODE_TILE_PX: usize = 256;
pub const DECODE_OVERLAP_PX: usize = 32;

/// Decode tiles `(size, overlap)` in latent cells for a `width`×`height` frame, or `None` to
/// decode whole frames.
pub fn decode_tiles(model: &WanModel, width: usize, height: usize) -> Option<(usize, usize)> {
    if width * height <= DECODE_TILE_ABOVE {
        return None;
    }
    let f = model.vae.config().spatial_factor();
    Some((DECODE_TILE_PX / f, (DECODE_OVERLAP_PX / f).max(1)))
}

/// A streaming VAE decode, whole-frame or in overlapping spatial tiles (each with its own
/// causal cache, advanced in lockstep and blended with linear ramps in pixel space), so the
/// memory of a decode step is bounded by the tile, not the frame.
pub struct TiledDecode<'a> {
    streams: Vec<(
        crate::models::wan::vae::VaeDecodeStream<'a>,
        [window::Span; 2],
    )>,
    h: Option<AxisWindows>,
    w: Option<AxisWindows>,
    pixels: (usize, usize),
    /// Pixels per latent cell.
    f: usize,
}

impl<'a> TiledDecode<'a> {
    /// `z`: VAE-space latents `[1, C, T, h, w]`.
    pub fn new(model: &'a WanModel, z: &Tensor, tiles: Option<(usize, usize)>) -> Result<Self> {
        let (_, _, _, lh, lw) = z.dims5()?;
        let f = model.vae.config().spatial_factor();
        let (ha, wa) = match tiles {
            Some((tile, ov)) => (
                AxisWindows::new(lh, tile, ov, 1)?,
                AxisWindows::new(lw, tile, ov, 1)?,
            ),
            None => (AxisWindows::whole(lh), AxisWindows::whole(lw)),
        };
        let mut streams = Vec::new();
        for hi in 0..ha.count() {
            for wi in 0..wa.count() {
                let (h0, hn, w0, wn) = (ha.starts[hi], ha.size(hi), wa.starts[wi], wa.size(wi));
                let zt = z.narrow(3, h0, hn)?.narrow(4, w0, wn)?;
                streams.push((model.vae.decode_stream(&zt)?, [(hi, h0, hn), (wi, w0, wn)]));
            }
        }
        let px = |a: &AxisWindows| AxisWindows {
            len: a.len * f,
            win: a.win * f,
            starts: a.starts.iter().map(|s| s * f).collect(),
        };
        let tiled = streams.len() > 1;
        Ok(Self {
            streams,
            h: tiled.then(|| px(&ha)),
            w: tiled.then(|| px(&wa)),
            pixels: (lh * f, lw * f),
            f,
        })
    }

    /// The next decoded chunk `[3, n, H, W]` in [-1, 1], or `None` when done.
    pub fn next_chunk(&mut self) -> Result<Option<Tensor>> {
        let (Some(ha), Some(wa)) = (&self.h, &self.w) else {
            let (stream, _) = &mut self.streams[0];
            return Ok(stream.next_chunk()?.map(|c| c.get(0)).transpose()?);
        };
        let mut blender: Option<Blender> = None;
        let dev = Device::Cpu;
        for (stream, [(hi, h0, _), (wi, w0, _)]) in self.streams.iter_mut() {
            let Some(chunk) = stream.next_chunk()? else {
                return Ok(None);
            };
            let chunk = chunk.to_device(&dev)?;
            let (_, c, n, _, _) = chunk.dims5()?;
            let b = blender
                .get_or_insert_with(|| Blender::new([1, c, n, self.pixels.0, self.pixels.1]));
            let ones = vec![1f32; n];
            b.add(
                &chunk,
                (0, *h0 * self.f, *w0 * self.f),
                &ones,
                &ha.weights(*hi),
                &wa.weights(*wi),
            )?;
        }
        match blender {
            Some(b) => Ok(Some(b.finish(&dev)?.get(0)?)),
            None => Ok(None),
        }
    }
}

/// Runs a generation: encodes the prompts, denoises from `init_noise` (or the seeded noise),
/// and streams decoded video chunks `[3, n, H, W]` in [-1, 1] to `sink` in order.
pub fn generate(
    model: &WanModel,
    req: &GenRequest,
    init_noise: Option<&Tensor>,
    obs: &mut dyn Observer,
    cancel: &dyn Fn() -> bool,
    sink: &mut dyn FnMut(&Tensor) -> Result<()>,
) -> Result<Timings> {
    let mut timings = Timings::default();
    let shape = latent_shape(model, req.width, req.height, req.frames)?;
    let guided = req.guided();

    let t0 = Instant::now();
    obs.stage("encode text", 0);
    let prompts: Vec<&str> = if guided {
        vec![&req.prompt, &req.negative_prompt]
    } else {
        vec![&req.prompt]
    };
    let context = encode_prompts(model, &prompts)?;
    let ctx = model
        .transformer
        .embed_text(&context.to_dtype(model.dtype)?)?;
    timings.text_encode = t0.elapsed();
    obs.stage_done("encode text", timings.text_encode);

    let mut latents = match init_noise {
        Some(n) => {
            let dims = n.dims();
            let want = [shape.0, shape.1, shape.2, shape.3, shape.4];
            if dims != want {
                bail!("--init-noise tensor `latents` has shape {dims:?} but this request needs {want:?}");
            }
            n.to_dtype(DType::F32)?.to_device(&model.device)?
        }
        None => seeded_noise(shape, req.seed, &model.device)?,
    };

    let t1 = Instant::now();
    let mut sampler = sched::build(
        req.sampler,
        &model.scheduler,
        req.steps,
        req.shift,
        req.seed,
    );
    let timesteps = sampler.timesteps().to_vec();
    let sigmas = sampler.sigmas().to_vec();
    let mut guidance = Guidance::new(req.guider);
    obs.stage("denoise", timesteps.len() as u64);
    let plan = window_plan(model, req, latents.dims())?;
    for (i, t) in timesteps.into_iter().enumerate() {
        if cancel() {
            bail!("interrupted");
        }
        let g = req.guidance_at(sigmas[i]);
        let v = if req.guider.zeroes_step(i) {
            latents.zeros_like()?
        } else {
            let guided = g > 1.0;
            let (cond, uncond) = match &plan {
                None => predict(model, &latents, t, &ctx, guided)?,
                Some(p) => windowed_predict(model, &latents, t, &ctx, guided, p)?,
            };
            guidance.combine(g, &cond, uncond.as_ref())?
        };
        latents = sampler.step(&v, &latents)?;
        obs.advance(1);
    }
    timings.denoise = t1.elapsed();
    obs.stage_done("denoise", timings.denoise);

    let t2 = Instant::now();
    let z = model
        .vae
        .denormalize_latents(&latents.to_dtype(model.dtype)?)?;
    obs.stage("decode", req.frames as u64);
    let mut decoder = TiledDecode::new(model, &z, decode_tiles(model, req.width, req.height))?;
    while let Some(chunk) = decoder.next_chunk()? {
        if cancel() {
            bail!("interrupted");
        }
        let n = chunk.dim(1)? as u64;
        let ts = Instant::now();
        sink(&chunk)?;
        timings.write += ts.elapsed();
        obs.advance(n);
    }
    timings.decode = t2.elapsed();
    obs.stage_done("decode", timings.decode);
    Ok(timings)
}
