//! Frames out: conversion from decoder tensors to 8-bit RGB, H.264/MP4 through ffmpeg-next
//! (yuv420p, `+faststart`, metadata), PNG images, and outputs that appear only when complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// One packed RGB24 frame.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbFrame {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes, row-major.
    pub data: Vec<u8>,
}

/// Converts decoded video `[3, T, H, W]` in [-1, 1] (one batch item) into 8-bit frames:
/// `round(clamp((x + 1) / 2, 0, 1) · 255)`, cropped to `crop = (top, left, height, width)`.
pub fn tensor_to_frames(
    video: &Tensor,
    crop: Option<(usize, usize, usize, usize)>,
) -> Result<Vec<RgbFrame>> {
    let (c, t, h, w) = video.dims4()?;
    if c != 3 {
        bail!("expected 3 colour channels, got {c}");
    }
    let (top, left, ch, cw) = crop.unwrap_or((0, 0, h, w));
    if top + ch > h || left + cw > w {
        bail!("crop {ch}×{cw} at ({top}, {left}) exceeds the decoded {h}×{w} frame");
    }
    let v = video
        .narrow(2, top, ch)?
        .narrow(3, left, cw)?
        .to_dtype(DType::F32)?
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .round()?
        .permute((1, 2, 3, 0))? // [T, H, W, 3]
        .contiguous()?
        .to_dtype(DType::U8)?;
    let flat: Vec<u8> = v.flatten_all()?.to_vec1()?;
    let per = ch * cw * 3;
    Ok((0..t)
        .map(|i| RgbFrame {
            width: cw,
            height: ch,
            data: flat[i * per..(i + 1) * per].to_vec(),
        })
        .collect())
}

/// A file that is written under a temporary name in its target directory and renamed into
/// place by [`AtomicOutput::commit`]; dropped uncommitted (error, Ctrl-C), it is removed.
#[derive(Debug)]
pub struct AtomicOutput {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicOutput {
    /// Reserves a temporary path next to `dest` (same directory, so the rename is atomic).
    /// Fails early, naming the directory, when it is missing or not writable.
    pub fn new(dest: &Path) -> Result<Self> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            bail!(
                "output directory {} does not exist: create it or choose another --out",
                dir.display()
            );
        }
        let name = dest
            .file_name()
            .with_context(|| format!("output path {} has no file name", dest.display()))?
            .to_string_lossy()
            .into_owned();
        let ext = dest
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.sora-tmp-{}.{ext}", std::process::id()));
        std::fs::File::create(&tmp).with_context(|| {
            format!(
                "cannot write to {}: check permissions or choose another --out",
                dir.display()
            )
        })?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames the finished temporary file to its destination.
    pub fn commit(mut self) -> Result<PathBuf> {
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes one frame as PNG.
pub fn write_png(path: &Path, frame: &RgbFrame) -> Result<()> {
    image::save_buffer_with_format(
        path,
        &frame.data,
        frame.width as u32,
        frame.height as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .with_context(|| format!("cannot write PNG {}", path.display()))
}

/// H.264 (libx264 when present) in MP4: yuv420p, constant frame rate `fps`, `+faststart`,
/// key/value metadata in the container. Frames are encoded as they arrive.
pub struct Mp4Writer {
    octx: ffmpeg_next::format::context::Output,
    encoder: ffmpeg_next::encoder::Video,
    scaler: ffmpeg_next::software::scaling::Context,
    enc_time_base: ffmpeg_next::Rational,
    width: usize,
    height: usize,
    next_pts: i64,
    path: PathBuf,
}

fn ff<T>(r: std::result::Result<T, ffmpeg_next::Error>, what: &str, path: &Path) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what} for {}: {e}", path.display()))
}

impl Mp4Writer {
    /// Opens `path` (any extension; the container is MP4) for `width`×`height` at `fps`.
    pub fn create(
        path: &Path,
        width: usize,
        height: usize,
        fps: u32,
        metadata: &[(String, String)],
    ) -> Result<Self> {
        use ffmpeg_next::{codec, encoder, format, software, util, Dictionary, Rational};
        if !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            bail!(
                "MP4 (yuv420p) needs even dimensions, got {width}×{height}: choose an even --res"
            );
        }
        ff(ffmpeg_next::init(), "initialising FFmpeg", path)?;
        util::log::set_level(util::log::Level::Error);
        let mut octx = ff(
            format::output_as(path, "mp4"),
            "creating the MP4 container",
            path,
        )?;
        let global_header = octx.format().flags().contains(format::Flags::GLOBAL_HEADER);
        let codec = encoder::find_by_name("libx264")
            .or_else(|| encoder::find(codec::Id::H264))
            .context("this FFmpeg has no H.264 encoder: install libavcodec with libx264 (Debian: libavcodec-dev)")?;
        let mut ost = ff(octx.add_stream(codec), "adding the video stream", path)?;
        let mut enc = ff(
            codec::context::Context::new_with_codec(codec)
                .encoder()
                .video(),
            "creating the H.264 encoder",
            path,
        )?;
        let tb = Rational::new(1, fps as i32);
        enc.set_width(width as u32);
        enc.set_height(height as u32);
        enc.set_format(format::Pixel::YUV420P);
        enc.set_time_base(tb);
        enc.set_frame_rate(Some(Rational::new(fps as i32, 1)));
        if global_header {
            enc.set_flags(codec::Flags::GLOBAL_HEADER);
        }
        let mut opts = Dictionary::new();
        opts.set("preset", "medium");
        opts.set("crf", "17");
        // Without macroblock-tree rate control: with it, this libx264 (core 164) encoded the
        // B-frames of identical input frames differently from run to run (packets from the
        // first B-frame on; three runs, three streams), so the same seed did not give the same
        // file. Without it (B-frames kept) every run is identical. Costs some bitrate at the
        // same CRF, not quality.
        opts.set("x264-params", "mbtree=0");
        let encoder = ff(enc.open_with(opts), "opening the H.264 encoder", path)?;
        ost.set_parameters(&encoder);
        ost.set_time_base(tb);
        ost.set_avg_frame_rate(Rational::new(fps as i32, 1));
        let mut meta = Dictionary::new();
        for (k, v) in metadata {
            meta.set(k, v);
        }
        octx.set_metadata(meta);
        let mut mux_opts = Dictionary::new();
        mux_opts.set("movflags", "+faststart+use_metadata_tags");
        ff(
            octx.write_header_with(mux_opts),
            "writing the MP4 header",
            path,
        )?;
        let scaler = ff(
            software::scaling::Context::get(
                format::Pixel::RGB24,
                width as u32,
                height as u32,
                format::Pixel::YUV420P,
                width as u32,
                height as u32,
                software::scaling::Flags::BICUBIC
                    | software::scaling::Flags::ACCURATE_RND
                    | software::scaling::Flags::FULL_CHR_H_INT,
            ),
            "creating the RGB→YUV converter",
            path,
        )?;
        Ok(Self {
            octx,
            encoder,
            scaler,
            enc_time_base: tb,
            width,
            height,
            next_pts: 0,
            path: path.to_path_buf(),
        })
    }

