//! Building blocks candle lacks: causal 3D convolution, the attention entry point, and the
//! float32 norms the Wan family uses.

pub mod attention;
pub mod conv3d;
pub mod norm;

pub use attention::attention;
pub use conv3d::CausalConv3d;
