//! The one integration-test binary: parity against committed reference fixtures, loading
//! errors, the CLI (real binary), windows/tiles, the synthetic world and training.

mod cli;
mod common;
mod conv3d;
mod dit;
mod fused;
mod kernels;
mod pipeline;
mod sched;
mod train;
mod umt5;
mod vae;
mod world;
