//! Prompt-following scorer for generated clips of the synthetic world: is the asked colour
//! there, is its blob the asked shape, and does it move the asked way? Works on decoded 8-bit
//! frames and tolerates blur and noise, so it can judge a small model's imperfect output.

use rand::Rng;

use super::world::{
    canonical_caption, is_held_out, single_object_scene, Background, Color, Motion, ParsedPrompt,
    Shape, Split, HELD_OUT,
};
use crate::video::RgbFrame;

/// A pixel belongs to the asked colour when that colour is its nearest palette entry (object
/// colours and backgrounds) and it is within this RGB distance of it.
pub const COLOR_DISTANCE: f32 = 110.0;
/// The asked colour is present when its largest blob covers at least this fraction of the
/// frame (median over the middle half of the clip). A 0.3-size triangle covers ≈ 4.5%.
pub const MIN_COVERAGE: f32 = 0.015;
/// A blob covering more than this fraction of the frame is not an object (objects cover at
/// most ≈ 16%): a frame flooded with the asked colour gets no shape credit.
pub const MAX_OBJECT_COVERAGE: f32 = 0.3;
/// Minimum centroid displacement between the first and last thirds of the clip, as a
/// fraction of the frame side along the motion.
pub const MIN_DISPLACEMENT: f32 = 0.08;

/// Per-criterion verdicts for one clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Score {
    pub color_present: bool,
    /// The asked-colour blob is object-sized and has the asked shape (false when the colour
    /// is absent).
    pub shape_correct: bool,
    /// The asked-colour blob moves the asked way (false when the colour is absent).
    pub motion_correct: bool,
    /// The shape asked for and the shape the asked-colour blob has (None: no object-sized
    /// blob of that colour, or no majority shape over its frames), for the suite's confusion
    /// table.
    pub asked_shape: Option<Shape>,
    pub seen_shape: Option<Shape>,
}

impl Score {
    /// All three criteria hold.
    pub fn all(&self) -> bool {
        self.color_present && self.shape_correct && self.motion_correct
    }
}

/// Fractions of a suite's clips passing each criterion.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SuiteSummary {
    pub n: usize,
    pub color: f32,
    pub shape: f32,
    pub motion: f32,
    pub all: f32,
    /// Shape confusion: `shapes[asked][seen]` counts clips asking for `Shape::ALL[asked]` whose
    /// blob was `Shape::ALL[seen]`, or (seen = 3) no object-sized blob of the asked colour or
    /// no majority shape.
    pub shapes: [[usize; 4]; 3],
}

/// Measurements behind a [`Score`], for diagnostics.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipAnalysis {
    /// Median (over the middle half of the clip) fraction of the frame covered by the largest
    /// blob of the asked colour.
    pub coverage: f32,
    /// Majority shape over frames where the blob is present.
    pub shape: Option<Shape>,
    /// Blob centroid shift from the first to the last third of the clip, `(dx / width,
    /// dy / height)`, y down.
    pub displacement: Option<(f32, f32)>,
    /// What the shape classifier measured, each the median over the frames where the blob is
    /// present (None: never present).
    pub features: Option<ShapeFeatures>,
}

/// The measurements the shape classifier compares with [`SHAPE_PROTOTYPES`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeFeatures {
    /// Fraction of the bounding box the blob fills (disc π/4, square 1, triangle 1/2).
    pub fill: f32,
    /// Centroid drop below the box centre as a fraction of the box height (triangle 1/6).
    pub drop: f32,
    /// Mean coverage of the two top, and of the two bottom, corner cells (thirds × thirds).
    pub top_corners: f32,
    pub bottom_corners: f32,
}

impl ShapeFeatures {
    fn to_array(self) -> [f32; 4] {
        [self.fill, self.drop, self.top_corners, self.bottom_corners]
    }
}

