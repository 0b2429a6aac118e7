//! From flags and prompt files to validated jobs: every default filled in from the model,
//! every number checked, output paths decided. Pure functions, so each rule is unit-tested.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::pipeline::{GenRequest, LateGuidance, ModelDefaults};
use crate::sched::guidance::Guider;
use crate::sched::SamplerKind;

/// Largest accepted frame side and area; beyond this a request is a typo, not a video.
pub const MAX_SIDE: usize = 16_384;
pub const MAX_PIXELS: usize = 8192 * 8192;
/// Longest accepted duration in seconds.
pub const MAX_SECS: f64 = 3600.0;

/// Settings that flags give for every item and a JSON Lines item may override.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub res: Option<String>,
    pub secs: Option<f64>,
    pub fps: Option<u32>,
    pub frames: Option<usize>,
    pub steps: Option<usize>,
    pub cfg: Option<f64>,
    pub cfg_late: Option<f64>,
    pub cfg_late_below: Option<f64>,
    pub shift: Option<f64>,
    pub sampler: Option<SamplerKind>,
    /// `--guider`'s form (`apg:eta=0`), not `sora.json`'s object.
    #[serde(default, deserialize_with = "guider_spec")]
    pub guider: Option<Guider>,
    pub seed: Option<u64>,
    pub out: Option<PathBuf>,
    /// Temporal window length in frames.
    pub window: Option<usize>,
    /// Frames shared by neighbouring windows.
    pub overlap: Option<usize>,
    /// Spatial tile side in pixels (0: no tiling).
    pub tile: Option<usize>,
}

impl Overrides {
    /// `item` over `self`.
    pub fn merged(&self, item: &Overrides) -> Overrides {
        Overrides {
            prompt: item.prompt.clone().or_else(|| self.prompt.clone()),
            negative_prompt: item
                .negative_prompt
                .clone()
                .or_else(|| self.negative_prompt.clone()),
            res: item.res.clone().or_else(|| self.res.clone()),
            secs: item.secs.or(if item.frames.is_some() {
                None
            } else {
                self.secs
            }),
            fps: item.fps.or(self.fps),
            frames: item.frames.or(if item.secs.is_some() {
                None
            } else {
                self.frames
            }),
            steps: item.steps.or(self.steps),
            cfg: item.cfg.or(self.cfg),
            cfg_late: item.cfg_late.or(self.cfg_late),
            cfg_late_below: item.cfg_late_below.or(self.cfg_late_below),
            shift: item.shift.or(self.shift),
            sampler: item.sampler.or(self.sampler),
            guider: item.guider.or(self.guider),
            seed: item.seed.or(self.seed),
            out: item.out.clone().or_else(|| self.out.clone()),
            window: item.window.or(self.window),
            overlap: item.overlap.or(self.overlap),
            tile: item.tile.or(self.tile),
        }
    }
}

/// One entry of a prompt file, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// 1-based line in the prompt file (None for `--prompt`).
    pub line: Option<usize>,
    pub overrides: Overrides,
}

/// Reads a prompt file (`-` = stdin): text lines (blank lines and `#` comments skipped) or,
/// when the first entry starts with `{`, JSON Lines. Lines that fail to parse become `Err`
/// items so the batch can report them and go on.
pub fn read_prompt_file(path: &Path) -> Result<Vec<std::result::Result<Item, (usize, String)>>> {
    let mut bytes = Vec::new();
    let name = if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read prompts from standard input")?;
        "standard input".to_string()
    } else {
        bytes = std::fs::read(path)
            .with_context(|| format!("cannot read prompt file {}", path.display()))?;
        path.display().to_string()
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = upto.iter().filter(|b| **b == b'\n').count() + 1;
            bail!("{name} is not valid UTF-8 (line {line}): save it as UTF-8 text");
        }
    };
    let entries: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if entries.is_empty() {
        bail!("{name} has no prompts (blank lines and # comments are skipped)");
    }
    let jsonl = entries[0].1.starts_with('{');
    Ok(entries
        .into_iter()
        .map(|(line, l)| {
            if jsonl {
                serde_json::from_str::<Overrides>(l)
                    .map_err(|e| {
                        (
                            line,
                            format!("{name} line {line}: not a valid JSON item: {e}"),
                        )
                    })
                    .and_then(|o| {
                        if o.prompt.as_deref().is_none_or(|p| p.trim().is_empty()) {
                            Err((line, format!("{name} line {line}: item has no \"prompt\"")))
                        } else {
                            Ok(Item {
                                line: Some(line),
                                overrides: o,
                            })
                        }
                    })
            } else {
                Ok(Item {
                    line: Some(line),
                    overrides: Overrides {
                        prompt: Some(l.to_string()),
                        ..Default::default()
                    },
                })
            }
        })
        .collect())
}

