//! sora: text-to-video generation in Rust on candle.
//!
//! The data path runs one way: prompt → tokenizer → text encoder → context; seeded noise latent
//! → DiT denoising loop (scheduler) → VAE decoder → frames → MP4. See `README.md`.

pub mod cli;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod sched;
pub mod train;
pub mod video;
pub mod weights;