    fn drain(&mut self) -> Result<()> {
        let mut packet = ffmpeg_next::Packet::empty();
        let ost_tb = self.octx.stream(0).expect("one stream").time_base();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            // FFmpeg 5.1 leaves the duration 0, which shortens the file by one frame.
            packet.set_duration(1);
            packet.rescale_ts(self.enc_time_base, ost_tb);
            ff(
                packet.write_interleaved(&mut self.octx),
                "writing a packet",
                &self.path,
            )?;
        }
        Ok(())
    }

    /// Encodes one frame (must be `width`×`height`).
    pub fn write(&mut self, frame: &RgbFrame) -> Result<()> {
        use ffmpeg_next::{format::Pixel, frame::Video};
        if frame.width != self.width || frame.height != self.height {
            bail!(
                "frame is {}×{} but the video is {}×{}",
                frame.width,
                frame.height,
                self.width,
                self.height
            );
        }
        let mut rgb = Video::new(Pixel::RGB24, self.width as u32, self.height as u32);
        let stride = rgb.stride(0);
        let row = self.width * 3;
        {
            let dst = rgb.data_mut(0);
            for y in 0..self.height {
                dst[y * stride..y * stride + row]
                    .copy_from_slice(&frame.data[y * row..(y + 1) * row]);
            }
        }
        let mut yuv = Video::empty();
        ff(
            self.scaler.run(&rgb, &mut yuv),
            "converting RGB to YUV",
            &self.path,
        )?;
        yuv.set_pts(Some(self.next_pts));
        self.next_pts += 1;
        ff(
            self.encoder.send_frame(&yuv),
            "encoding a frame",
            &self.path,
        )?;
        self.drain()
    }

    /// Flushes the encoder and writes the trailer (the `moov` atom, moved to the front).
    pub fn finish(mut self) -> Result<()> {
        ff(self.encoder.send_eof(), "flushing the encoder", &self.path)?;
        self.drain()?;
        ff(
            self.octx.write_trailer(),
            "writing the MP4 trailer",
            &self.path,
        )?;
        Ok(())
    }

    pub fn frames_written(&self) -> i64 {
        self.next_pts
    }
}