/// The largest 4-connected blob of a binary mask.
#[derive(Debug, Clone)]
struct Blob {
    count: usize,
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
    cx: f32,
    cy: f32,
    /// Fraction of the top-left, top-right, bottom-left and bottom-right thirds×thirds cells
    /// of the bounding box that the blob covers.
    corners: [f32; 4],
}

/// Every palette entry a pixel may be attributed to: object colours, then backgrounds.
fn palette() -> [[i32; 3]; Color::ALL.len() + Background::ALL.len()] {
    let mut out = [[0i32; 3]; Color::ALL.len() + Background::ALL.len()];
    let rgbs = Color::ALL
        .iter()
        .map(|c| c.rgb())
        .chain(Background::ALL.iter().map(|b| b.rgb()));
    for (o, c) in out.iter_mut().zip(rgbs) {
        *o = c.map(i32::from);
    }
    out
}

fn dist2(p: &[u8], c: [i32; 3]) -> i32 {
    let d0 = i32::from(p[0]) - c[0];
    let d1 = i32::from(p[1]) - c[1];
    let d2 = i32::from(p[2]) - c[2];
    d0 * d0 + d1 * d1 + d2 * d2
}

/// Mask of pixels attributed to `color` (see [`COLOR_DISTANCE`]).
fn color_mask(frame: &RgbFrame, color: Color) -> Vec<bool> {
    let target = color.rgb().map(i32::from);
    let pal = palette();
    let t2 = (COLOR_DISTANCE * COLOR_DISTANCE) as i32;
    frame
        .data
        .chunks_exact(3)
        .map(|p| {
            let d = dist2(p, target);
            d <= t2 && pal.iter().all(|o| *o == target || dist2(p, *o) > d)
        })
        .collect()
}

/// Largest 4-connected component of `mask` (`height × width`, row-major).
fn largest_blob(mask: &[bool], width: usize, height: usize) -> Option<Blob> {
    let mut seen = vec![false; mask.len()];
    let mut stack = Vec::new();
    let mut best: Option<Blob> = None;
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut b = Blob {
            count: 0,
            x0: usize::MAX,
            y0: usize::MAX,
            x1: 0,
            y1: 0,
            cx: 0.0,
            cy: 0.0,
            corners: [0.0; 4],
        };
        let (mut sx, mut sy) = (0f64, 0f64);
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            pixels.push(i);
            b.count += 1;
            sx += x as f64;
            sy += y as f64;
            b.x0 = b.x0.min(x);
            b.x1 = b.x1.max(x);
            b.y0 = b.y0.min(y);
            b.y1 = b.y1.max(y);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - width);
            }
            if y + 1 < height {
                visit(i + width);
            }
        }
        b.cx = (sx / b.count as f64) as f32 + 0.5;
        b.cy = (sy / b.count as f64) as f32 + 0.5;
        if best.as_ref().is_none_or(|o| b.count > o.count) {
            b.corners = corner_coverage(&b, &pixels, width);
            best = Some(b);
        }
    }
    best
}

/// Coverage of the four corner cells (the bounding box cut in thirds each way) by the blob's
/// `pixels` (indices into a `width`-wide frame), each pixel counted by its overlap with a cell.
fn corner_coverage(b: &Blob, pixels: &[usize], width: usize) -> [f32; 4] {
    let w = (b.x1 - b.x0 + 1) as f32;
    let h = (b.y1 - b.y0 + 1) as f32;
    let overlap = |p: f32, lo: f32, hi: f32| ((p + 1.0).min(hi) - p.max(lo)).max(0.0);
    let mut c = [0f32; 4];
    for &i in pixels {
        let x = (i % width - b.x0) as f32;
        let y = (i / width - b.y0) as f32;
        let (l, r) = (overlap(x, 0.0, w / 3.0), overlap(x, 2.0 * w / 3.0, w));
        let (t, d) = (overlap(y, 0.0, h / 3.0), overlap(y, 2.0 * h / 3.0, h));
        c[0] += l * t;
        c[1] += r * t;
        c[2] += l * d;
        c[3] += r * d;
    }
    c.map(|v| v / (w * h / 9.0))
}

