//! The one attention entry point. Small problems take the direct path (one score matrix);
//! large ones are computed block by block with an online softmax, so memory stays bounded by
//! the block size whatever the token count (a 480p Wan video has 32,760 tokens).

use candle_core::{DType, Result, Tensor, D};

/// Score-matrix elements (B·H·Nq·Nk) above which attention is computed block-wise.
pub const DIRECT_LIMIT: usize = 1 << 24;
/// Query and key rows per block in the block-wise path.
pub const BLOCK_Q: usize = 1024;
pub const BLOCK_K: usize = 2048;

/// Scaled dot-product attention.
///
/// `q`: `[B, H, Nq, D]`, `k`/`v`: `[B, H, Nk, D]`, `bias`: additive, broadcastable to
/// `[B, H, Nq, Nk]` (relative-position bias, padding mask). Returns `[B, H, Nq, D]`.
/// Softmax statistics are kept in f32 whatever the input dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    if b * h * nq * nk <= DIRECT_LIMIT {
        direct(q, k, v, scale, bias)
    } else {
        blockwise(q, k, v, scale, bias, BLOCK_Q, BLOCK_K)
    }
}

fn direct(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    // The fused node takes the bias as a constant; a bias that trains (UMT5's relative
    // position bias, when the text encoder trains) takes the composed graph, which reaches it.
    if super::fused::fast_grads(q) && !bias.is_some_and(Tensor::track_op) {
        return super::fused::attention_trainable(q, k, v, scale, bias);
    }
    let dtype = q.dtype();
    let q = q.contiguous()?;
    let kt = k.t()?.contiguous()?;
    let mut s = (q.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
    if let Some(bias) = bias {
        s = s.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    }
    let p = super::fused::softmax_last_dim(&s)?.to_dtype(dtype)?;
    p.matmul(&v.contiguous()?)
}

/// Flash-style attention: for each query block, a running max `m`, running sum `l` and
/// accumulator `acc` are updated key block by key block. Exact up to float rounding.
pub fn blockwise(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
    block_q: usize,
    block_k: usize,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (_, _, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let kt_full = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let bias = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?),
        None => None,
    };
    let mut outs = Vec::with_capacity(nq.div_ceil(block_q));
    let mut q0 = 0;
    while q0 < nq {
        let bq = block_q.min(nq - q0);
        let qb = (q.narrow(2, q0, bq)?.contiguous()? * scale)?;
        let mut m: Option<Tensor> = None;
        let mut l: Option<Tensor> = None;
        let mut acc: Option<Tensor> = None;
        let mut k0 = 0;
        while k0 < nk {
            let bk = block_k.min(nk - k0);
            let ktb = kt_full.narrow(3, k0, bk)?;
            let vb = v.narrow(2, k0, bk)?;
            let mut s = qb.matmul(&ktb)?.to_dtype(DType::F32)?;
            if let Some(bias) = &bias {
                let bb = narrow_bias(bias, q0, bq, k0, bk)?;
                s = s.broadcast_add(&bb)?;
            }
            let s_max = s.max_keepdim(D::Minus1)?;
            let m_new = match &m {
                Some(m) => m.maximum(&s_max)?,
                None => s_max,
            };
            let p = s.broadcast_sub(&m_new)?.exp()?;
            let p_sum = p.sum_keepdim(D::Minus1)?;
            let pv = p.to_dtype(dtype)?.matmul(&vb)?.to_dtype(DType::F32)?;
            match (&m, &l, &acc) {
                (Some(m_old), Some(l_old), Some(a_old)) => {
                    let alpha = (m_old - &m_new)?.exp()?;
                    l = Some(((l_old * &alpha)? + p_sum)?);
                    acc = Some((a_old.broadcast_mul(&alpha)? + pv)?);
                }
                _ => {
                    l = Some(p_sum);
                    acc = Some(pv);
                }
            }
            m = Some(m_new);
            k0 += bk;
        }
        let out = acc
            .expect("at least one key block")
            .broadcast_div(&l.expect("at least one key block"))?;
        outs.push(out.to_dtype(dtype)?);
        q0 += bq;
    }
    Tensor::cat(&outs, 2)
}

fn narrow_bias(bias: &Tensor, q0: usize, bq: usize, k0: usize, bk: usize) -> Result<Tensor> {
    let rank = bias.rank();
    let mut b = bias.clone();
    if b.dim(rank - 2)? > 1 {
        b = b.narrow(rank - 2, q0, bq)?;
    }
    if b.dim(rank - 1)? > 1 {
        b = b.narrow(rank - 1, k0, bk)?;
    }
    Ok(b)
}
