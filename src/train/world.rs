//! The synthetic world the tiny model is trained on: one or two coloured shapes sliding in a
//! straight line over a plain background, rendered anti-aliased, with paraphrased captions.
//!
//! Everything is a pure, deterministic function of an RNG seed, so a training clip can be
//! regenerated on demand instead of stored. Some (colour, shape, motion) combinations are held
//! out of training ([`HELD_OUT`]) to measure compositional generalisation.

use candle_core::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::video::RgbFrame;

/// Object colours: saturated and far apart in RGB (closest pair, yellow–orange, ≈ 109 apart),
/// chosen so that anti-aliased blends with any background stay nearer their own colour than
/// any other object colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    White,
    Purple,
    Orange,
    Cyan,
}

impl Color {
    pub const ALL: [Color; 8] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::White,
        Color::Purple,
        Color::Orange,
        Color::Cyan,
    ];

    /// The lowercase caption word.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::White => "white",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::Cyan => "cyan",
        }
    }

    /// The rendered sRGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [225, 25, 50],
            Color::Green => [40, 200, 60],
            Color::Blue => [50, 90, 240],
            Color::Yellow => [240, 240, 60],
            Color::White => [245, 245, 245],
            Color::Purple => [160, 60, 220],
            Color::Orange => [255, 150, 0],
            Color::Cyan => [40, 220, 230],
        }
    }
}

/// Object shapes, each filling a `size × size` box: a disc, a square, and an upward-pointing
/// isosceles triangle (base = height = size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The lowercase caption word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// Whether the point `(dx, dy)` relative to the centre lies inside a shape of side `size`
    /// (image coordinates: y grows downwards).
    fn contains(self, dx: f32, dy: f32, size: f32) -> bool {
        let h = size * 0.5;
        match self {
            Shape::Circle => dx * dx + dy * dy <= h * h,
            Shape::Square => dx.abs() <= h && dy.abs() <= h,
            Shape::Triangle => {
                let from_apex = dy + h;
                (0.0..=size).contains(&from_apex) && dx.abs() <= from_apex * 0.5
            }
        }
    }
}

/// Straight-line motion at constant speed, in image directions (up = towards row 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Motion {
    Left,
    Right,
    Up,
    Down,
}

impl Motion {
    pub const ALL: [Motion; 4] = [Motion::Left, Motion::Right, Motion::Up, Motion::Down];

    /// The lowercase caption word.
    pub fn name(self) -> &'static str {
        match self {
            Motion::Left => "left",
            Motion::Right => "right",
            Motion::Up => "up",
            Motion::Down => "down",
        }
    }

    /// Unit direction `(dx, dy)` in pixel coordinates (y down).
    pub fn direction(self) -> (f32, f32) {
        match self {
            Motion::Left => (-1.0, 0.0),
            Motion::Right => (1.0, 0.0),
            Motion::Up => (0.0, -1.0),
            Motion::Down => (0.0, 1.0),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Plain backgrounds, dark and unsaturated so no object colour is near any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    Black,
    Gray,
    Navy,
}

impl Background {
    pub const ALL: [Background; 3] = [Background::Black, Background::Gray, Background::Navy];

    /// The lowercase caption word.
    pub fn name(self) -> &'static str {
        match self {
            Background::Black => "black",
            Background::Gray => "gray",
            Background::Navy => "navy",
        }
    }

    /// The rendered sRGB value.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::Black => [0, 0, 0],
            Background::Gray => [90, 90, 90],
            Background::Navy => [20, 20, 70],
        }
    }
}

/// (colour, shape, motion) combinations never shown in training. Each colour appears once and
/// each shape and motion one to three times, so every colour, shape and motion still occurs
/// in training in other combinations: only these pairings are new at evaluation time.
pub const HELD_OUT: &[(Color, Shape, Motion)] = &[
    (Color::Red, Shape::Triangle, Motion::Up),
    (Color::Green, Shape::Circle, Motion::Left),
    (Color::Blue, Shape::Square, Motion::Down),
    (Color::Yellow, Shape::Triangle, Motion::Right),
    (Color::White, Shape::Circle, Motion::Up),
    (Color::Purple, Shape::Square, Motion::Left),
    (Color::Orange, Shape::Circle, Motion::Down),
    (Color::Cyan, Shape::Triangle, Motion::Left),
];

/// Whether a (colour, shape, motion) triple is in [`HELD_OUT`].
pub fn is_held_out(color: Color, shape: Shape, motion: Motion) -> bool {
    HELD_OUT.contains(&(color, shape, motion))
}