/// Shape prototypes: (fill of the bounding box, centroid drop below the box centre as a
/// fraction of its height, top-corner coverage, bottom-corner coverage). Fill and drop are the
/// ideal shapes' (π/4, 1 and 1/2; 0, 0 and 1/6); corner coverages were measured on
/// anti-aliased renders of the world's sizes (a disc covers 55% of each corner cell, an
/// upward triangle none of the top ones and 80% of the bottom ones). The corners keep a
/// decoder's rounded squares and triangles apart from circles, which fill alone does not.
const SHAPE_PROTOTYPES: [(Shape, [f32; 4]); 3] = [
    (
        Shape::Circle,
        [std::f32::consts::FRAC_PI_4, 0.0, 0.55, 0.56],
    ),
    (Shape::Square, [1.0, 0.0, 1.0, 1.0]),
    (Shape::Triangle, [0.53, 1.0 / 6.0, 0.0, 0.8]),
];

/// A blob's [`ShapeFeatures`].
fn shape_features(b: &Blob) -> ShapeFeatures {
    let w = (b.x1 - b.x0 + 1) as f32;
    let h = (b.y1 - b.y0 + 1) as f32;
    let box_cy = 0.5 * (b.y0 + b.y1 + 1) as f32;
    ShapeFeatures {
        fill: b.count as f32 / (w * h),
        drop: (b.cy - box_cy) / h,
        top_corners: 0.5 * (b.corners[0] + b.corners[1]),
        bottom_corners: 0.5 * (b.corners[2] + b.corners[3]),
    }
}

/// Classifies a blob's features by the nearest prototype in [`SHAPE_PROTOTYPES`] (drop
/// weighted 1.5×).
fn classify(f: ShapeFeatures) -> Shape {
    let f = f.to_array();
    let cost = |p: &[f32; 4]| {
        (f[0] - p[0]).powi(2)
            + (1.5 * (f[1] - p[1])).powi(2)
            + (f[2] - p[2]).powi(2)
            + (f[3] - p[3]).powi(2)
    };
    SHAPE_PROTOTYPES
        .iter()
        .min_by(|a, b| cost(&a.1).total_cmp(&cost(&b.1)))
        .map(|p| p.0)
        .unwrap_or(Shape::Circle)
}