/// What a model contributes to planning: its defaults and its size rules.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRules {
    pub defaults: ModelDefaults,
    /// Frame sides must be multiples of this (16 for Wan: 8× VAE × 2× patch).
    pub grid: usize,
    /// Frames come as `1 + temporal·k`.
    pub temporal: usize,
    /// Pixels per latent cell (the VAE's spatial factor).
    pub latent_px: usize,
    pub default_shift: f64,
}

/// Image or video output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Mp4,
    Png,
}

/// A fully resolved generation job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub index: usize,
    pub line: Option<usize>,
    pub request: GenRequest,
    /// Output size (what was asked for); the request's size is this rounded up to the grid.
    pub width: usize,
    pub height: usize,
    /// Top-left corner of the centred crop from the generated frame.
    pub crop: (usize, usize),
    /// Frames written (≤ the generated frames when a duration was asked for).
    pub write_frames: usize,
    pub fps: u32,
    pub out: PathBuf,
    pub kind: OutputKind,
}

/// Parses `WxH`.
pub fn parse_res(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X', '×'])
        .with_context(|| format!("--res {s:?} is not WIDTHxHEIGHT (e.g. 1920x1080)"))?;
    let parse = |v: &str, what: &str| -> Result<usize> {
        v.trim()
            .parse::<usize>()
            .with_context(|| format!("--res {s:?}: {what} {v:?} is not a whole number"))
    };
    let (w, h) = (parse(w, "width")?, parse(h, "height")?);
    if w == 0 || h == 0 {
        bail!("--res {s:?}: width and height must be at least 1");
    }
    if w > MAX_SIDE || h > MAX_SIDE || w * h > MAX_PIXELS {
        bail!(
            "--res {s:?} is too large: at most {MAX_SIDE} pixels a side and {} megapixels",
            MAX_PIXELS / 1_000_000
        );
    }
    Ok((w, h))
}

/// A file-name-safe slug of a prompt (lowercase ASCII words, at most 48 characters).
pub fn slug(prompt: &str) -> String {
    let mut s = String::new();
    for c in prompt.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            s.push(c);
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
        if s.len() >= 48 {
            break;
        }
    }
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() {
        "video".into()
    } else {
        s
    }
}

fn round_up(v: usize, m: usize) -> usize {
    v.div_ceil(m) * m
}