/// Which part of the world to sample from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// Every object's triple avoids [`HELD_OUT`]; one or two objects.
    Train,
    /// One object whose triple is drawn from [`HELD_OUT`].
    HeldOut,
}

/// One moving shape. Positions are in pixels, pixel `x` covering `[x, x + 1)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub motion: Motion,
    /// Side of the shape's bounding box.
    pub size_px: f32,
    /// Centre at frame 0.
    pub start: (f32, f32),
    pub speed_px_per_frame: f32,
}

impl Object {
    /// Centre at frame `t` (linear motion at constant speed).
    pub fn center_at(&self, t: usize) -> (f32, f32) {
        let (dx, dy) = self.motion.direction();
        let s = self.speed_px_per_frame * t as f32;
        (self.start.0 + dx * s, self.start.1 + dy * s)
    }

    /// `(x0, y0, x1, y1)` bounding box at frame `t`.
    pub fn bbox_at(&self, t: usize) -> (f32, f32, f32, f32) {
        let (cx, cy) = self.center_at(t);
        let h = self.size_px * 0.5;
        (cx - h, cy - h, cx + h, cy + h)
    }

    /// The object's (colour, shape, motion) triple.
    pub fn triple(&self) -> (Color, Shape, Motion) {
        (self.color, self.shape, self.motion)
    }
}

/// A clip's content: one or two objects (drawn in order, later on top) over a background.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<Object>,
    pub background: Background,
}

/// Fraction of `min(width, height)` taken by an object's side.
const SIZE_RANGE: (f32, f32) = (0.30, 0.40);
/// Distance travelled over the clip, as a fraction of the frame side along the motion.
const TRAVEL_RANGE: (f32, f32) = (0.35, 0.50);
/// Gap kept between an object's box and the frame edge, in pixels.
const EDGE_MARGIN: f32 = 1.0;
/// Probability of a second object in [`Split::Train`].
const SECOND_OBJECT_P: f64 = 0.3;
/// Placement attempts for a second object whose path does not overlap the first.
const PLACEMENT_TRIES: usize = 64;

fn uniform(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        0.5 * (lo + hi)
    }
}

