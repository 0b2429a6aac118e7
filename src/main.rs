//! `sora`: parse the command line, run it, map errors to exit codes.

use clap::Parser;
use sora::cli::run::{run_gen, UsageError, EXIT_FAILED, EXIT_USAGE};
use sora::cli::train::{run_eval, run_train};
use sora::cli::{Cli, Command};

fn set_threads(n: Option<usize>) {
    if let Some(n) = n {
        // Read by candle's GEMM and rayon's pool, both created on first use.
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
}

fn main() {
    let cli = Cli::parse();
    // Freed memory kept mapped (MiB): a training step frees and reallocates its whole graph.
    sora::nn::tune_allocator(match cli.command {
        Command::Train(_) => 2048,
        _ => 256,
    });
    let result = match cli.command {
        Command::Gen(args) => {
            set_threads(args.threads);
            run_gen(*args)
        }
        Command::Train(args) => {
            set_threads(args.threads);
            // Training runs one single-threaded batch shard per core (train::looper); candle's
            // own worker pool, created on first use, would only compete with them for cores.
            if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
                std::env::set_var("CANDLE_NUM_THREADS", "1");
            }
            run_train(args)
        }
        Command::Eval(args) => {
            set_threads(args.threads);
            run_eval(args)
        }
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            }
        }
    };
    std::process::exit(code);
}
