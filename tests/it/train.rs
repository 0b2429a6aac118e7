//! Training: the recipe end to end at toy sizes, loss falling on a fixed batch, and checkpoints
//! that resume to bit-identical parameters.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sora::models::wan::dit::WanTransformer3DModel;
use sora::pipeline::WanModel;
use sora::train::looper::{train_loop, LoopConfig};
use sora::train::optim::params;
use sora::train::recipe::{init_params, run_all, Recipe, StageOptions};
use sora::train::world;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sora-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn smoke() -> Recipe {
    Recipe::smoke(world::vocabulary().len() + 3)
}

#[test]
fn train_smoke_recipe_produces_a_loadable_model() {
    let dir = tmp("recipe");
    let opts = StageOptions {
        progress: false,
        ckpt_every: 2,
    };
    assert!(run_all(&smoke(), &dir, &opts, &|| false).unwrap());
    for f in [
        "sora.json",
        "tokenizer/tokenizer.json",
        "text_encoder/config.json",
        "transformer/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "work-dit/loss.csv",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    let model = WanModel::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let frames = sora::cli::train::generate_frames(
        &model,
        "a red circle moving right on a black background",
        1,
    )
    .unwrap();
    assert_eq!(frames.len(), 5);
    assert_eq!((frames[0].width, frames[0].height), (32, 32));
    // The same seed gives the same frames.
    let again = sora::cli::train::generate_frames(
        &model,
        "a red circle moving right on a black background",
        1,
    )
    .unwrap();
    assert_eq!(frames, again);

    // `sora eval`: both suites, each followed by the VAE's ceiling on the same prompts.
    let full = sora::cli::train::eval_suites(
        &model,
        &sora::cli::train::builtin_suites(),
        0..1,
        true,
        Some(&dir),
    )
    .unwrap();
    let report = &full.suites;
    let labels: Vec<(&str, usize)> = report.iter().map(|(l, s)| (l.as_str(), s.n)).collect();
    assert_eq!(
        labels,
        [
            ("seen", 24),
            ("seen (VAE)", 24),
            ("held-out", 16),
            ("held-out (VAE)", 16)
        ]
    );
    for (l, s) in report {
        for v in [s.color, s.shape, s.motion, s.all] {
            assert!((0.0..=1.0).contains(&v), "{l}: {v}");
        }
        assert!(s.all <= s.color.min(s.shape).min(s.motion), "{l}: {s:?}");
    }
    // One record per clip (generated and VAE-ceiling), agreeing with the summaries; a clip
    // whose blob has a majority shape carries the classifier's features.
    assert_eq!(full.clips.len(), 2 * (24 + 16));
    assert!(full.clips.iter().all(|c| c.seed == 0), "seeds 0..1");
    // `--first-seed`: a later range of seeds, generated clips only.
    let later = sora::cli::train::eval_suites(
        &model,
        &sora::cli::train::builtin_suites(),
        3..4,
        false,
        None,
    )
    .unwrap();
    assert_eq!(later.clips.len(), 24 + 16);
    assert!(later.clips.iter().all(|c| c.seed == 3 && !c.vae_ceiling));
    // `sora eval --prompts FILE`: the given prompts as one suite, "prompts", with its ceiling.
    let file = dir.join("eval-prompts.txt");
    std::fs::write(
        &file,
        "# two prompts\na green square moving up on a gray background\n\nblue circle sliding left\n",
    )
    .unwrap();
    let prompts = sora::cli::train::read_eval_prompts(&file).unwrap();
    assert_eq!(
        prompts,
        [
            "a green square moving up on a gray background",
            "blue circle sliding left"
        ]
    );
    let own =
        sora::cli::train::eval_suites(&model, &[("prompts", prompts)], 5..7, true, None).unwrap();
    let labels: Vec<(&str, usize)> = own.suites.iter().map(|(l, s)| (l.as_str(), s.n)).collect();
    assert_eq!(labels, [("prompts", 4), ("prompts (VAE)", 4)]);
    assert!(own.clips.iter().all(|c| c.suite == "prompts"));
    assert_eq!(own.clips[2].prompt, "blue circle sliding left");
    assert_eq!(own.clips[2].seed, 5);
    // Lines the scorer cannot read are all named, with what it can read.
    std::fs::write(
        &file,
        "a red circle moving right\na red kite over a beach\nred square\n",
    )
    .unwrap();
    let err = format!(
        "{:#}",
        sora::cli::train::read_eval_prompts(&file).unwrap_err()
    );
    for want in [
        "2 prompt(s)",
        "line 2: \"a red kite over a beach\"",
        "line 3: \"red square\"",
        "one colour",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    assert!(!err.contains("line 1"), "{err}");
    std::fs::write(&file, "# nothing\n\n").unwrap();
    let err = format!(
        "{:#}",
        sora::cli::train::read_eval_prompts(&file).unwrap_err()
    );
    assert!(err.contains("holds no prompts"), "{err}");
    for (label, s) in report {
        let (suite, vae) = match label.strip_suffix(" (VAE)") {
            Some(l) => (l, true),
            None => (label.as_str(), false),
        };
        let clips: Vec<_> = full
            .clips
            .iter()
            .filter(|c| c.suite == suite && c.vae_ceiling == vae)
            .collect();
        assert_eq!(clips.len(), s.n, "{label}");
        let frac = |f: &dyn Fn(&sora::train::eval::Score) -> bool| {
            clips.iter().filter(|c| f(&c.score)).count() as f32 / s.n as f32
        };
        assert_eq!(frac(&|x| x.all()), s.all, "{label}");
        assert_eq!(frac(&|x| x.shape_correct), s.shape, "{label}");
        for c in &clips {
            if c.analysis.shape.is_some() {
                let f = c
                    .analysis
                    .features
                    .expect("features where a shape was classified");
                assert!(f.fill > 0.0 && f.fill <= 1.0, "{}: {f:?}", c.prompt);
                assert!((0.0..=1.0).contains(&f.top_corners), "{}: {f:?}", c.prompt);
            }
        }
    }
    // The decoder-dit stage's rendered targets: the scenes drawn again for dataset clips are
    // the ones encoded (the stored latents, recomputed from the re-rendered clips).
    let r = smoke();
    let stored = candle_core::safetensors::load(dir.join("latents.safetensors"), &Device::Cpu)
        .unwrap()["latents"]
        .clone();
    let n = stored.dim(0).unwrap();
    assert_eq!(n, r.clips);
    let cfg: sora::models::wan::WanVaeConfig =
        sora::weights::read_config(&dir.join("vae/config.json")).unwrap();
    let vae =
        sora::models::wan::vae_keys::load_vae(&dir.join("vae"), &cfg, DType::F32, &Device::Cpu)
            .unwrap();
    let idx = [0u32, n as u32 - 1];
    let scenes = sora::train::recipe::dataset_scenes(&r, n, &idx);
    assert_ne!(scenes[0], scenes[1]);
    for (s, &k) in scenes.iter().zip(&idx) {
        let clip = world::render_tensor(s, r.width, r.height, r.frames, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (mean, _) = vae.encode(&clip).unwrap();
        let again = vae.normalize_latents(&mean).unwrap().get(0).unwrap();
        let want = stored.get(k as usize).unwrap();
        crate::common::assert_close(
            &format!("clip {k} re-rendered and encoded, against its stored latent"),
            &again,
            &want,
            1e-4,
        );
    }
    // The VAE-ceiling strips land beside the generated ones (names are slugs, cut to length).
    assert!(std::fs::read_dir(&dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("held-out-vae-15-s0-a-cyan-triangle-moving-left")));

    // `--dit-train-text`: the text encoder trains with the DiT (here fine-tuning the smoke
    // DiT) and its EMA weights replace `text_encoder/`.
    let joint = tmp("recipe-joint-text");
    for d in ["tokenizer", "text_encoder"] {
        copy_files(&dir.join(d), &joint.join(d));
    }
    for f in ["latents.safetensors", "captions.json"] {
        std::fs::copy(dir.join(f), joint.join(f)).unwrap();
    }
    let mut r = smoke();
    r.dit_train_text = true;
    r.dit_steps = 4;
    r.dit_init = Some(dir.join("transformer/diffusion_pytorch_model.safetensors"));
    // A checkpoint of a frozen-encoder run cannot resume a joint one: the error says why.
    copy_files(&dir.join("work-dit/ckpt"), &joint.join("work-dit/ckpt"));
    let err = format!(
        "{:#}",
        sora::train::recipe::train_dit(&r, &joint, &opts, &|| false).unwrap_err()
    );
    for want in [
        "has no parameter `text_encoder.",
        "--dit-train-text",
        "move that directory aside",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    std::fs::remove_dir_all(joint.join("work-dit")).unwrap();
    assert!(sora::train::recipe::train_dit(&r, &joint, &opts, &|| false).unwrap());
    let load = |p: std::path::PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let before = load(dir.join("text_encoder/model.safetensors"));
    let after = load(joint.join("text_encoder/model.safetensors"));
    let mut keys: Vec<_> = before.keys().collect();
    keys.sort();
    let mut after_keys: Vec<_> = after.keys().collect();
    after_keys.sort();
    assert_eq!(
        keys, after_keys,
        "the trained text encoder keeps the layout"
    );
    let dit_keys = load(joint.join("transformer/diffusion_pytorch_model.safetensors"));
    assert!(dit_keys.keys().all(|k| !k.starts_with("text_encoder.")));
    assert_eq!(
        dit_keys.len(),
        load(dir.join("transformer/diffusion_pytorch_model.safetensors")).len()
    );
    // Gradients reach every text-encoder tensor: after 4 steps the raw parameters (the final
    // checkpoint) moved far more than AdamW's weight decay alone could move them
    // (Σ lr·wd·|p| ≤ 4·lr·wd·max|p|), Adam moving a parameter with a gradient by about lr a step.
    let raw = load(joint.join("work-dit/ckpt/params.safetensors"));
    let max_abs = |t: &Tensor| -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    for k in keys {
        let moved = max_abs(&(&raw[&format!("text_encoder.{k}")] - &before[k]).unwrap());
        let decay_only = 4.0 * r.dit_lr as f32 * 0.01 * max_abs(&before[k]);
        assert!(
            moved > 10.0 * decay_only && moved > 0.2 * r.dit_lr as f32,
            "{k}: moved {moved}, weight decay alone {decay_only}"
        );
    }
    let joint_model =
        WanModel::load(&dir_with_model(&dir, &joint), &Device::Cpu, DType::F32).unwrap();
    let frames = sora::cli::train::generate_frames(
        &joint_model,
        "a red circle moving right on a black background",
        1,
    )
    .unwrap();
    assert_eq!(frames.len(), 5);
}

/// Copies the files (not subdirectories) of `src` into `dst`, creating it.
fn copy_files(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// A model directory: `base`'s files with `over`'s tokenizer, text encoder and transformer.
fn dir_with_model(base: &std::path::Path, over: &std::path::Path) -> std::path::PathBuf {
    let out = over.join("model");
    for d in [
        "vae",
        "scheduler",
        "tokenizer",
        "text_encoder",
        "transformer",
    ] {
        let src = if ["tokenizer", "text_encoder", "transformer"].contains(&d) {
            over
        } else {
            base
        };
        copy_files(&src.join(d), &out.join(d));
    }
    for f in ["sora.json", "model_index.json"] {
        if base.join(f).is_file() {
            std::fs::copy(base.join(f), out.join(f)).unwrap();
        }
    }
    out
}

/// A DiT of the smoke recipe, freshly initialised, with a fixed flow-matching batch.
fn dit_setup() -> (
    VarMap,
    WanTransformer3DModel,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
) {
    let r = smoke();
    let dev = Device::Cpu;
    sora::nn::set_differentiable(true);
    let varmap = VarMap::new();
    let dit =
        WanTransformer3DModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &r.dit)
            .unwrap();
    init_params(&params(&varmap), 7).unwrap();
    let x0 = Tensor::randn(0f32, 1.0, (4, 8, 2, 8, 8), &dev).unwrap();
    let noise = Tensor::randn(0f32, 1.0, (4, 8, 2, 8, 8), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (4, 16, 64), &dev).unwrap();
    let sig = Tensor::new(&[0.2f32, 0.4, 0.6, 0.8], &dev).unwrap();
    (varmap, dit, x0, noise, ctx, sig)
}

fn fm_loss(
    dit: &WanTransformer3DModel,
    x0: &Tensor,
    noise: &Tensor,
    ctx: &Tensor,
    sig: &Tensor,
) -> Tensor {
    let s = sig.reshape((4, 1, 1, 1, 1)).unwrap();
    let xt = (x0.broadcast_mul(&(1.0 - &s).unwrap()).unwrap() + noise.broadcast_mul(&s).unwrap())
        .unwrap();
    let v = dit.forward(&xt, &(sig * 1000.0).unwrap(), ctx).unwrap();
    (v - (noise - x0).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn cfg(steps: u64) -> LoopConfig {
    LoopConfig {
        name: "test".into(),
        steps,
        lr: 2e-3,
        warmup: 2,
        lr_floor: 0.5,
        clip: 1.0,
        weight_decay: 0.0,
        ema: Some(0.9),
        ckpt_every: 1000,
        progress: false,
        shards: 1,
    }
}

#[test]
fn train_loss_falls_on_a_fixed_batch() {
    let (varmap, dit, x0, noise, ctx, sig) = dit_setup();
    let dir = tmp("falls");
    let out = train_loop(&cfg(40), &params(&varmap), &dir, &|| false, &|_, _| {
        Ok(fm_loss(&dit, &x0, &noise, &ctx, &sig))
    })
    .unwrap();
    let first: f64 = out.log[..3].iter().map(|r| r.loss).sum::<f64>() / 3.0;
    let last: f64 = out.log[37..].iter().map(|r| r.loss).sum::<f64>() / 3.0;
    eprintln!("loss {first:.4} -> {last:.4}");
    assert!(last < 0.7 * first, "loss did not fall: {first} -> {last}");
    assert!(dir.join("loss.csv").is_file());
    // Optimiser state must hold plain tensors: one that records ops keeps every earlier
    // step's graph alive (a fresh DiT run once grew to 24 GB and was OOM-killed).
    let ema = out.ema.expect("EMA kept");
    for (name, t) in &ema.shadow {
        assert!(
            !t.track_op(),
            "EMA shadow of {name} carries an autograd graph"
        );
    }
    let ps = params(&varmap);
    let mut opt = sora::train::optim::AdamW::new(Default::default());
    let grads = fm_loss(&dit, &x0, &noise, &ctx, &sig).backward().unwrap();
    opt.step(&ps, &grads, 1e-3).unwrap();
    for (name, t) in opt.state() {
        assert!(
            !t.track_op(),
            "AdamW moment {name} carries an autograd graph"
        );
    }
}

#[test]
fn train_checkpoint_resumes_exactly() {
    let snapshot = |vm: &VarMap| -> Vec<Vec<f32>> {
        params(vm)
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    // Straight through: 6 steps.
    let (vm_a, dit_a, x0, noise, ctx, sig) = dit_setup();
    let dir_a = tmp("resume-a");
    let a = train_loop(&cfg(6), &params(&vm_a), &dir_a, &|| false, &|_, _| {
        Ok(fm_loss(&dit_a, &x0, &noise, &ctx, &sig))
    })
    .unwrap();
    // Interrupted after 3 steps, then resumed into freshly initialised parameters.
    let (vm_b, dit_b, ..) = dit_setup();
    let dir_b = tmp("resume-b");
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let interrupted = train_loop(
        &cfg(6),
        &params(&vm_b),
        &dir_b,
        &|| calls.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        &|_, _| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(fm_loss(&dit_b, &x0, &noise, &ctx, &sig))
        },
    )
    .unwrap();
    assert!(!interrupted.finished);
    assert_eq!(interrupted.log.len(), 3);
    // The checkpoint restores the interrupted state bit for bit: parameters, optimizer, EMA.
    let (vm_r, ..) = dit_setup();
    let mut opt = sora::train::optim::AdamW::new(Default::default());
    let mut ema = sora::train::optim::Ema::new(&params(&vm_r), 0.9).unwrap();
    let resumed = sora::train::checkpoint::Checkpoint::new(&dir_b.join("ckpt"))
        .load(&params(&vm_r), &mut opt, Some(&mut ema))
        .unwrap()
        .unwrap();
    assert_eq!((resumed.step, opt.step, resumed.log.len()), (3, 3, 3));
    assert_eq!(
        snapshot(&vm_b),
        snapshot(&vm_r),
        "restored parameters differ"
    );
    let ema_b = interrupted.ema.as_ref().unwrap();
    for (k, t) in &ema_b.shadow {
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ema.shadow[k]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "restored EMA {k}"
        );
    }
    // Continuing gives the run that never stopped (float reductions may differ in the last
    // bit between runs when other threads compete, hence the tolerance).
    let (vm_c, dit_c, ..) = dit_setup();
    let c = train_loop(&cfg(6), &params(&vm_c), &dir_b, &|| false, &|_, _| {
        Ok(fm_loss(&dit_c, &x0, &noise, &ctx, &sig))
    })
    .unwrap();
    assert_eq!(c.log.len(), 6);
    for (pa, pc) in snapshot(&vm_a).iter().zip(snapshot(&vm_c).iter()) {
        let err = pa
            .iter()
            .zip(pc)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-5, "resumed parameters differ by {err}");
    }
    for (ra, rc) in a.log.iter().zip(&c.log) {
        assert_eq!(ra.step, rc.step);
        assert!(
            (ra.loss - rc.loss).abs() <= 1e-6 * ra.loss.abs(),
            "loss at step {}: {} vs {}",
            ra.step,
            ra.loss,
            rc.loss
        );
    }
}

/// Data-parallel steps: the batch cut into shards that run forward and backward on their own
/// threads, their gradients summed, gives the whole batch's gradients (up to float rounding)
/// and the same loss and gradient norm at every step of a short run, with the weighted
/// flow-matching loss normalised over the whole batch.
#[test]
fn train_shards_sum_to_the_whole_batch() {
    use sora::train::looper::{sharded_grads, Shard};
    use sora::train::recipe::{flow_matching_loss_part, flow_matching_norm};
    // The first step's summed gradients, per parameter.
    let grads = |ps: &sora::train::optim::Params, g: &candle_core::backprop::GradStore| {
        ps.iter()
            .map(|(name, v)| {
                let t = g
                    .get(v.as_tensor())
                    .expect("every parameter gets a gradient");
                (
                    name.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect::<Vec<_>>()
    };
    // Uneven weights, so a per-shard normaliser would give a different loss.
    let wts = Tensor::arange(0f32, 4.0 * 2.0 * 8.0 * 8.0, &Device::Cpu)
        .unwrap()
        .affine(1.0 / 256.0, 1.0)
        .unwrap()
        .reshape((4, 1, 2, 8, 8))
        .unwrap();
    // Same data for both runs (dit_setup draws it at random; the parameters are seeded).
    let (_, _, x0, noise, ctx, sig) = dit_setup();
    let run = |shards: usize, name: &str| {
        let (vm, dit, ..) = dit_setup();
        let norm = flow_matching_norm(&x0, Some(&wts)).unwrap();
        let loss = |_: u64, shard: Shard| {
            let rows = shard.rows(4);
            let part = |t: &Tensor| t.narrow(0, rows.start, rows.len()).unwrap();
            let (x0, noise, ctx, w) = (part(&x0), part(&noise), part(&ctx), part(&wts));
            let sig = part(&sig);
            let s = sig.reshape((rows.len(), 1, 1, 1, 1)).unwrap();
            let xt = (x0.broadcast_mul(&(1.0 - &s).unwrap()).unwrap()
                + noise.broadcast_mul(&s).unwrap())
            .unwrap();
            let v = dit.forward(&xt, &(sig * 1000.0).unwrap(), &ctx).unwrap();
            Ok(flow_matching_loss_part(&v, &(noise - x0).unwrap(), Some(&w), norm).unwrap())
        };
        let ps = params(&vm);
        let (_, g) = sharded_grads(&ps, shards, &|shard| loss(0, shard)).unwrap();
        let g = grads(&ps, &g);
        let c = LoopConfig { shards, ..cfg(4) };
        let out = train_loop(&c, &ps, &tmp(name), &|| false, &loss).unwrap();
        (out.log, g)
    };
    let (log1, g1) = run(1, "shards-1");
    let (log3, g3) = run(3, "shards-3");
    assert_eq!(Shard { index: 1, count: 3 }.rows(4), 1..2);
    assert_eq!(Shard { index: 2, count: 3 }.rows(4), 2..4);
    for (a, b) in log1.iter().zip(&log3) {
        assert!(
            (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs(),
            "step {}: loss {} whole vs {} sharded",
            a.step,
            a.loss,
            b.loss
        );
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-4 * a.grad_norm.abs());
    }
    // Gradients, not parameters after the steps: AdamW's first steps move an element by about
    // ±lr whatever its gradient's size, so an element whose gradient is near zero follows the
    // sign of its rounding noise, which the shard split changes (then a few of ~10⁵ elements
    // end up to the summed step sizes apart, and the next steps' gradients follow them).
    let mut worst = (0f32, String::new());
    for ((name, a), (_, b)) in g1.iter().zip(&g3) {
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let e = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    eprintln!(
        "sharded vs whole batch, first-step gradients: max difference {:.2e} of the tensor's \
         largest gradient, in {}",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= 1e-4,
        "sharded gradients differ from the whole batch's by {:.2e} (relative) in {}",
        worst.0,
        worst.1
    );
    assert_eq!(log3.len(), 4);
}

#[test]
fn dit_object_weights_mark_positions_away_from_the_frame_background() {
    // Two clips, 2 channels, 2 latent frames of 4×4: each frame a plain background (its own
    // per-channel value) with an object block, which moves and differs per clip.
    let (n, c, t, h, w) = (2, 2, 2, 4, 4);
    let mut v = vec![0f32; n * c * t * h * w];
    let mut expect = vec![1f32; n * t * h * w];
    for i in 0..n {
        for f in 0..t {
            for ch in 0..c {
                // Backgrounds differ by more than the 1.5 threshold between frames and clips,
                // so a per-clip or global median would misclassify whole frames.
                let bg = 3.0 * (i + 1) as f32 - 0.5 * ch as f32 + 2.5 * f as f32;
                for y in 0..h {
                    for x in 0..w {
                        // Object: a 2×2 block at column f + i, rows 1..3, 2.0 away per channel
                        // (distance √8 > 1.5); a faint 0.5 ripple elsewhere stays background.
                        let obj = (1..3).contains(&y) && (f + i..f + i + 2).contains(&x);
                        let val = if obj {
                            bg + 2.0
                        } else {
                            bg + 0.5 * ((x + y) % 2) as f32
                        };
                        v[(((i * c + ch) * t + f) * h + y) * w + x] = val;
                        if obj {
                            expect[((i * t + f) * h + y) * w + x] = 5.0;
                        }
                    }
                }
            }
        }
    }
    let lat = Tensor::from_vec(v, (n, c, t, h, w), &Device::Cpu).unwrap();
    let wts = sora::train::recipe::object_weights(&lat, 4.0, 0).unwrap();
    assert_eq!(wts.dims(), &[n, 1, t, h, w]);
    let got: Vec<f32> = wts.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, expect);
    // Dilated by one: the 2×2 block grows to the 4×4 (clipped) square around it, in its own
    // latent frame only.
    let mut grown = vec![1f32; n * t * h * w];
    for i in 0..n {
        for f in 0..t {
            for y in 0..h {
                for x in 0..w {
                    if y <= 3 && (f + i).saturating_sub(1) <= x && x <= f + i + 2 {
                        grown[((i * t + f) * h + y) * w + x] = 5.0;
                    }
                }
            }
        }
    }
    let wts = sora::train::recipe::object_weights(&lat, 4.0, 1).unwrap();
    assert_eq!(wts.flatten_all().unwrap().to_vec1::<f32>().unwrap(), grown);
}

#[test]
fn dit_weighted_loss_is_the_mse_under_unit_weights_and_follows_the_weights() {
    use sora::train::recipe::flow_matching_loss;
    let dev = Device::Cpu;
    let (b, c, t, h, w) = (2, 3, 2, 4, 4);
    let target = Tensor::zeros((b, c, t, h, w), DType::F32, &dev).unwrap();
    // Error 1 at one position (all channels) of each item, 0 elsewhere.
    let mut e = vec![0f32; b * c * t * h * w];
    for bi in 0..b {
        for ch in 0..c {
            e[((bi * c + ch) * t) * h * w] = 1.0;
        }
    }
    let v = Tensor::from_vec(e, (b, c, t, h, w), &dev).unwrap();
    let scalar = |x: Tensor| x.to_scalar::<f32>().unwrap();
    let plain = scalar(flow_matching_loss(&v, &target, None).unwrap());
    assert!((plain - 1.0 / (t * h * w) as f32).abs() < 1e-7, "{plain}");
    let ones = Tensor::ones((b, 1, t, h, w), DType::F32, &dev).unwrap();
    let unit = scalar(flow_matching_loss(&v, &target, Some(&ones)).unwrap());
    assert!((unit - plain).abs() < 1e-7, "{unit} vs {plain}");
    // Weight 5 on the erring position: 5 / (5 + 31) per channel-mean.
    let mut wv = vec![1f32; b * t * h * w];
    for bi in 0..b {
        wv[bi * t * h * w] = 5.0;
    }
    let wt = Tensor::from_vec(wv, (b, 1, t, h, w), &dev).unwrap();
    let weighted = scalar(flow_matching_loss(&v, &target, Some(&wt)).unwrap());
    let n = (t * h * w) as f32;
    assert!((weighted - 5.0 / (n + 4.0)).abs() < 1e-6, "{weighted}");
}

#[test]
fn dit_clip_sampler_oversamples_caption_words() {
    use rand::{Rng, SeedableRng};
    use sora::train::recipe::ClipSampler;
    let caps: Vec<Vec<String>> = [
        "a red circle moving up on a black background",
        "a blue square moving up on a gray background",
        "a red square moving left and a green circle moving up on a navy background",
        "a green triangle moving down on a black background",
    ]
    .iter()
    .map(|c| vec![c.to_string()])
    .collect();
    // Without oversampling, the draws are exactly the uniform ones of older recipes.
    let uniform = ClipSampler::new(&caps, &[]);
    let mut a = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut b = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for _ in 0..100 {
        assert_eq!(uniform.sample(&mut a), b.random_range(0..4u32));
    }
    // red ×3, square ×2: weights 3, 2, 6, 1 of 12.
    let over = ClipSampler::new(&caps, &[("red".into(), 3.0), ("square".into(), 2.0)]);
    let n = 120_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[over.sample(&mut a) as usize] += 1;
    }
    for (i, w) in [3.0, 2.0, 6.0, 1.0].iter().enumerate() {
        let got = counts[i] as f64 / n as f64;
        let want = w / 12.0;
        // Binomial standard error at most 0.0015 here; 4 of them.
        assert!((got - want).abs() < 0.006, "clip {i}: {got} against {want}");
    }
}
