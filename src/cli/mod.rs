//! The `sora` command line: clap definitions ([`args`]), validated plans ([`plan`]) and their
//! execution ([`run`]).

pub mod args;
pub mod plan;
pub mod progress;
pub mod run;
pub mod train;

pub use args::{Cli, Command, GenArgs};
