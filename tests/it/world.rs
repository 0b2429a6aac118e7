//! The synthetic world: deterministic sampling and rendering, captions that parse back and stay
//! inside the vocabulary, the held-out split, the tokenizer as the inference path loads it, and
//! the prompt-following scorer's calibration on ground-truth and degraded clips.

use std::time::Instant;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sora::models::umt5::Umt5Tokenizer;
use sora::train::eval::{
    add_uniform_noise, box_blur3, prompt_suite, score, score_clip, score_suite, Score,
};
use sora::train::tokenizer::{build_tokenizer, save_tokenizer};
use sora::train::world::{
    all_captions, canonical_caption, caption, is_held_out, parse_prompt, render_clip_f32,
    render_frames, render_tensor, vocabulary, words, Background, Color, Motion, ParsedPrompt,
    Scene, Shape, Split, HELD_OUT,
};
use sora::video::RgbFrame;

const W: usize = 64;
const H: usize = 64;
const F: usize = 17;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn first_prompt(scene: &Scene) -> ParsedPrompt {
    let o = &scene.objects[0];
    ParsedPrompt {
        color: o.color,
        shape: o.shape,
        motion: o.motion,
        background: Some(scene.background),
    }
}

#[test]
fn world_sampling_and_render_are_deterministic() {
    let make = |seed| {
        let mut r = rng(seed);
        let s = Scene::sample(&mut r, W, H, F, Split::Train);
        let c = caption(&s, &mut r);
        (s.clone(), c, render_frames(&s, W, H, F))
    };
    let (s1, c1, f1) = make(42);
    let (s2, c2, f2) = make(42);
    assert_eq!(s1, s2);
    assert_eq!(c1, c2);
    assert_eq!(f1, f2);
    let (s3, _, _) = make(43);
    assert_ne!(s1, s3, "different seeds should give different scenes");

    // The tensor is the same clip, [3, F, H, W] in [-1, 1].
    let t = render_tensor(&s1, W, H, F, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, F, H, W]);
    let flat = render_clip_f32(&s1, W, H, F);
    assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), flat);
    let (t_i, y, x) = (F / 2, 20, 33);
    for c in 0..3 {
        let want = f32::from(f1[t_i].data[(y * W + x) * 3 + c]) / 127.5 - 1.0;
        assert_eq!(flat[((c * F + t_i) * H + y) * W + x], want);
    }
    assert!(flat.iter().all(|v| (-1.0..=1.0).contains(v)));
}

#[test]
fn world_render_is_antialiased_and_fast() {
    let mut r = rng(1);
    let scenes: Vec<Scene> = (0..20)
        .map(|_| Scene::sample(&mut r, W, H, F, Split::Train))
        .collect();
    let t0 = Instant::now();
    for s in &scenes {
        std::hint::black_box(render_clip_f32(s, W, H, F));
    }
    let ms = t0.elapsed().as_secs_f64() * 1000.0 / scenes.len() as f64;
    eprintln!("render: {ms:.2} ms per {F}-frame {W}x{H} clip (test profile)");
    // Edges are blended: some pixels are neither background nor object colour.
    let s = &scenes[0];
    let frame = &render_frames(s, W, H, 1)[0];
    let pure: Vec<[u8; 3]> = s
        .objects
        .iter()
        .map(|o| o.color.rgb())
        .chain([s.background.rgb()])
        .collect();
    let mixed = frame
        .data
        .chunks_exact(3)
        .filter(|p| !pure.iter().any(|c| c[..] == p[..]))
        .count();
    assert!(mixed > 10, "only {mixed} blended edge pixels");
}

