//! Wan's 3D rotary position embedding: the head dim is split into (t, h, w) parts
//! (`h = w = 2·(head_dim/6)`, `t = head_dim − h − w`), each rotating interleaved pairs with its
//! own frequencies `1/θ^(2j/d_axis)` at integer (frame, row, column) positions of the
//! post-patch grid. Tables are computed in f64 and stored in f32, as diffusers does.

use candle_core::{Device, Result, Tensor};

/// The per-axis split of a head dim, and θ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WanRope {
    pub t_dim: usize,
    pub h_dim: usize,
    pub w_dim: usize,
    pub theta: f64,
}

impl WanRope {
    pub fn new(head_dim: usize) -> Self {
        let h_dim = 2 * (head_dim / 6);
        Self {
            t_dim: head_dim - 2 * h_dim,
            h_dim,
            w_dim: h_dim,
            theta: 10_000.0,
        }
    }

    /// `(cos, sin)`, each `[F·H·W, head_dim/2]` f32, for the token grid `(f, h, w)` in row-major
    /// (t, y, x) order, with positions starting at `offset` on each axis (non-zero for windows
    /// of a longer or larger video). Pair `j` of the head uses column `j`.
    pub fn tables(
        &self,
        grid: (usize, usize, usize),
        offset: (usize, usize, usize),
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (f, h, w) = grid;
        let axis = |dim: usize, n: usize, off: usize| -> (Vec<f32>, Vec<f32>) {
            let half = dim / 2;
            let freqs: Vec<f64> = (0..half)
                .map(|j| 1.0 / self.theta.powf((2 * j) as f64 / dim as f64))
                .collect();
            let mut cos = Vec::with_capacity(n * half);
            let mut sin = Vec::with_capacity(n * half);
            for p in 0..n {
                for fr in &freqs {
                    let a = (p + off) as f64 * fr;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
            (cos, sin)
        };
        let (tc, ts) = axis(self.t_dim, f, offset.0);
        let (hc, hs) = axis(self.h_dim, h, offset.1);
        let (wc, ws) = axis(self.w_dim, w, offset.2);
        let (th, hh, wh) = (self.t_dim / 2, self.h_dim / 2, self.w_dim / 2);
        let half = th + hh + wh;
        let n = f * h * w;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for i in 0..f {
            for j in 0..h {
                for k in 0..w {
                    cos.extend_from_slice(&tc[i * th..(i + 1) * th]);
                    cos.extend_from_slice(&hc[j * hh..(j + 1) * hh]);
                    cos.extend_from_slice(&wc[k * wh..(k + 1) * wh]);
                    sin.extend_from_slice(&ts[i * th..(i + 1) * th]);
                    sin.extend_from_slice(&hs[j * hh..(j + 1) * hh]);
                    sin.extend_from_slice(&ws[k * wh..(k + 1) * wh]);
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, half), device)?,
            Tensor::from_vec(sin, (n, half), device)?,
        ))
    }
}

/// Rotates interleaved pairs: `x`: `[B, H, N, D]`, `cos`/`sin`: `[N, D/2]`.
/// `out[2j] = x[2j]·cos − x[2j+1]·sin`, `out[2j+1] = x[2j]·sin + x[2j+1]·cos`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let cos = cos.to_dtype(dtype)?;
    let sin = sin.to_dtype(dtype)?;
    crate::nn::fused::rope_interleaved(x, &cos, &sin)
}