/// The middle value of non-empty `v` (the upper one of the two middles for an even count).
fn upper_median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// Measures the asked colour's blob in every frame: coverage, majority shape, displacement.
pub fn analyze_clip(frames: &[RgbFrame], color: Color) -> ClipAnalysis {
    let blobs: Vec<Option<Blob>> = frames
        .iter()
        .map(|f| largest_blob(&color_mask(f, color), f.width, f.height))
        .collect();
    let n = frames.len();
    if n == 0 {
        return ClipAnalysis {
            coverage: 0.0,
            shape: None,
            displacement: None,
            features: None,
        };
    }
    let area = |i: usize| (frames[i].width * frames[i].height).max(1) as f32;
    let frac = |i: usize| blobs[i].as_ref().map_or(0.0, |b| b.count as f32 / area(i));
    let (m0, m1) = (n / 4, (n - n / 4).max(n / 4 + 1));
    let coverage = upper_median((m0..m1).map(frac).collect());

    let present: Vec<usize> = (0..n).filter(|&i| frac(i) >= 0.5 * MIN_COVERAGE).collect();
    // Each present frame's features, measured once: its vote, then the clip's medians.
    let measured: Vec<ShapeFeatures> = present
        .iter()
        .filter_map(|&i| blobs[i].as_ref().map(shape_features))
        .collect();
    let mut votes = [0usize; 3];
    for f in &measured {
        votes[Shape::ALL
            .iter()
            .position(|s| *s == classify(*f))
            .unwrap_or(0)] += 1;
    }
    let features = (!measured.is_empty()).then(|| {
        let median =
            |pick: fn(&ShapeFeatures) -> f32| upper_median(measured.iter().map(pick).collect());
        ShapeFeatures {
            fill: median(|f| f.fill),
            drop: median(|f| f.drop),
            top_corners: median(|f| f.top_corners),
            bottom_corners: median(|f| f.bottom_corners),
        }
    });
    let top = votes.iter().copied().max().unwrap_or(0);
    let shape = if top > 0 && votes.iter().filter(|&&v| v == top).count() == 1 {
        Shape::ALL
            .iter()
            .zip(votes)
            .find(|(_, v)| *v == top)
            .map(|(s, _)| *s)
    } else {
        None
    };

    let third = (n / 3).max(1);
    let mean_centroid = |range: std::ops::Range<usize>| -> Option<(f32, f32)> {
        let pts: Vec<(f32, f32)> = range
            .filter(|i| present.contains(i))
            .filter_map(|i| {
                blobs[i].as_ref().map(|b| {
                    (
                        b.cx / frames[i].width as f32,
                        b.cy / frames[i].height as f32,
                    )
                })
            })
            .collect();
        if pts.is_empty() {
            return None;
        }
        let k = pts.len() as f32;
        Some((
            pts.iter().map(|p| p.0).sum::<f32>() / k,
            pts.iter().map(|p| p.1).sum::<f32>() / k,
        ))
    };
    let displacement = match (mean_centroid(0..third), mean_centroid(n - third..n)) {
        (Some(a), Some(b)) if n >= 2 => Some((b.0 - a.0, b.1 - a.1)),
        _ => None,
    };
    ClipAnalysis {
        coverage,
        shape,
        displacement,
        features,
    }
}

/// Whether a displacement `(dx, dy)` (fractions of the frame, y down) is a clear move in
/// direction `m`: dominant axis and sign match and the move is at least [`MIN_DISPLACEMENT`].
pub fn motion_matches(displacement: (f32, f32), m: Motion) -> bool {
    let (dx, dy) = displacement;
    let (along, across) = match m {
        Motion::Left => (-dx, dy),
        Motion::Right => (dx, dy),
        Motion::Up => (-dy, dx),
        Motion::Down => (dy, dx),
    };
    along >= MIN_DISPLACEMENT && along > across.abs()
}

/// Scores decoded frames (packed RGB24) against what the prompt asks of its first object.
pub fn score(frames: &[RgbFrame], prompt: &ParsedPrompt) -> Score {
    score_clip(frames, prompt).0
}

/// [`score`] with the measurements behind it.
pub fn score_clip(frames: &[RgbFrame], prompt: &ParsedPrompt) -> (Score, ClipAnalysis) {
    let a = analyze_clip(frames, prompt.color);
    let color_present = a.coverage >= MIN_COVERAGE;
    let object_sized = color_present && a.coverage <= MAX_OBJECT_COVERAGE;
    let s = Score {
        asked_shape: Some(prompt.shape),
        seen_shape: a.shape.filter(|_| object_sized),
        color_present,
        shape_correct: object_sized && a.shape == Some(prompt.shape),
        motion_correct: color_present
            && a.displacement
                .is_some_and(|d| motion_matches(d, prompt.motion)),
    };
    (s, a)
}

/// Fractions of `results` passing each criterion (all zero for an empty suite).
pub fn score_suite(results: &[Score]) -> SuiteSummary {
    let n = results.len();
    let frac = |f: &dyn Fn(&Score) -> bool| {
        if n == 0 {
            0.0
        } else {
            results.iter().filter(|s| f(s)).count() as f32 / n as f32
        }
    };
    let mut shapes = [[0; 4]; 3];
    for s in results {
        if let Some(asked) = s.asked_shape {
            shapes[asked as usize][s.seen_shape.map_or(3, |v| v as usize)] += 1;
        }
    }
    SuiteSummary {
        n,
        shapes,
        color: frac(&|s| s.color_present),
        shape: frac(&|s| s.shape_correct),
        motion: frac(&|s| s.motion_correct),
        all: frac(&|s| s.all()),
    }
}

