//! The real `sora` binary, run in isolated temp dirs: MP4s checked with ffprobe, PNGs decoded,
//! batches, JSON output, Hub cache resolution, and every kind of bad input (clear message,
//! non-zero exit, nothing written).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{fixture, max_abs_diff};

fn sora() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sora"));
    c.env_remove("SORA_MODEL").env_remove("HF_HUB_OFFLINE");
    c
}

/// A fresh empty directory for one test.
fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sora-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny() -> String {
    fixture("wan-tiny").display().to_string()
}

fn run(c: &mut Command) -> (i32, String, String) {
    let o: Output = c.output().expect("run sora");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// ffprobe's view of the first video stream and the container.
fn probe(p: &Path) -> serde_json::Value {
    let out = ffprobe(
        p,
        &[
            "-count_frames",
            "-show_entries",
            "stream=codec_name,pix_fmt,width,height,nb_read_frames,r_frame_rate,duration:format=duration,format_name:format_tags",
            "-of",
            "json",
        ],
    );
    serde_json::from_slice(&out).unwrap()
}

/// `ffprobe -v error ARGS p`'s standard output; fails the test if ffprobe rejects the file.
fn ffprobe(p: &Path, args: &[&str]) -> Vec<u8> {
    let o = Command::new("ffprobe")
        .args(["-v", "error"])
        .args(args)
        .arg(p)
        .output()
        .expect("ffprobe is installed (apt-get install ffmpeg)");
    assert!(
        o.status.success(),
        "ffprobe rejected {}: {}",
        p.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[test]
fn cli_writes_an_mp4_that_ffprobe_accepts() {
    let d = tmp("mp4");
    let out = d.join("a.mp4");
    let (code, stdout, stderr) = run(sora()
        .args([
            "gen",
            "--model",
            &tiny(),
            "--prompt",
            "a red circle",
            "--seed",
            "5",
            "-o",
        ])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("wrote") && stdout.contains("9 frames 48×32 @ 8 fps, seed 5"),
        "{stdout}"
    );
    let p = probe(&out);
    let s = &p["streams"][0];
    assert_eq!(s["codec_name"], "h264");
    assert_eq!(s["pix_fmt"], "yuv420p");
    assert_eq!(
        (s["width"].as_u64(), s["height"].as_u64()),
        (Some(48), Some(32))
    );
    assert_eq!(s["nb_read_frames"], "9");
    assert_eq!(s["r_frame_rate"], "8/1");
    assert_eq!(p["format"]["duration"], "1.125000");
    assert_eq!(p["format"]["tags"]["title"], "a red circle");
    let comment: serde_json::Value =
        serde_json::from_str(p["format"]["tags"]["comment"].as_str().unwrap()).unwrap();
    assert_eq!(comment["seed"], 5);
    assert_eq!(comment["sampler"], "unipc");
    // +faststart: the index (moov) comes before the media data (mdat).
    let bytes = std::fs::read(&out).unwrap();
    let find = |tag: &[u8]| bytes.windows(4).position(|w| w == tag).unwrap();
    assert!(
        find(b"moov") < find(b"mdat"),
        "moov atom is not at the front"
    );
    assert_eq!(files_in(&d), vec!["a.mp4"], "no temp files left");
}

#[test]
fn cli_secs_are_exact_and_odd_sizes_are_cropped() {
    let d = tmp("secs");
    let out = d.join("b.mp4");
    let (code, _, stderr) = run(sora()
        .args([
            "gen",
            "--model",
            &tiny(),
            "--prompt",
            "x",
            "--secs",
            "1",
            "--fps",
            "8",
            "--res",
            "50x30",
            "-o",
        ])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let p = probe(&out);
    let s = &p["streams"][0];
    assert_eq!(
        (s["width"].as_u64(), s["height"].as_u64()),
        (Some(50), Some(30))
    );
    assert_eq!(s["nb_read_frames"], "8");
    assert_eq!(p["format"]["duration"], "1.000000");
}

#[test]
fn cli_one_frame_writes_a_png() {
    let d = tmp("png");
    let out = d.join("still.png");
    let (code, _, stderr) = run(sora()
        .args([
            "gen",
            "--model",
            &tiny(),
            "--prompt",
            "x",
            "--res",
            "40x24",
            "-o",
        ])
        .arg(&out)
        .args(["--frames", "1"]));
    assert_eq!(code, 0, "{stderr}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (40, 24));
    // A .png name alone is not enough for many frames.
    let (code, _, stderr) = run(sora()
        .args(["gen", "--model", &tiny(), "--prompt", "x", "-o"])
        .arg(d.join("v.png")));
    assert_eq!(code, 2);
    assert!(stderr.contains("holds one frame"), "{stderr}");
}

/// Reads `frame_NNNNN.png` files of a directory as one byte vector.
fn read_frames(d: &Path, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            image::open(d.join(format!("frame_{i:05}.png")))
                .unwrap()
                .to_rgb8()
                .into_raw()
        })
        .collect()
}

#[test]
fn cli_matches_diffusers_with_injected_noise_and_is_deterministic() {
    let d = tmp("parity");
    let io = crate::common::load("pipeline_io.safetensors");
    let noise_file = d.join("noise.safetensors");
    let mut m = std::collections::HashMap::new();
    m.insert("latents".to_string(), io["noise"].clone());
    candle_core::safetensors::save(&m, &noise_file).unwrap();
    let (req, _) = crate::pipeline::settings();
    for (name, sampler) in [("unipc", "unipc"), ("euler", "euler")] {
        let frames_dir = d.join(format!("frames-{name}"));
        let (code, _, stderr) = run(sora()
            .args([
                "gen",
                "--model",
                &tiny(),
                "--prompt",
                &req.prompt,
                "--negative-prompt",
                &req.negative_prompt,
            ])
            .args([
                "--res",
                &format!("{}x{}", req.width, req.height),
                "--frames",
                &req.frames.to_string(),
            ])
            .args([
                "--steps",
                &req.steps.to_string(),
                "--cfg",
                &req.guidance.to_string(),
                "--shift",
                &req.shift.to_string(),
            ])
            .args(["--sampler", sampler, "--init-noise"])
            .arg(&noise_file)
            .arg("--frames-out")
            .arg(&frames_dir)
            .arg("-o")
            .arg(d.join(format!("{name}.mp4"))));
        assert_eq!(code, 0, "{stderr}");
        let ours = read_frames(&frames_dir, req.frames);
        let reference: Vec<u8> = io[&format!("{name}_frames")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (n, max) = crate::pipeline::frame_diff(&ours, &reference);
        assert!(
            max <= 1 && n * 200 <= ours.len(),
            "{name}: {n} values differ, max {max}"
        );
    }
    // Same seed → same frames, whatever the thread count.
    let mut runs = Vec::new();
    for (i, threads) in ["1", "2", "2"].iter().enumerate() {
        let fd = d.join(format!("det-{i}"));
        let (code, _, stderr) = run(sora()
            .args([
                "gen",
                "--model",
                &tiny(),
                "--prompt",
                "a blue square",
                "--seed",
                "77",
                "--threads",
                threads,
            ])
            .arg("--frames-out")
            .arg(&fd)
            .arg("-o")
            .arg(d.join(format!("det-{i}.mp4"))));
        assert_eq!(code, 0, "{stderr}");
        runs.push(read_frames(&fd, 9));
    }
    assert!(
        runs[0] == runs[1] && runs[1] == runs[2],
        "frames differ between runs or thread counts"
    );
}

#[test]
fn cli_batch_reports_bad_items_and_resumes() {
    let d = tmp("batch");
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let prompts = d.join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a red circle\", \"seed\": 1}\n\
         {\"prompt\": \"broken\", \"frames\": 10}\n\
         this is not json\n\
         {\"prompt\": \"a green square\", \"frames\": 1}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(sora()
        .args(["gen", "--model", &tiny(), "--json", "--prompts"])
        .arg(&prompts)
        .arg("-o")
        .arg(&out));
    assert_eq!(code, 1, "a failed item makes the exit status 1: {stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[0]["seed"], 1);
    assert_eq!(lines[0]["frames"], 9);
    assert!(lines[0]["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[1]["status"], "error");
    assert!(
        lines[1]["error"].as_str().unwrap().contains("--frames 10"),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2]["status"], "error");
    assert!(
        lines[2]["error"].as_str().unwrap().contains("line 3"),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3]["status"], "ok");
    assert_eq!(
        files_in(&out),
        vec!["001-a-red-circle.mp4", "004-a-green-square.png"]
    );
    // Resume: existing outputs are skipped.
    std::fs::write(&prompts, "a red circle\n# a comment\n\nsomething new\n").unwrap();
    std::fs::rename(
        out.join("001-a-red-circle.mp4"),
        out.join("001-a-red-circle.mp4.bak"),
    )
    .unwrap();
    std::fs::write(out.join("001-a-red-circle.mp4"), b"keep").unwrap();
    let (code, stdout, stderr) = run(sora()
        .args([
            "gen",
            "--model",
            &tiny(),
            "--json",
            "--skip-existing",
            "--prompts",
        ])
        .arg(&prompts)
        .arg("-o")
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["status"], "skipped");
    assert_eq!(lines[1]["status"], "ok");
    assert_eq!(lines[1]["line"], 4);
    assert_eq!(
        std::fs::read(out.join("001-a-red-circle.mp4")).unwrap(),
        b"keep"
    );
    assert!(out.join("002-something-new.mp4").is_file());
}

#[test]
fn cli_reads_prompts_from_stdin() {
    use std::io::Write;
    let d = tmp("stdin");
    let mut child = sora()
        .args([
            "gen",
            "--model",
            &tiny(),
            "--prompts",
            "-",
            "--frames",
            "1",
            "-o",
        ])
        .arg(&d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(files_in(&d), vec!["001-one.png", "002-two.png"]);
}

#[test]
fn cli_resolves_hub_repos_from_the_cache_offline() {
    let d = tmp("hub");
    let cache = d.join("hub");
    let repo = cache.join("models--acme--wan-tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    std::os::unix::fs::symlink(fixture("wan-tiny"), repo.join("snapshots/0123abcd")).unwrap();
    let out = d.join("h.png");
    let (code, stdout, stderr) = run(sora()
        .env("HF_HUB_CACHE", &cache)
        .args([
            "gen",
            "--model",
            "acme/wan-tiny",
            "--offline",
            "--frames",
            "1",
            "--prompt",
            "x",
            "-o",
        ])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote"));
    // Not cached + offline (flag or HF_HUB_OFFLINE): a clear error, nothing downloaded.
    for offline_env in [false, true] {
        let mut c = sora();
        c.env("HF_HUB_CACHE", &cache)
            .args(["gen", "--model", "acme/other", "--prompt", "x", "-o"])
            .arg(d.join("o.mp4"));
        if offline_env {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.arg("--offline");
        }
        let (code, _, stderr) = run(&mut c);
        assert_eq!(code, 2);
        assert!(
            stderr.contains("acme/other")
                && stderr.contains("not in the Hugging Face cache")
                && stderr.contains("offline"),
            "{stderr}"
        );
    }
    assert_eq!(files_in(&d), vec!["h.png", "hub"]);
}

#[test]
fn cli_bad_input_is_refused_clearly_and_writes_nothing() {
    let d = tmp("bad");
    let empty_model = d.join("empty-model");
    std::fs::create_dir(&empty_model).unwrap();
    let empty_prompts = d.join("empty.txt");
    std::fs::write(&empty_prompts, "# only a comment\n\n").unwrap();
    let latin1 = d.join("latin1.txt");
    std::fs::write(&latin1, b"a caf\xe9 scene\n").unwrap();
    let out = d.join("o.mp4").display().to_string();
    let m = tiny();
    let empty_model_s = empty_model.display().to_string();
    let empty_prompts_s = empty_prompts.display().to_string();
    let latin1_s = latin1.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", "no-such-model", "--prompt", "x"],
            "unknown model \"no-such-model\"",
        ),
        (
            vec!["--model", &empty_model_s, "--prompt", "x"],
            "missing tokenizer/tokenizer.json, text_encoder/config.json",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--res", "0x0"],
            "at least 1",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--res", "99999x99999"],
            "too large",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--secs", "-1"],
            "--secs -1 must be a positive",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--secs", "0"],
            "--secs 0 must be a positive",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--steps", "0"],
            "--steps 0",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--frames", "8"],
            "--frames 8 cannot be honoured",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--device", "tpu"],
            "unknown device \"tpu\"",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--device", "cuda"],
            "--features cuda",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--device", "metal"],
            "--features metal",
        ),
        (
            vec!["--model", &m, "--prompts", &empty_prompts_s],
            "has no prompts",
        ),
        (
            vec!["--model", &m, "--prompts", &latin1_s],
            "not valid UTF-8 (line 1)",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--cfg-late", "-1"],
            "--cfg-late -1 must be a non-negative",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--cfg-late-below", "1.5"],
            "--cfg-late-below 1.5 must be a noise level in (0, 1]",
        ),
        (
            vec![
                "--model",
                &m,
                "--prompt",
                "x",
                "--cfg-late",
                "2",
                "--cfg-late-below",
                "0",
            ],
            "--cfg-late-below 0 must be",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--guider", "sharpen"],
            "unknown guider \"sharpen\"",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--guider", "apg:eta"],
            "guider setting \"eta\" in \"apg:eta\" is not of the form name=value",
        ),
        (
            vec![
                "--model",
                &m,
                "--prompt",
                "x",
                "--guider",
                "zero-star:eta=0",
            ],
            "guider \"zero-star\" has no setting \"eta\": it takes zero-init-steps",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--guider", "apg:momentum=1"],
            "APG momentum 1 must be in (-1, 1)",
        ),
        (
            vec!["--model", &m, "--prompt", "x", "--guider", "fdg:high=x"],
            "guider setting high=\"x\" in \"fdg:high=x\" is not a number",
        ),
        (vec!["--model", &m], "give --prompt TEXT or --prompts FILE"),
        (vec!["--model", &m, "--prompt", "   "], "prompt is empty"),
    ];
    for (args, expect) in cases {
        let (code, stdout, stderr) = run(sora().arg("gen").args(&args).args(["-o", &out]));
        assert_eq!(code, 2, "{args:?} should exit 2; stderr: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected {expect:?} in: {stderr}"
        );
        assert!(stdout.is_empty(), "{args:?} printed a result: {stdout}");
    }
    // An output directory that does not exist.
    let (code, _, stderr) = run(sora()
        .args(["gen", "--model", &m, "--prompt", "x", "-o"])
        .arg(d.join("missing/dir/o.mp4")));
    assert_eq!(code, 1);
    assert!(stderr.contains("does not exist"), "{stderr}");
    let mut left = files_in(&d);
    left.retain(|f| !["empty-model", "empty.txt", "latin1.txt"].contains(&f.as_str()));
    assert!(left.is_empty(), "files were written: {left:?}");
}

#[test]
fn cli_help_lists_flags_and_examples() {
    let (code, stdout, _) = run(sora().args(["gen", "--help"]));
    assert_eq!(code, 0);
    for flag in [
        "--prompt",
        "--negative-prompt",
        "--res",
        "--secs",
        "--fps",
        "--frames",
        "--steps",
        "--cfg",
        "--shift",
        "--sampler",
        "--guider",
        "--seed",
        "--model",
        "--out",
        "--device",
        "--dtype",
        "--quiet",
        "--json",
        "--prompts",
        "--skip-existing",
        "--init-noise",
        "--frames-out",
        "--offline",
        "--threads",
        "Examples:",
    ] {
        assert!(stdout.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn cli_bundled_model_is_the_default_and_deterministic() {
    let d = tmp("bundled");
    let mut runs = Vec::new();
    for i in 0..2 {
        let fd = d.join(format!("frames-{i}"));
        let out = d.join(format!("b{i}.mp4"));
        let (code, _, stderr) = run(sora()
            .args([
                "gen",
                "--prompt",
                "a red circle moving right on a black background",
                "--seed",
                "7",
                "--frames-out",
            ])
            .arg(&fd)
            .arg("-o")
            .arg(&out));
        assert_eq!(code, 0, "{stderr}");
        let p = probe(&out);
        let s = &p["streams"][0];
        assert_eq!(
            (s["width"].as_u64(), s["height"].as_u64()),
            (Some(64), Some(64))
        );
        assert_eq!(s["nb_read_frames"], "17");
        assert_eq!(s["r_frame_rate"], "8/1");
        assert_eq!(p["format"]["duration"], "2.125000");
        runs.push((read_frames(&fd, 17), packet_hashes(&out)));
    }
    assert!(
        runs[0].0 == runs[1].0,
        "the bundled model is not deterministic for a seed"
    );
    // The encoded stream too, packet by packet (the container's creation time differs).
    assert_eq!(runs[0].1.len(), 17);
    assert!(
        runs[0].1 == runs[1].1,
        "same frames, different H.264 packets: the encoder is not deterministic"
    );
}

/// MD5 of every packet of the file's video stream, in order (ffprobe).
fn packet_hashes(p: &Path) -> Vec<String> {
    let out = ffprobe(
        p,
        &[
            "-show_data_hash",
            "MD5",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=data_hash",
            "-of",
            "csv=p=0",
        ],
    );
    String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn cli_long_clip_uses_temporal_windows_and_is_exact() {
    let d = tmp("long");
    let out = d.join("long.mp4");
    let (code, stdout, stderr) = run(sora()
        .args([
            "gen",
            "--prompt",
            "a blue square moving up on a gray background",
            "--secs",
            "6",
            "--steps",
            "4",
            "--json",
            "-o",
        ])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["frames"], 48);
    // The decode stage's time, split into the VAE's part and the encoder's (sink's) part.
    let t = &v["timings"];
    let (all, vae, write) = (
        t["decode_and_write"].as_f64().unwrap(),
        t["vae_decode"].as_f64().unwrap(),
        t["write"].as_f64().unwrap(),
    );
    assert!(vae > 0.0 && write > 0.0, "{t}");
    assert!((vae + write - all).abs() < 1e-6, "{t}");
    let p = probe(&out);
    assert_eq!(p["streams"][0]["nb_read_frames"], "48");
    assert_eq!(p["format"]["duration"], "6.000000");
    // The plan: 49 generated frames = 13 latent frames in windows of 5.
    let (code, stdout, _) = run(sora()
        .args([
            "gen",
            "--prompt",
            "x",
            "--secs",
            "6",
            "--dry-run",
            "--json",
            "-o",
        ])
        .arg(d.join("p.mp4")));
    assert_eq!(code, 0);
    let plan: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(plan["estimate"]["latent"][1], 13);
    assert!(plan["estimate"]["windows"].as_u64().unwrap() >= 3, "{plan}");
    assert!(!d.join("p.mp4").exists(), "--dry-run wrote an output");
}

#[test]
fn train_rejects_bad_dit_overrides_before_touching_the_directory() {
    let d = tmp("train-bad-weight");
    let out = d.join("run");
    // Each rejected flag, and what its error must quote.
    let cases: [(&[&str], &str, &str); 11] = [
        (&["--dit-object-weight=-1"], "--dit-object-weight", "-1"),
        (&["--dit-sigma-shift", "0"], "--dit-sigma-shift", "got 0"),
        (&["--dit-cfg-dropout", "1"], "--dit-cfg-dropout", "got 1"),
        (&["--dit-layers", "0"], "--dit-layers", "got 0"),
        (&["--clips", "0"], "--clips", "got 0"),
        (&["--dit-lr", "0"], "--dit-lr", "got 0"),
        (
            &["--dit-init", "/no/such/model"],
            "--dit-init",
            "/no/such/model: no such file",
        ),
        (
            &["--dit-init", "/"],
            "--dit-init",
            "/transformer/diffusion_pytorch_model.safetensors nor /diffusion_pytorch_model.safetensors",
        ),
        (
            &["--dit-oversample", "red"],
            "--dit-oversample",
            "WORD=FACTOR",
        ),
        (
            &["--dit-oversample", "kite=2"],
            "--dit-oversample",
            "\"kite\" is not a word",
        ),
        (
            &["--dit-oversample", "red=-2"],
            "--dit-oversample",
            "got -2",
        ),
    ];
    for (flag, name, value) in cases {
        let (code, _, stderr) = run(sora()
            .args(["train", "dit"])
            .args(flag)
            .arg("--out")
            .arg(&out));
        assert_ne!(code, 0, "{flag:?} was accepted");
        assert!(
            stderr.contains(name) && stderr.contains(value),
            "{flag:?}: {stderr}"
        );
        assert!(!out.exists(), "nothing is created for a rejected run");
    }
}

#[test]
fn train_dit_override_flags_reach_the_recipe() {
    let d = tmp("train-weight");
    let out = d.join("run");
    let (code, _, stderr) = run(sora()
        .args([
            "train",
            "all",
            "--smoke",
            "--quiet",
            "--dit-object-weight",
            "0",
            "--dit-sigma-shift",
            "1.5",
            "--dit-layers",
            "3",
            "--dit-cfg-dropout",
            "0.25",
            "--dit-oversample",
            "Red=3",
            "--dit-oversample",
            "square=2",
            "--decoder-dit-oversample",
            "red=3",
            "--dit-train-text",
            "--out",
        ])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("recipe.json")).unwrap()).unwrap();
    assert_eq!(r["dit_object_weight"], 0.0, "{r}");
    assert_eq!(r["dit_sigma_shift"], 1.5, "{r}");
    assert_eq!(r["dit"]["num_layers"], 3, "{r}");
    assert_eq!(r["cfg_dropout"], 0.25, "{r}");
    assert_eq!(r["dit_train_text"], true, "{r}");
    assert_eq!(
        r["dit_oversample"],
        serde_json::json!([["red", 3.0], ["square", 2.0]]),
        "{r}"
    );
    assert_eq!(
        r["decoder_dit_oversample"],
        serde_json::json!([["red", 3.0]]),
        "{r}"
    );
    assert!(out
        .join("transformer/diffusion_pytorch_model.safetensors")
        .is_file());
}

#[test]
fn train_dit_init_fine_tunes_from_the_given_weights() {
    let d = tmp("train-dit-init");
    let base = d.join("base");
    let (code, _, stderr) = run(sora()
        .args(["train", "all", "--smoke", "--quiet", "--out"])
        .arg(&base));
    assert_eq!(code, 0, "{stderr}");
    let dit = "transformer/diffusion_pytorch_model.safetensors";
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join(dit), &candle_core::Device::Cpu).unwrap()
    };
    // Start weights unlike anything the recipe makes: the base DiT shifted by 0.25 everywhere,
    // given as a safetensors file.
    let shifted: std::collections::HashMap<String, candle_core::Tensor> = load(&base)
        .into_iter()
        .map(|(k, v)| {
            let v = (v + 0.25).unwrap();
            (k, v)
        })
        .collect();
    let start = d.join("start.safetensors");
    candle_core::safetensors::save(&shifted, &start).unwrap();
    // The same weights as a bare transformer directory (what a training directory's
    // `transformer/` is).
    let start_dir = d.join("start-transformer");
    std::fs::create_dir_all(&start_dir).unwrap();
    std::fs::copy(
        &start,
        start_dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    // One step at a vanishing learning rate: the result is the start (the exported EMA too),
    // given as a file or as a transformer directory; the same run without --dit-init is not.
    let mut runs = Vec::new();
    for (i, init) in [Some(&start), Some(&start_dir), None]
        .into_iter()
        .enumerate()
    {
        let out = d.join(format!("ft-{i}"));
        let mut cmd = sora();
        cmd.args([
            "train",
            "all",
            "--smoke",
            "--quiet",
            "--dit-steps",
            "1",
            "--dit-lr",
            "1e-12",
            "--clips",
            "24",
        ]);
        if let Some(init) = init {
            cmd.arg("--dit-init").arg(init);
        }
        let (code, _, stderr) = run(cmd.arg("--out").arg(&out));
        assert_eq!(code, 0, "{stderr}");
        runs.push(out);
    }
    let worst = |dir: &Path| {
        let t = load(dir);
        assert_eq!(t.len(), shifted.len());
        shifted
            .iter()
            .map(|(k, v)| max_abs_diff(v, &t[k]))
            .fold(0f32, f32::max)
    };
    assert!(
        worst(&runs[0]) < 1e-5,
        "fine-tune moved from its start: {}",
        worst(&runs[0])
    );
    assert!(
        worst(&runs[1]) < 1e-5,
        "fine-tune from a transformer directory moved from its start: {}",
        worst(&runs[1])
    );
    assert!(
        worst(&runs[2]) > 0.2,
        "the run without --dit-init ended at the start weights"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs[0].join("recipe.json")).unwrap())
            .unwrap();
    assert_eq!(r["dit_lr"], 1e-12, "{r}");
    assert_eq!(r["clips"], 24, "{r}");
    assert_eq!(r["dit_init"], start.display().to_string(), "{r}");
}

#[test]
fn train_decoder_dit_stage_changes_only_the_decoder() {
    let d = tmp("train-decoder-dit");
    let load = |dir: &Path, file: &str| {
        candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu).unwrap()
    };
    let mut dirs = Vec::new();
    for steps in ["0", "3"] {
        let out = d.join(format!("run-{steps}"));
        let (code, _, stderr) = run(sora()
            .args([
                "train",
                "all",
                "--smoke",
                "--quiet",
                "--decoder-dit-steps",
                steps,
                "--out",
            ])
            .arg(&out));
        assert_eq!(code, 0, "{stderr}");
        dirs.push(out);
    }
    assert!(
        !dirs[0].join("work-vae-dit/done").exists(),
        "0 steps skips the stage"
    );
    assert!(dirs[1].join("work-vae-dit/done").is_file());
    let dit = "transformer/diffusion_pytorch_model.safetensors";
    let vae = "vae/diffusion_pytorch_model.safetensors";
    // Same seed: everything before the stage is identical; the stage moves the decoder only.
    let (d0, d1) = (load(&dirs[0], dit), load(&dirs[1], dit));
    assert!(
        d0.iter().all(|(k, v)| max_abs_diff(v, &d1[k]) == 0.0),
        "the DiT is frozen"
    );
    let (v0, v1) = (load(&dirs[0], vae), load(&dirs[1], vae));
    assert_eq!(v0.len(), v1.len());
    let mut moved = 0;
    for (k, a) in &v0 {
        let diff = max_abs_diff(a, &v1[k]);
        if k.starts_with("decoder.") || k.starts_with("post_quant_conv.") {
            moved += usize::from(diff > 0.0);
        } else {
            assert_eq!(
                diff, 0.0,
                "{k} changed, but only the decoder trains in this stage"
            );
        }
    }
    assert!(moved > 0, "no decoder tensor changed in 3 steps");
    let log = std::fs::read_to_string(dirs[1].join("work-vae-dit/loss.csv")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        3,
        "{log}"
    );
}
