//! Building blocks candle lacks: causal 3D convolution, the attention entry point, and the
//! float32 norms the Wan family uses.

pub mod attention;
pub mod conv2d;
pub mod conv3d;
pub mod norm;

pub use attention::attention;

use std::cell::Cell;

thread_local! {
    /// Whether forward passes on this thread must be differentiable (training). Some fused
    /// candle kernels (softmax, interleaved RoPE) have no backward pass; with this set, the
    /// blocks that use them switch to compositions of differentiable ops with the same numbers.
    /// Per thread, so a training loop does not change how other threads run inference.
    static DIFFERENTIABLE: Cell<bool> = const { Cell::new(false) };
}

/// Turns the differentiable mode on or off for the calling thread (the trainer sets it).
pub fn set_differentiable(on: bool) {
    DIFFERENTIABLE.with(|d| d.set(on));
}

/// See [`set_differentiable`].
pub fn differentiable() -> bool {
    DIFFERENTIABLE.with(|d| d.get())
}