#[test]
fn world_captions_parse_back_and_use_the_vocabulary() {
    let vocab = vocabulary();
    let mut sorted = vocab.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(vocab, sorted, "vocabulary must be sorted and deduplicated");
    let mut r = rng(7);
    let mut two = 0;
    for _ in 0..300 {
        let s = Scene::sample(&mut r, W, H, F, Split::Train);
        two += usize::from(s.objects.len() == 2);
        let want = first_prompt(&s);
        let mut caps = all_captions(&s);
        caps.push(caption(&s, &mut r));
        assert_eq!(caps[0], canonical_caption(&s));
        for c in &caps {
            assert_eq!(parse_prompt(c), Some(want), "caption {c:?}");
            for w in words(c) {
                assert!(
                    vocab.binary_search(&w).is_ok(),
                    "{w:?} of {c:?} not in vocabulary"
                );
            }
        }
    }
    assert!(two > 50, "only {two} two-object scenes in 300");

    let s = Scene::sample(&mut rng(3), W, H, F, Split::HeldOut);
    assert!(canonical_caption(&s).ends_with(&format!("on a {} background", s.background.name())));
    assert_eq!(
        parse_prompt("An ORANGE square, moving to the left."),
        Some(ParsedPrompt {
            color: Color::Orange,
            shape: Shape::Square,
            motion: Motion::Left,
            background: None,
        })
    );
    assert_eq!(
        parse_prompt("a red circle moving right").map(|p| (p.color, p.shape, p.motion)),
        Some((Color::Red, Shape::Circle, Motion::Right))
    );
    assert_eq!(
        parse_prompt("cyan triangle sliding up, grey background").and_then(|p| p.background),
        Some(Background::Gray)
    );
    assert_eq!(parse_prompt("a red circle"), None);
    assert_eq!(parse_prompt("a cat moving left"), None);
}

#[test]
fn world_held_out_split() {
    // Only combinations are held out: each colour, shape and motion keeps most of its triples.
    assert!(Color::ALL
        .iter()
        .all(|c| HELD_OUT.iter().filter(|t| t.0 == *c).count() == 1));
    assert!(Shape::ALL
        .iter()
        .all(|s| HELD_OUT.iter().filter(|t| t.1 == *s).count() <= 3));
    assert!(Motion::ALL
        .iter()
        .all(|m| HELD_OUT.iter().filter(|t| t.2 == *m).count() <= 3));
    let mut r = rng(11);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let s = Scene::sample(&mut r, W, H, F, Split::Train);
        for o in &s.objects {
            assert!(!is_held_out(o.color, o.shape, o.motion), "{:?}", o.triple());
            seen.insert(o.triple());
        }
    }
    assert_eq!(
        seen.len(),
        8 * 3 * 4 - HELD_OUT.len(),
        "every other triple is sampled"
    );
    for c in Color::ALL {
        assert!(seen.iter().any(|t| t.0 == c));
    }
    let mut held = std::collections::HashSet::new();
    for _ in 0..200 {
        let s = Scene::sample(&mut r, W, H, F, Split::HeldOut);
        assert_eq!(s.objects.len(), 1);
        assert!(is_held_out(
            s.objects[0].color,
            s.objects[0].shape,
            s.objects[0].motion
        ));
        held.insert(s.objects[0].triple());
    }
    assert_eq!(held.len(), HELD_OUT.len());
}

#[test]
fn world_objects_stay_inside_and_move_visibly() {
    for (w, h) in [(64, 64), (96, 64), (48, 80)] {
        let mut r = rng(5);
        let mut overlapping = 0;
        let mut pairs = 0;
        for i in 0..500 {
            let split = if i % 5 == 0 {
                Split::HeldOut
            } else {
                Split::Train
            };
            let s = Scene::sample(&mut r, w, h, F, split);
            for o in &s.objects {
                let short = w.min(h) as f32;
                assert!((0.3 * short..=0.4 * short).contains(&o.size_px));
                for t in 0..F {
                    let (x0, y0, x1, y1) = o.bbox_at(t);
                    assert!(x0 >= 0.0 && y0 >= 0.0, "{o:?} leaves at frame {t}");
                    assert!(
                        x1 <= w as f32 && y1 <= h as f32,
                        "{o:?} leaves at frame {t}"
                    );
                }
                let along = match o.motion {
                    Motion::Left | Motion::Right => w,
                    Motion::Up | Motion::Down => h,
                } as f32;
                let travel = o.speed_px_per_frame * (F - 1) as f32;
                assert!(
                    travel >= 0.35 * along - 1e-3 && travel <= 0.5 * along + 1e-3,
                    "travel {travel} of {along}"
                );
            }
            if let [a, b] = &s.objects[..] {
                assert_ne!(a.color, b.color);
                pairs += 1;
                let hit = (0..F).any(|t| {
                    let (ax, ay) = a.center_at(t);
                    let (bx, by) = b.center_at(t);
                    let reach = 0.5 * (a.size_px + b.size_px);
                    (ax - bx).abs() < reach && (ay - by).abs() < reach
                });
                overlapping += usize::from(hit);
            }
        }
        eprintln!("{w}x{h}: {overlapping} of {pairs} two-object scenes overlap at some frame");
        assert!(overlapping * 10 <= pairs, "too many overlapping paths");
    }
}

