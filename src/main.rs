//! `sora`: parse the command line, run it, map errors to exit codes.

use clap::Parser;
use sora::cli::run::{run_gen, UsageError, EXIT_FAILED, EXIT_USAGE};
use sora::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Gen(args) => {
            if let Some(n) = args.threads {
                // Read by candle's GEMM and rayon's pool, both created on first use.
                std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
            }
            match run_gen(args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    if e.downcast_ref::<UsageError>().is_some() {
                        EXIT_USAGE
                    } else {
                        EXIT_FAILED
                    }
                }
            }
        }
    };
    std::process::exit(code);
}
