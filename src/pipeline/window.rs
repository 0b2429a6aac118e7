//! Windowed denoising for clips longer or frames larger than a model was trained on: the
//! latent is covered by overlapping windows of the model's native size along time (and, when
//! asked, along height and width); each step runs the DiT on every window and blends the
//! velocities with linear ramps in the overlaps, so the whole clip is one denoising, not glued
//! clips. RoPE positions are the window's absolute positions; since RoPE attention depends
//! only on position differences, a window sees exactly what the model saw in training.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Windows along one axis of length `len`: size `win` (≤ len), overlap `overlap`, starts that
/// are multiples of `align`; the last window ends at `len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisWindows {
    pub len: usize,
    pub win: usize,
    pub starts: Vec<usize>,
}

impl AxisWindows {
    /// One window covering the whole axis.
    pub fn whole(len: usize) -> Self {
        Self {
            len,
            win: len,
            starts: vec![0],
        }
    }

    pub fn new(len: usize, win: usize, overlap: usize, align: usize) -> Result<Self> {
        if win == 0 || !win.is_multiple_of(align) {
            bail!("window size {win} must be a positive multiple of {align}");
        }
        if win >= len {
            return Ok(Self::whole(len));
        }
        if overlap >= win {
            bail!("overlap {overlap} must be smaller than the window {win}");
        }
        let stride = ((win - overlap) / align).max(1) * align;
        let mut starts = Vec::new();
        let mut s = 0;
        loop {
            if s + win >= len {
                let last = (len - win) / align * align;
                if starts.last() != Some(&last) {
                    starts.push(last);
                }
                break;
            }
            starts.push(s);
            s += stride;
        }
        // With alignment the last start may not reach the end: extend its window instead.
        Ok(Self { len, win, starts })
    }

    /// Size of window `i` (the last one is stretched to the end when alignment requires).
    pub fn size(&self, i: usize) -> usize {
        if i + 1 == self.starts.len() {
            self.len - self.starts[i]
        } else {
            self.win
        }
    }

    /// Blend weights of window `i`: 1 inside, rising linearly across the overlap with the
    /// previous window and falling across the overlap with the next one.
    pub fn weights(&self, i: usize) -> Vec<f32> {
        let start = self.starts[i];
        let size = self.size(i);
        let mut w = vec![1f32; size];
        if i > 0 {
            let prev_end = self.starts[i - 1] + self.size(i - 1);
            let ov = prev_end.saturating_sub(start).min(size);
            for (k, v) in w.iter_mut().take(ov).enumerate() {
                *v = v.min((k + 1) as f32 / (ov + 1) as f32);
            }
        }
        if i + 1 < self.starts.len() {
            let next = self.starts[i + 1];
            let ov = (start + size).saturating_sub(next).min(size);
            for k in 0..ov {
                let idx = size - 1 - k;
                w[idx] = w[idx].min((k + 1) as f32 / (ov + 1) as f32);
            }
        }
        w
    }

    pub fn count(&self) -> usize {
        self.starts.len()
    }
}

/// One axis of one window: `(index among the axis's windows, start, size)`.
pub type Span = (usize, usize, usize);
/// A window: its (t, h, w) spans.
pub type Window = [Span; 3];

/// Windows over (t, h, w) of a latent `[B, C, T, H, W]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowPlan {
    pub t: AxisWindows,
    pub h: AxisWindows,
    pub w: AxisWindows,
}

impl WindowPlan {
    pub fn count(&self) -> usize {
        self.t.count() * self.h.count() * self.w.count()
    }

    /// Every window as `((t0, tn), (h0, hn), (w0, wn))` with its index per axis.
    pub fn windows(&self) -> Vec<Window> {
        let mut v = Vec::with_capacity(self.count());
        for ti in 0..self.t.count() {
            for hi in 0..self.h.count() {
                for wi in 0..self.w.count() {
                    v.push([
                        (ti, self.t.starts[ti], self.t.size(ti)),
                        (hi, self.h.starts[hi], self.h.size(hi)),
                        (wi, self.w.starts[wi], self.w.size(wi)),
                    ]);
                }
            }
        }
        v
    }

    /// Largest window in latent cells (t·h·w).
    pub fn max_window_cells(&self) -> usize {
        let m = |a: &AxisWindows| (0..a.count()).map(|i| a.size(i)).max().unwrap_or(0);
        m(&self.t) * m(&self.h) * m(&self.w)
    }
}

/// Accumulates weighted window outputs into a full-size result on the CPU.
pub struct Blender {
    dims: [usize; 5],
    acc: Vec<f32>,
    wsum: Vec<f32>,
}

impl Blender {
    pub fn new(dims: [usize; 5]) -> Self {
        let n = dims.iter().product();
        let cells = dims[2] * dims[3] * dims[4];
        Self {
            dims,
            acc: vec![0.0; n],
            wsum: vec![0.0; cells],
        }
    }

    /// Adds `v` (`[B, C, tn, hn, wn]`) at offsets `(t0, h0, w0)` with per-axis weights.
    pub fn add(
        &mut self,
        v: &Tensor,
        at: (usize, usize, usize),
        wt: &[f32],
        wh: &[f32],
        ww: &[f32],
    ) -> Result<()> {
        let (b, c, tn, hn, wn) = v.dims5()?;
        let data: Vec<f32> = v.flatten_all()?.to_vec1()?;
        let [_, _, t, h, w] = self.dims;
        let (t0, h0, w0) = at;
        for (ti, wti) in wt.iter().enumerate().take(tn) {
            for (hi, whi) in wh.iter().enumerate().take(hn) {
                for (wi, wwi) in ww.iter().enumerate().take(wn) {
                    let wgt = wti * whi * wwi;
                    let cell = ((t0 + ti) * h + h0 + hi) * w + w0 + wi;
                    self.wsum[cell] += wgt;
                    for bc in 0..b * c {
                        let src = ((bc * tn + ti) * hn + hi) * wn + wi;
                        self.acc[bc * t * h * w + cell] += wgt * data[src];
                    }
                }
            }
        }
        Ok(())
    }

    /// The weighted average as a tensor of the full shape.
    pub fn finish(self, device: &Device) -> Result<Tensor> {
        let cells = self.wsum.len();
        let mut out = self.acc;
        for (i, v) in out.iter_mut().enumerate() {
            let s = self.wsum[i % cells];
            if s > 0.0 {
                *v /= s;
            }
        }
        Ok(Tensor::from_vec(out, self.dims.to_vec(), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_axis_with_the_requested_overlap() {
        let a = AxisWindows::new(121, 5, 2, 1).unwrap();
        assert_eq!(a.starts[..3], [0, 3, 6]);
        assert_eq!(*a.starts.last().unwrap() + a.size(a.count() - 1), 121);
        assert_eq!(
            a.weights(1),
            vec![1.0 / 3.0, 2.0 / 3.0, 1.0, 2.0 / 3.0, 1.0 / 3.0]
        );
        assert_eq!(AxisWindows::new(4, 5, 2, 1).unwrap(), AxisWindows::whole(4));
        let s = AxisWindows::new(270, 16, 4, 2).unwrap();
        assert!(s.starts.iter().all(|x| x % 2 == 0));
        assert_eq!(*s.starts.last().unwrap() + s.size(s.count() - 1), 270);
        // Every position has positive total weight.
        let mut tot = vec![0f32; 270];
        for i in 0..s.count() {
            for (k, w) in s.weights(i).iter().enumerate() {
                tot[s.starts[i] + k] += w;
            }
        }
        assert!(tot.iter().all(|v| *v > 0.0));
    }
}