/// Resolves one item into a job. `batch_dir` is set for batches (outputs named
/// `NNN-slug.ext` inside it unless the item names its own `out`).
pub fn resolve_job(
    rules: &ModelRules,
    o: &Overrides,
    index: usize,
    line: Option<usize>,
    batch_dir: Option<&Path>,
    seed: u64,
) -> Result<Job> {
    let d = &rules.defaults;
    let prompt = o.prompt.clone().unwrap_or_default();
    if prompt.trim().is_empty() {
        bail!("the prompt is empty: give --prompt TEXT or a prompt file");
    }
    let (width, height) = match &o.res {
        Some(r) => parse_res(r)?,
        None => (d.width, d.height),
    };
    let fps = o.fps.unwrap_or(d.fps);
    if fps == 0 || fps > 240 {
        bail!("--fps {fps} is out of range: use 1 to 240");
    }
    let tf = rules.temporal;
    let (gen_frames, write_frames) = match (o.frames, o.secs) {
        (Some(f), _) => {
            if f == 0 || (f - 1) % tf != 0 {
                let lo = if f == 0 { 1 } else { 1 + (f - 1) / tf * tf };
                bail!(
                    "--frames {f} cannot be honoured: this model makes 1 + {tf}·k frames (nearest: {lo} or {}); or use --secs to have the output trimmed",
                    lo + tf
                );
            }
            (f, f)
        }
        (None, Some(s)) => {
            if !s.is_finite() || s <= 0.0 {
                bail!("--secs {s} must be a positive number of seconds");
            }
            if s > MAX_SECS {
                bail!("--secs {s} is more than the {MAX_SECS} s sora accepts");
            }
            let want = ((s * fps as f64).round() as usize).max(1);
            (1 + (want - 1).div_ceil(tf) * tf, want)
        }
        (None, None) => (d.frames, d.frames),
    };
    let steps = o.steps.unwrap_or(d.steps);
    if steps == 0 || steps > 1000 {
        bail!("--steps {steps} is out of range: use 1 to 1000");
    }
    let guidance = o.cfg.unwrap_or(d.guidance);
    if !guidance.is_finite() || guidance < 0.0 {
        bail!("--cfg {guidance} must be a non-negative number");
    }
    let cfg_late = late_guidance(o, d)?;
    // Flags and JSON Lines items are checked as they are parsed; the model's own setting here.
    let guider = match o.guider {
        Some(g) => g,
        None => {
            d.guider
                .validate()
                .context("the model's sora.json \"guider\"")?;
            d.guider
        }
    };
    let shift = o.shift.unwrap_or(rules.default_shift);
    if !shift.is_finite() || shift <= 0.0 {
        bail!("--shift {shift} must be a positive number");
    }
    let ext_kind = |p: &Path| -> Result<OutputKind> {
        match p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(OutputKind::Png),
            Some("mp4") | Some("m4v") | Some("mov") => Ok(OutputKind::Mp4),
            other => bail!(
                "output {} has extension {:?}: use .mp4 for video or .png for one frame",
                p.display(),
                other.unwrap_or("")
            ),
        }
    };
    let default_kind = if write_frames == 1 {
        OutputKind::Png
    } else {
        OutputKind::Mp4
    };
    let out = match (&o.out, batch_dir) {
        (Some(p), None) => p.clone(),
        (Some(p), Some(dir)) if p.is_relative() => dir.join(p),
        (Some(p), Some(_)) => p.clone(),
        (None, Some(dir)) => {
            let ext = if default_kind == OutputKind::Png {
                "png"
            } else {
                "mp4"
            };
            dir.join(format!("{:03}-{}.{ext}", index + 1, slug(&prompt)))
        }
        (None, None) => PathBuf::from(if default_kind == OutputKind::Png {
            "out.png"
        } else {
            "out.mp4"
        }),
    };
    let kind = ext_kind(&out)?;
    if kind == OutputKind::Png && write_frames != 1 {
        bail!(
            "{} is a PNG, which holds one frame, but {write_frames} frames were asked for: use .mp4, or --frames 1",
            out.display()
        );
    }
    if kind == OutputKind::Mp4 && (width % 2 != 0 || height % 2 != 0) {
        bail!(
            "--res {width}x{height}: MP4 video needs even width and height (yuv420p); try {}x{}",
            width + width % 2,
            height + height % 2
        );
    }
    let (gw, gh) = (round_up(width, rules.grid), round_up(height, rules.grid));
    let (window, tile) = windows_for(rules, o, gen_frames, gw, gh)?;
    Ok(Job {
        index,
        line,
        request: GenRequest {
            prompt,
            negative_prompt: o
                .negative_prompt
                .clone()
                .unwrap_or_else(|| d.negative_prompt.clone()),
            width: gw,
            height: gh,
            frames: gen_frames,
            steps,
            guidance,
            cfg_late,
            shift,
            sampler: o.sampler.unwrap_or(d.sampler),
            guider,
            seed: o.seed.unwrap_or(seed),
            window,
            tile,
        },
        width,
        height,
        crop: ((gh - height) / 2, (gw - width) / 2),
        write_frames,
        fps,
        out,
        kind,
    })
}