#[test]
fn world_tokenizer_loads_as_umt5_tokenizer() {
    let vocab = vocabulary();
    let tok = build_tokenizer(&vocab).unwrap();
    assert_eq!(tok.get_vocab_size(true), vocab.len() + 3);
    let dir = std::env::temp_dir().join(format!("sora-world-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = save_tokenizer(&tok, &dir.join("tokenizer.json")).unwrap();
    assert!(dir.join("tokenizer_config.json").is_file());

    let t = Umt5Tokenizer::from_file(&path).unwrap();
    assert_eq!(t.pad_id(), 0);
    let id = |w: &str| 3 + vocab.iter().position(|v| v == w).unwrap() as u32;
    let (ids, mask) = t.encode_padded(&["a red circle moving right"], 16).unwrap();
    let mut want: Vec<u32> = ["a", "red", "circle", "moving", "right"]
        .iter()
        .map(|w| id(w))
        .collect();
    want.push(1);
    want.resize(16, 0);
    assert_eq!(ids[0], want);
    assert_eq!(mask[0].iter().sum::<u32>(), 6);

    // Case and punctuation are normalised; unknown words map to <unk> (2).
    let (ids, _) = t
        .encode_padded(&["A Red circle, moving LEFT zebra"], 10)
        .unwrap();
    assert_eq!(
        ids[0],
        vec![
            id("a"),
            id("red"),
            id("circle"),
            id(","),
            id("moving"),
            id("left"),
            2,
            1,
            0,
            0
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn world_prompt_suites() {
    let seen = prompt_suite(Split::Train);
    assert_eq!(seen.len(), 24);
    let mut pairs = std::collections::HashSet::new();
    for p in &seen {
        let q = parse_prompt(p).unwrap();
        assert!(!is_held_out(q.color, q.shape, q.motion), "{p}");
        assert!(q.background.is_some());
        pairs.insert((q.color, q.shape));
    }
    assert_eq!(pairs.len(), 24, "every (colour, shape) pair once");
    let held = prompt_suite(Split::HeldOut);
    assert_eq!(held.len(), 2 * HELD_OUT.len());
    for p in &held {
        let q = parse_prompt(p).unwrap();
        assert!(is_held_out(q.color, q.shape, q.motion), "{p}");
    }
    assert_eq!(prompt_suite(Split::Train), seen, "deterministic");
}

/// Counts of passing criteria over a condition.
#[derive(Default)]
struct Tally {
    n: usize,
    color: usize,
    shape: usize,
    motion: usize,
}

impl Tally {
    fn add(&mut self, s: Score) {
        self.n += 1;
        self.color += usize::from(s.color_present);
        self.shape += usize::from(s.shape_correct);
        self.motion += usize::from(s.motion_correct);
    }
    fn rate(&self, k: usize) -> f64 {
        k as f64 / self.n as f64
    }
}

fn other<T: Copy + PartialEq>(rng: &mut impl Rng, all: &[T], not: &[T]) -> T {
    loop {
        let v = all[rng.random_range(0..all.len())];
        if !not.contains(&v) {
            return v;
        }
    }
}

#[test]
fn world_scorer_calibration() {
    let t0 = Instant::now();
    let mut r = rng(2024);
    let mut truth = [
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    ];
    let (mut wrong_color, mut wrong_shape, mut wrong_motion) =
        (Tally::default(), Tally::default(), Tally::default());
    let mut all_scores = Vec::new();
    for i in 0..200 {
        let split = if i % 4 == 3 {
            Split::HeldOut
        } else {
            Split::Train
        };
        let s = Scene::sample(&mut r, W, H, F, split);
        let clean = render_frames(&s, W, H, F);
        let blurred: Vec<RgbFrame> = clean.iter().map(box_blur3).collect();
        let noisy: Vec<RgbFrame> = clean
            .iter()
            .map(|f| add_uniform_noise(f, 10, &mut r))
            .collect();
        // Three box blurs: corners rounded about as much as the bundled VAE rounds them.
        let rounded: Vec<RgbFrame> = blurred.iter().map(|f| box_blur3(&box_blur3(f))).collect();
        let p = first_prompt(&s);
        for (tally, frames) in truth.iter_mut().zip([&clean, &blurred, &noisy, &rounded]) {
            let sc = score(frames, &p);
            tally.add(sc);
            all_scores.push(sc);
        }
        // Wrong asks, alternately on the clean clip and on a blurred + noisy one.
        let degraded: Vec<RgbFrame>;
        let frames = if i % 2 == 0 {
            &clean
        } else {
            degraded = blurred
                .iter()
                .map(|f| add_uniform_noise(f, 10, &mut r))
                .collect();
            &degraded
        };
        let used: Vec<Color> = s.objects.iter().map(|o| o.color).collect();
        let c = other(&mut r, &Color::ALL, &used);
        wrong_color.add(score(frames, &ParsedPrompt { color: c, ..p }));
        let sh = other(&mut r, &Shape::ALL, &[p.shape]);
        wrong_shape.add(score(frames, &ParsedPrompt { shape: sh, ..p }));
        let m = other(&mut r, &Motion::ALL, &[p.motion]);
        wrong_motion.add(score(frames, &ParsedPrompt { motion: m, ..p }));
    }
    for (name, t) in ["clean", "blur3x3", "noise±10", "blur3x3³"]
        .iter()
        .zip(&truth)
    {
        eprintln!(
            "ground truth {name:<8}: colour {:.3} shape {:.3} motion {:.3} (n={})",
            t.rate(t.color),
            t.rate(t.shape),
            t.rate(t.motion),
            t.n
        );
        assert!(t.rate(t.color) >= 0.99, "{name}: colour");
        assert!(t.rate(t.shape) >= 0.99, "{name}: shape");
        assert!(t.rate(t.motion) >= 0.99, "{name}: motion");
    }
    let fail = |t: &Tally, k: usize| 1.0 - t.rate(k);
    eprintln!(
        "wrong colour fails colour {:.3}; wrong shape fails shape {:.3}; wrong motion fails motion {:.3} (n={} each)",
        fail(&wrong_color, wrong_color.color),
        fail(&wrong_shape, wrong_shape.shape),
        fail(&wrong_motion, wrong_motion.motion),
        wrong_color.n
    );
    assert!(fail(&wrong_color, wrong_color.color) >= 0.95);
    assert!(fail(&wrong_shape, wrong_shape.shape) >= 0.95);
    assert!(fail(&wrong_motion, wrong_motion.motion) >= 0.95);
    let sum = score_suite(&all_scores);
    assert_eq!(sum.n, 800);
    assert!(sum.all >= 0.99 && sum.all <= sum.color);
    eprintln!("calibration took {:.2} s", t0.elapsed().as_secs_f64());
}

/// Clips as the bundled VAE decodes them (`sora eval --ceiling --frames-out`, strips of 17
/// frames): corners and apexes rounded. A classifier on bounding-box fill alone called this
/// triangle a circle in all 17 frames and this square a circle in 9 of 17; the corner cells
/// tell them apart.
#[test]
fn world_scorer_knows_decoded_shapes() {
    for (file, prompt) in [
        (
            "blue-triangle-up-gray.png",
            "a blue triangle moving up on a gray background",
        ),
        (
            "blue-square-left-navy.png",
            "a blue square moving left on a navy background",
        ),
        (
            "green-circle-up-gray.png",
            "a green circle moving up on a gray background",
        ),
    ] {
        let path = crate::common::fixture(&format!("vae_recon/{file}"));
        let strip = image::open(&path).unwrap().to_rgb8();
        let (w, h) = (strip.height() as usize, strip.height() as usize);
        let frames: Vec<RgbFrame> = (0..strip.width() as usize / w)
            .map(|i| {
                let mut data = Vec::with_capacity(w * h * 3);
                for y in 0..h {
                    for x in 0..w {
                        data.extend_from_slice(&strip.get_pixel((i * w + x) as u32, y as u32).0);
                    }
                }
                RgbFrame {
                    width: w,
                    height: h,
                    data,
                }
            })
            .collect();
        assert_eq!(frames.len(), 17);
        let sc = score(&frames, &parse_prompt(prompt).unwrap());
        assert!(sc.all(), "{file}: {sc:?}");
        // Asked for another shape, the same clip fails.
        let p = parse_prompt(prompt).unwrap();
        for other in Shape::ALL.into_iter().filter(|s| *s != p.shape) {
            let wrong = score(&frames, &ParsedPrompt { shape: other, ..p });
            assert!(!wrong.shape_correct, "{file} passed as {other:?}");
        }
    }
}

#[test]
fn world_scorer_reports_the_shape_features_it_classified() {
    // Rendered ideal shapes: the per-clip medians `sora eval --json` reports sit near each
    // shape's prototype (fill of the box: square 1, disc π/4, triangle 1/2; the triangle's
    // centroid below the box centre; its top corners empty).
    for (shape, fill, drop) in [
        (Shape::Square, 1.0, 0.0),
        (Shape::Circle, std::f32::consts::FRAC_PI_4, 0.0),
        (Shape::Triangle, 0.5, 1.0 / 6.0),
    ] {
        let s = sora::train::world::single_object_scene(
            (Color::Yellow, shape, Motion::Down),
            Background::Navy,
            W,
            H,
            F,
        );
        let p = parse_prompt(&canonical_caption(&s)).unwrap();
        let (sc, a) = score_clip(&render_frames(&s, W, H, F), &p);
        assert!(sc.all(), "{shape:?}: {sc:?}");
        let f = a.features.expect("an object was present");
        assert!((f.fill - fill).abs() < 0.1, "{shape:?}: {f:?}");
        assert!((f.drop - drop).abs() < 0.05, "{shape:?}: {f:?}");
        let (top, bottom) = match shape {
            Shape::Square => (0.85..=1.0, 0.85..=1.0),
            Shape::Circle => (0.4..=0.7, 0.4..=0.7),
            Shape::Triangle => (0.0..=0.15, 0.6..=1.0),
        };
        assert!(
            top.contains(&f.top_corners) && bottom.contains(&f.bottom_corners),
            "{shape:?}: {f:?}"
        );
    }
    let empty = score_clip(&[], &parse_prompt("a red circle moving right").unwrap()).1;
    assert_eq!(empty.features, None);
}

#[test]
fn world_scorer_rejects_degenerate_clips() {
    let s = sora::train::world::single_object_scene(
        (Color::Red, Shape::Circle, Motion::Right),
        Background::Gray,
        W,
        H,
        F,
    );
    let p = parse_prompt(&canonical_caption(&s)).unwrap();
    let ok = score(&render_frames(&s, W, H, F), &p);
    assert!(ok.all(), "{ok:?}");
    let fill = |rgb: [u8; 3]| -> Vec<RgbFrame> {
        let frame = RgbFrame {
            width: W,
            height: H,
            data: rgb.repeat(W * H),
        };
        vec![frame; F]
    };
    assert_eq!(
        score(&fill(Background::Gray.rgb()), &p),
        Score {
            asked_shape: Some(Shape::Circle),
            ..Score::default()
        }
    );
    let flooded = score(&fill(Color::Red.rgb()), &p);
    assert!(flooded.color_present && !flooded.shape_correct && !flooded.motion_correct);
    assert_eq!(flooded.seen_shape, None, "a flooded frame draws no object");
    // A still object: right colour and shape, no motion.
    let still = vec![render_frames(&s, W, H, 1)[0].clone(); F];
    let sc = score(&still, &p);
    assert!(
        sc.color_present && sc.shape_correct && !sc.motion_correct,
        "{sc:?}"
    );
    assert_eq!(score(&[], &p).seen_shape, None);
    assert!(!score(&[], &p).color_present);
    let sum = score_suite(&[ok, flooded, sc]);
    assert_eq!(sum.n, 3);
    assert!((sum.color - 1.0).abs() < 1e-6 && (sum.all - 1.0 / 3.0).abs() < 1e-6);
    // Confusion: two circles drawn as circles, the flooded clip as no object.
    assert_eq!(sum.shapes, [[2, 0, 0, 1], [0; 4], [0; 4]]);
}

#[test]
fn world_example_prompt_files_parse() {
    let vocab = vocabulary();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
    for name in ["shapes.txt", "batch.jsonl"] {
        let items = sora::cli::plan::read_prompt_file(&root.join(name)).unwrap();
        assert!(items.len() >= 5, "{name}");
        for item in items {
            let item = item.unwrap_or_else(|(line, e)| panic!("{name}:{line}: {e}"));
            let prompt = item.overrides.prompt.unwrap();
            assert!(parse_prompt(&prompt).is_some(), "{name}: {prompt:?}");
            for w in words(&prompt) {
                assert!(
                    vocab.binary_search(&w).is_ok(),
                    "{name}: {w:?} not in vocabulary"
                );
            }
        }
    }
}