/// A deterministic evaluation suite of canonical single-object prompts. `Train`: 24 seen
/// triples covering every (colour, shape) pair once, motions and backgrounds rotating.
/// `HeldOut`: each [`HELD_OUT`] triple on two backgrounds (16 prompts).
pub fn prompt_suite(split: Split) -> Vec<String> {
    let mut out = Vec::new();
    match split {
        Split::Train => {
            for i in 0..24 {
                let color = Color::ALL[i % Color::ALL.len()];
                let shape = Shape::ALL[i % Shape::ALL.len()];
                let mut m = (i + i / 8) % Motion::ALL.len();
                while is_held_out(color, shape, Motion::ALL[m]) {
                    m = (m + 1) % Motion::ALL.len();
                }
                let bg = Background::ALL[(i / 2) % Background::ALL.len()];
                out.push(suite_caption((color, shape, Motion::ALL[m]), bg));
            }
        }
        Split::HeldOut => {
            for (i, &triple) in HELD_OUT.iter().enumerate() {
                for k in 0..2 {
                    let bg = Background::ALL[(i + k) % Background::ALL.len()];
                    out.push(suite_caption(triple, bg));
                }
            }
        }
    }
    out
}

fn suite_caption(triple: (Color, Shape, Motion), background: Background) -> String {
    canonical_caption(&single_object_scene(triple, background, 64, 64, 17))
}

/// A 3×3 box blur (edges clamped): the calibration stand-in for a decoder's softness.
pub fn box_blur3(frame: &RgbFrame) -> RgbFrame {
    let (w, h) = (frame.width, frame.height);
    let src = &frame.data;
    // Horizontal 3-tap sums, then vertical 3-tap sums of those, per channel.
    let mut rows = vec![0u16; src.len()];
    for y in 0..h {
        for x in 0..w {
            let (l, r) = (x.saturating_sub(1), (x + 1).min(w - 1));
            for c in 0..3 {
                let at = |xx: usize| u16::from(src[(y * w + xx) * 3 + c]);
                rows[(y * w + x) * 3 + c] = at(l) + at(x) + at(r);
            }
        }
    }
    let mut data = vec![0u8; src.len()];
    let stride = w * 3;
    for y in 0..h {
        let (u, d) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for i in 0..stride {
            let sum = u32::from(rows[u * stride + i])
                + u32::from(rows[y * stride + i])
                + u32::from(rows[d * stride + i]);
            data[y * stride + i] = ((sum + 4) / 9) as u8;
        }
    }
    RgbFrame {
        width: w,
        height: h,
        data,
    }
}

/// Adds independent noise of `-amplitude..=amplitude` levels (uniform up to a negligible
/// modulo bias; `amplitude` ≤ 127) to every channel, clamped to 0–255.
pub fn add_uniform_noise(frame: &RgbFrame, amplitude: u8, rng: &mut impl Rng) -> RgbFrame {
    let a = i16::from(amplitude.min(127));
    let span = (2 * a + 1) as u64;
    let mut data = Vec::with_capacity(frame.data.len());
    for chunk in frame.data.chunks(4) {
        // One 64-bit draw gives four 16-bit uniforms.
        let mut bits: u64 = rng.random();
        for &v in chunk {
            let n = ((bits & 0xffff) % span) as i16 - a;
            bits >>= 16;
            data.push((i16::from(v) + n).clamp(0, 255) as u8);
        }
    }
    RgbFrame {
        width: frame.width,
        height: frame.height,
        data,
    }
}