/// A JSON Lines `guider` value: the `--guider` spec string.
fn guider_spec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Guider>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| s.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// The late (low-noise) guidance of a job: `--cfg-late` / `--cfg-late-below` over the model's.
/// A threshold with no scale (neither flag nor model) means none; the threshold is still checked.
fn late_guidance(o: &Overrides, d: &ModelDefaults) -> Result<Option<LateGuidance>> {
    let scale = o.cfg_late.or(d.cfg_late.map(|l| l.scale));
    let below = o
        .cfg_late_below
        .or(d.cfg_late.map(|l| l.below))
        .unwrap_or(0.5);
    if !(below.is_finite() && below > 0.0 && below <= 1.0) {
        bail!("--cfg-late-below {below} must be a noise level in (0, 1]");
    }
    match scale {
        None => Ok(None),
        Some(s) if !s.is_finite() || s < 0.0 => {
            bail!("--cfg-late {s} must be a non-negative number")
        }
        Some(s) => Ok(Some(LateGuidance { scale: s, below })),
    }
}

/// A window or tile `(size, overlap)` in latent units.
pub type Span = (usize, usize);

/// Latent frames of `frames` pixel frames.
fn latent_frames(frames: usize, temporal: usize) -> usize {
    (frames.max(1) - 1) / temporal + 1
}