fn pick<T: Copy>(rng: &mut impl Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// Places an object so it stays fully inside the frame for all `frames` while travelling
/// 35–50% of the frame along its motion (less only when the frame is too small for that).
fn place_object(
    rng: &mut impl Rng,
    (color, shape, motion): (Color, Shape, Motion),
    width: usize,
    height: usize,
    frames: usize,
) -> Object {
    let (w, h) = (width as f32, height as f32);
    let size = w.min(h) * uniform(rng, SIZE_RANGE.0, SIZE_RANGE.1);
    let half = size * 0.5;
    let horizontal = matches!(motion, Motion::Left | Motion::Right);
    let (along, across) = if horizontal { (w, h) } else { (h, w) };
    let room = (along - size - 2.0 * EDGE_MARGIN).max(0.0);
    let travel = (along * uniform(rng, TRAVEL_RANGE.0, TRAVEL_RANGE.1)).min(room);
    let lo = half + EDGE_MARGIN;
    let positive = matches!(motion, Motion::Right | Motion::Down);
    let a0 = if positive {
        uniform(rng, lo, along - lo - travel)
    } else {
        uniform(rng, lo + travel, along - lo)
    };
    let c0 = uniform(rng, lo, across - lo);
    let start = if horizontal { (a0, c0) } else { (c0, a0) };
    Object {
        shape,
        color,
        motion,
        size_px: size,
        start,
        speed_px_per_frame: travel / frames.saturating_sub(1).max(1) as f32,
    }
}

/// Smallest gap (pixels, negative = overlap) between the two objects' boxes over the clip.
fn min_gap(a: &Object, b: &Object, frames: usize) -> f32 {
    (0..frames.max(1))
        .map(|t| {
            let (ax, ay) = a.center_at(t);
            let (bx, by) = b.center_at(t);
            let reach = 0.5 * (a.size_px + b.size_px);
            ((ax - bx).abs() - reach).max((ay - by).abs() - reach)
        })
        .fold(f32::INFINITY, f32::min)
}

fn sample_train_triple(rng: &mut impl Rng, avoid: Option<Color>) -> (Color, Shape, Motion) {
    loop {
        let c = pick(rng, &Color::ALL);
        let s = pick(rng, &Shape::ALL);
        let m = pick(rng, &Motion::ALL);
        if Some(c) != avoid && !is_held_out(c, s, m) {
            return (c, s, m);
        }
    }
}

impl Scene {
    /// Samples a scene for a `width × height`, `frames`-long clip. `Train`: one object, or two
    /// (p = 0.3) of different colours on non-overlapping paths where feasible, no triple in
    /// [`HELD_OUT`]. `HeldOut`: one object with a [`HELD_OUT`] triple.
    pub fn sample(
        rng: &mut impl Rng,
        width: usize,
        height: usize,
        frames: usize,
        split: Split,
    ) -> Scene {
        let background = pick(rng, &Background::ALL);
        let objects = match split {
            Split::HeldOut => {
                let triple = pick(rng, HELD_OUT);
                vec![place_object(rng, triple, width, height, frames)]
            }
            Split::Train => {
                let first_triple = sample_train_triple(rng, None);
                let first = place_object(rng, first_triple, width, height, frames);
                if rng.random_bool(SECOND_OBJECT_P) {
                    // Place both objects jointly: the first one's position often leaves no
                    // room for a second non-overlapping path.
                    let mut triple = sample_train_triple(rng, Some(first.color));
                    let mut best = (
                        first.clone(),
                        place_object(rng, triple, width, height, frames),
                    );
                    let mut best_gap = min_gap(&best.0, &best.1, frames);
                    for attempt in 1..PLACEMENT_TRIES {
                        if best_gap >= 1.0 {
                            break;
                        }
                        // Some motion pairs cannot avoid each other in a small frame: after a
                        // few failures, try another second triple.
                        if attempt % 8 == 0 {
                            triple = sample_train_triple(rng, Some(first.color));
                        }
                        let a = place_object(rng, first_triple, width, height, frames);
                        let b = place_object(rng, triple, width, height, frames);
                        let gap = min_gap(&a, &b, frames);
                        if gap > best_gap {
                            best = (a, b);
                            best_gap = gap;
                        }
                    }
                    vec![best.0, best.1]
                } else {
                    vec![first]
                }
            }
        };
        Scene {
            objects,
            background,
        }
    }
}

/// A deterministic single-object scene: size 0.35 of the short side, travelling 45% of the
/// frame along its motion, path centred in the frame. For fixed prompts and examples.
pub fn single_object_scene(
    (color, shape, motion): (Color, Shape, Motion),
    background: Background,
    width: usize,
    height: usize,
    frames: usize,
) -> Scene {
    let (w, h) = (width as f32, height as f32);
    let size = 0.35 * w.min(h);
    let along = if matches!(motion, Motion::Left | Motion::Right) {
        w
    } else {
        h
    };
    let travel = (0.45 * along).min((along - size - 2.0 * EDGE_MARGIN).max(0.0));
    let (dx, dy) = motion.direction();
    let start = (0.5 * w - 0.5 * travel * dx, 0.5 * h - 0.5 * travel * dy);
    Scene {
        objects: vec![Object {
            shape,
            color,
            motion,
            size_px: size,
            start,
            speed_px_per_frame: travel / frames.saturating_sub(1).max(1) as f32,
        }],
        background,
    }
}

/// A single-object scene with the given triple placed at random as training scenes are
/// (size, start and travel drawn from `rng`).
pub fn random_single_object_scene(
    rng: &mut impl Rng,
    triple: (Color, Shape, Motion),
    background: Background,
    width: usize,
    height: usize,
    frames: usize,
) -> Scene {
    Scene {
        objects: vec![place_object(rng, triple, width, height, frames)],
        background,
    }
}

/// Supersampling factor per axis for anti-aliasing (16 samples per edge pixel).
const SS: usize = 4;

/// Draws frame `t` into `buf` (packed RGB24, `height * width * 3`).
fn draw_frame(scene: &Scene, width: usize, height: usize, t: usize, buf: &mut [u8]) {
    let bg = scene.background.rgb();
    for px in buf.chunks_exact_mut(3) {
        px.copy_from_slice(&bg);
    }
    let inv = 1.0 / (SS * SS) as f32;
    for obj in &scene.objects {
        let (cx, cy) = obj.center_at(t);
        let (x0, y0, x1, y1) = obj.bbox_at(t);
        let xa = (x0.floor().max(0.0)) as usize;
        let ya = (y0.floor().max(0.0)) as usize;
        let xb = (x1.ceil().max(0.0) as usize).min(width);
        let yb = (y1.ceil().max(0.0) as usize).min(height);
        let col = obj.color.rgb().map(f32::from);
        for y in ya..yb {
            for x in xa..xb {
                let mut hits = 0usize;
                for sy in 0..SS {
                    let dy = y as f32 + (sy as f32 + 0.5) / SS as f32 - cy;
                    for sx in 0..SS {
                        let dx = x as f32 + (sx as f32 + 0.5) / SS as f32 - cx;
                        hits += usize::from(obj.shape.contains(dx, dy, obj.size_px));
                    }
                }
                if hits == 0 {
                    continue;
                }
                let a = hits as f32 * inv;
                let i = (y * width + x) * 3;
                for c in 0..3 {
                    let v = f32::from(buf[i + c]) * (1.0 - a) + col[c] * a;
                    buf[i + c] = v.round().clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

/// Frame `t` as packed RGB24 (`height * width * 3` bytes, row-major).
pub fn render_rgb(scene: &Scene, width: usize, height: usize, t: usize) -> Vec<u8> {
    let mut buf = vec![0u8; width * height * 3];
    draw_frame(scene, width, height, t, &mut buf);
    buf
}

/// All `frames` frames of the clip as [`RgbFrame`]s.
pub fn render_frames(scene: &Scene, width: usize, height: usize, frames: usize) -> Vec<RgbFrame> {
    (0..frames)
        .map(|t| RgbFrame {
            width,
            height,
            data: render_rgb(scene, width, height, t),
        })
        .collect()
}

/// The clip as a flat `[3, F, H, W]` f32 buffer in [-1, 1] (`v / 127.5 - 1` of the 8-bit
/// frames, so it matches [`render_frames`] exactly). Convenient for assembling batches.
pub fn render_clip_f32(scene: &Scene, width: usize, height: usize, frames: usize) -> Vec<f32> {
    let plane = width * height;
    let mut out = vec![0f32; 3 * frames * plane];
    let mut buf = vec![0u8; plane * 3];
    for t in 0..frames {
        draw_frame(scene, width, height, t, &mut buf);
        for (p, px) in buf.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[(c * frames + t) * plane + p] = f32::from(px[c]) / 127.5 - 1.0;
            }
        }
    }
    out
}

/// The clip as a `[3, F, H, W]` f32 tensor in [-1, 1] on `device` (the VAE's input layout
/// without the batch axis).
pub fn render_tensor(
    scene: &Scene,
    width: usize,
    height: usize,
    frames: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let data = render_clip_f32(scene, width, height, frames);
    Tensor::from_vec(data, (3, frames, height, width), device)
}

/// Motion verb phrases, one row per paraphrase style, columns in [`Motion::ALL`] order.
const MOTION_PHRASES: [[&str; 4]; 5] = [
    ["moving left", "moving right", "moving up", "moving down"],
    [
        "moves to the left",
        "moves to the right",
        "moves up",
        "moves down",
    ],
    [
        "sliding left",
        "sliding right",
        "sliding up",
        "sliding down",
    ],
    [
        "going to the left",
        "going to the right",
        "going up",
        "going down",
    ],
    [
        "heading left",
        "heading right",
        "heading up",
        "heading down",
    ],
];

/// Background phrases appended to the object phrases; `{}` is the background word.
const BACKGROUND_PHRASES: [&str; 5] = [
    " on a {} background",
    " over a {} background",
    " against a {} backdrop",
    ", {} background",
    " in front of a {} backdrop",
];

/// Other words the grammar produces.
const CONNECTIVES: [&str; 3] = ["a", "an", "and"];

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// Builds a caption in a given style: `articles` prefixes each object with a/an, `verb`
/// indexes [`MOTION_PHRASES`], `bg` indexes [`BACKGROUND_PHRASES`].
fn compose(scene: &Scene, articles: bool, verb: usize, bg: usize) -> String {
    let objects: Vec<String> = scene
        .objects
        .iter()
        .map(|o| {
            let phrase = format!(
                "{} {} {}",
                o.color.name(),
                o.shape.name(),
                MOTION_PHRASES[verb][o.motion.index()]
            );
            if articles {
                format!("{} {phrase}", article(o.color.name()))
            } else {
                phrase
            }
        })
        .collect();
    let bg_phrase = BACKGROUND_PHRASES[bg].replace("{}", scene.background.name());
    format!("{}{bg_phrase}", objects.join(" and "))
}

/// The canonical caption, e.g. "a red circle moving right on a black background" or "a red
/// circle moving right and a blue square moving up on a gray background".
pub fn canonical_caption(scene: &Scene) -> String {
    compose(scene, true, 0, 0)
}

/// A random paraphrase of the scene's description (verb, background phrase and articles vary;
/// objects are always described in order, so the first named object is `objects[0]`).
pub fn caption(scene: &Scene, rng: &mut impl Rng) -> String {
    let articles = rng.random_bool(0.75);
    let verb = rng.random_range(0..MOTION_PHRASES.len());
    let bg = rng.random_range(0..BACKGROUND_PHRASES.len());
    compose(scene, articles, verb, bg)
}

/// Every caption the grammar can produce for `scene` (for exhaustive tests).
pub fn all_captions(scene: &Scene) -> Vec<String> {
    let mut out = Vec::new();
    for articles in [true, false] {
        for verb in 0..MOTION_PHRASES.len() {
            for bg in 0..BACKGROUND_PHRASES.len() {
                out.push(compose(scene, articles, verb, bg));
            }
        }
    }
    out
}

/// Splits text the way the tokenizer's pre-tokenizer does: on whitespace, with each
/// punctuation character a word of its own. Lowercases.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for chunk in text.split_whitespace() {
        let mut cur = String::new();
        for ch in chunk.chars() {
            if ch.is_ascii_punctuation() {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(ch.to_string());
            } else {
                cur.extend(ch.to_lowercase());
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

/// Every word (and the punctuation token ",") any caption can contain, sorted and
/// deduplicated: the tokenizer's vocabulary after the special tokens.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    v.extend(Color::ALL.iter().map(|c| c.name().to_string()));
    v.extend(Shape::ALL.iter().map(|s| s.name().to_string()));
    v.extend(Motion::ALL.iter().map(|m| m.name().to_string()));
    v.extend(Background::ALL.iter().map(|b| b.name().to_string()));
    v.extend(CONNECTIVES.iter().map(|w| w.to_string()));
    for row in MOTION_PHRASES {
        for phrase in row {
            v.extend(words(phrase));
        }
    }
    for phrase in BACKGROUND_PHRASES {
        v.extend(words(&phrase.replace("{}", "")));
    }
    v.sort();
    v.dedup();
    v
}

/// What a prompt asks for about its first object (and the background, when named).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParsedPrompt {
    pub color: Color,
    pub shape: Shape,
    pub motion: Motion,
    pub background: Option<Background>,
}

fn color_word(w: &str) -> Option<Color> {
    Color::ALL.into_iter().find(|c| c.name() == w)
}

fn shape_word(w: &str) -> Option<Shape> {
    match w {
        "circle" | "disc" | "disk" | "ball" | "dot" => Some(Shape::Circle),
        "square" | "box" | "block" => Some(Shape::Square),
        "triangle" => Some(Shape::Triangle),
        _ => None,
    }
}

fn motion_word(w: &str) -> Option<Motion> {
    match w {
        "left" | "leftward" | "leftwards" => Some(Motion::Left),
        "right" | "rightward" | "rightwards" => Some(Motion::Right),
        "up" | "upward" | "upwards" => Some(Motion::Up),
        "down" | "downward" | "downwards" => Some(Motion::Down),
        _ => None,
    }
}

fn background_word(w: &str) -> Option<Background> {
    match w {
        "black" => Some(Background::Black),
        "gray" | "grey" => Some(Background::Gray),
        "navy" => Some(Background::Navy),
        _ => None,
    }
}

/// Extracts the first object's colour, shape and motion (and the background, if named) from
/// a caption or a free-form prompt like "a red circle moving right". The shape is the first
/// shape word after the colour and the motion the first direction word after the shape
/// (falling back to the first anywhere), so in two-object captions the first object wins.
/// `None` when colour, shape or motion is missing.
pub fn parse_prompt(prompt: &str) -> Option<ParsedPrompt> {
    let ws = words(prompt);
    let find = |from: usize, f: &dyn Fn(&str) -> bool| -> Option<usize> {
        (from..ws.len())
            .find(|&i| f(&ws[i]))
            .or_else(|| (0..ws.len()).find(|&i| f(&ws[i])))
    };
    let ci = find(0, &|w| color_word(w).is_some())?;
    let si = find(ci, &|w| shape_word(w).is_some())?;
    let mi = find(si, &|w| motion_word(w).is_some())?;
    Some(ParsedPrompt {
        color: color_word(&ws[ci])?,
        shape: shape_word(&ws[si])?,
        motion: motion_word(&ws[mi])?,
        background: ws.iter().find_map(|w| background_word(w)),
    })
}