/// Temporal windows and spatial tiles (in latent units) for a clip of `frames` at `w`×`h`:
/// windows when the clip is longer than the model's window (or `--window` is given), tiles when
/// `--tile` is given or the frame is more than twice the model's native side.
pub fn windows_for(
    rules: &ModelRules,
    o: &Overrides,
    frames: usize,
    w: usize,
    h: usize,
) -> Result<(Option<Span>, Option<Span>)> {
    let d = &rules.defaults;
    let tf = rules.temporal;
    let native = d.window_frames.unwrap_or(d.frames);
    let win_frames = o.window.unwrap_or(native);
    if win_frames == 0 || !(win_frames - 1).is_multiple_of(tf) {
        bail!("--window {win_frames} must be 1 + {tf}·k frames");
    }
    let overlap = o
        .overlap
        .or(d.overlap_frames)
        .unwrap_or((win_frames - 1) / 3);
    if overlap >= win_frames {
        bail!("--overlap {overlap} must be smaller than the window ({win_frames} frames)");
    }
    let window = if o.window.is_some() || frames > win_frames {
        Some((latent_frames(win_frames, tf), overlap.div_ceil(tf)))
    } else {
        None
    };
    let grid_cells = rules.grid / rules.latent_px;
    let tile_px = match o.tile {
        Some(0) => None,
        Some(t) => Some(t),
        None => d.tile_px.filter(|t| w > 2 * t || h > 2 * t),
    };
    let tile = match tile_px {
        Some(t) => {
            if t % rules.grid != 0 || t < 2 * rules.grid {
                bail!(
                    "--tile {t} must be a multiple of {} pixels and at least {}",
                    rules.grid,
                    2 * rules.grid
                );
            }
            let cells = t / rules.latent_px;
            let ov = (cells / 4 / grid_cells).max(1) * grid_cells;
            Some((cells, ov))
        }
        None => None,
    };
    Ok((window, tile))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> ModelRules {
        ModelRules {
            defaults: ModelDefaults::wan2_1(),
            grid: 16,
            temporal: 4,
            latent_px: 8,
            default_shift: 3.0,
        }
    }

    fn o(prompt: &str) -> Overrides {
        Overrides {
            prompt: Some(prompt.into()),
            ..Default::default()
        }
    }

    #[test]
    fn full_hd_is_generated_on_the_grid_and_cropped() {
        let j = resolve_job(
            &rules(),
            &Overrides {
                res: Some("1920x1080".into()),
                ..o("kite")
            },
            0,
            None,
            None,
            1,
        )
        .unwrap();
        assert_eq!((j.width, j.height), (1920, 1080));
        assert_eq!((j.request.width, j.request.height), (1920, 1088));
        assert_eq!(j.crop, (4, 0));
        let j = resolve_job(
            &rules(),
            &Overrides {
                res: Some("1080x1920".into()),
                ..o("kite")
            },
            0,
            None,
            None,
            1,
        )
        .unwrap();
        assert_eq!(
            (j.request.width, j.request.height, j.crop),
            (1088, 1920, (0, 4))
        );
    }

    #[test]
    fn secs_round_up_to_the_frame_rule_and_trim() {
        let j = resolve_job(
            &rules(),
            &Overrides {
                secs: Some(60.0),
                fps: Some(16),
                ..o("kite")
            },
            0,
            None,
            None,
            1,
        )
        .unwrap();
        assert_eq!((j.request.frames, j.write_frames), (961, 960));
        let j = resolve_job(
            &rules(),
            &Overrides {
                secs: Some(2.0),
                fps: Some(24),
                ..o("kite")
            },
            0,
            None,
            None,
            1,
        )
        .unwrap();
        assert_eq!((j.request.frames, j.write_frames), (49, 48));
    }

    #[test]
    fn a_bad_guider_in_sora_json_is_refused_naming_it() {
        let mut r = rules();
        r.defaults.guider = serde_json::from_str(r#"{"kind": "apg", "momentum": 3}"#).unwrap();
        let e = format!(
            "{:#}",
            resolve_job(&r, &o("x"), 0, None, None, 1).unwrap_err()
        );
        assert!(
            e.contains("the model's sora.json \"guider\"") && e.contains("APG momentum 3"),
            "{e}"
        );
        // A flag's guider replaces it.
        let ov = Overrides {
            guider: Some(crate::sched::guidance::Guider::Cfg),
            ..o("x")
        };
        assert!(resolve_job(&r, &ov, 0, None, None, 1).is_ok());
        // FDG's high-band scale defaults to 1 in sora.json as on the command line.
        let fdg: crate::sched::guidance::Guider =
            serde_json::from_str(r#"{"kind": "fdg"}"#).unwrap();
        assert_eq!(fdg, "fdg".parse().unwrap());
        assert_eq!(fdg, crate::sched::guidance::Guider::Fdg { high: 1.0 });
    }

    #[test]
    fn bad_numbers_are_refused_with_the_flag_named() {
        let e = |ov: Overrides| {
            format!(
                "{:#}",
                resolve_job(&rules(), &ov, 0, None, None, 1).unwrap_err()
            )
        };
        assert!(e(Overrides {
            frames: Some(10),
            ..o("x")
        })
        .contains("--frames 10 cannot be honoured"));
        assert!(e(Overrides {
            frames: Some(10),
            ..o("x")
        })
        .contains("nearest: 9 or 13"));
        assert!(e(Overrides {
            secs: Some(0.0),
            ..o("x")
        })
        .contains("--secs 0"));
        assert!(e(Overrides {
            secs: Some(-3.0),
            ..o("x")
        })
        .contains("--secs -3"));
        assert!(e(Overrides {
            steps: Some(0),
            ..o("x")
        })
        .contains("--steps 0"));
        assert!(e(Overrides {
            res: Some("0x480".into()),
            ..o("x")
        })
        .contains("at least 1"));
        assert!(e(Overrides {
            res: Some("100000x100000".into()),
            ..o("x")
        })
        .contains("too large"));
        assert!(e(Overrides {
            res: Some("big".into()),
            ..o("x")
        })
        .contains("WIDTHxHEIGHT"));
        assert!(e(Overrides {
            res: Some("641x480".into()),
            ..o("x")
        })
        .contains("even width and height"));
        assert!(e(o("  ")).contains("prompt is empty"));
        assert!(e(Overrides {
            out: Some("a.gif".into()),
            ..o("x")
        })
        .contains("extension"));
        assert!(e(Overrides {
            out: Some("a.png".into()),
            ..o("x")
        })
        .contains("holds one frame"));
    }

    #[test]
    fn one_frame_defaults_to_png_and_batches_get_numbered_names() {
        let j = resolve_job(
            &rules(),
            &Overrides {
                frames: Some(1),
                ..o("A Red Circle!")
            },
            4,
            Some(7),
            Some(Path::new("out")),
            9,
        )
        .unwrap();
        assert_eq!(j.kind, OutputKind::Png);
        assert_eq!(j.out, PathBuf::from("out/005-a-red-circle.png"));
        assert_eq!(j.request.seed, 9);
    }

    #[test]
    fn item_overrides_replace_flags_and_frames_replace_secs() {
        let base = Overrides {
            secs: Some(3.0),
            seed: Some(1),
            ..Default::default()
        };
        let m = base.merged(&Overrides {
            frames: Some(5),
            ..o("x")
        });
        assert_eq!((m.frames, m.secs, m.seed), (Some(5), None, Some(1)));
    }
}
