//! `depthc` binary: argument parsing, dispatch and exit codes only.
//! Exit codes: 0 success, 1 error (one line on stderr), 2 bad usage (clap),
//! 130 interrupted (partial output removed).

mod cli;
mod commands;

use std::sync::Arc;

use clap::Parser;

use cli::{Cli, Command};
use commands::{compile, model, onnx};
use depthc::model::WeightCache;

fn main() {
    // Die quietly on a closed pipe (`depthc inspect MODEL | head`), as command
    // line tools do, instead of panicking on the next print.
    #[cfg(unix)]
    // SAFETY: resetting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let weight_cache = WeightCache::new(
        cli.weight_cache
            .map_or_else(WeightCache::budget_for_this_machine, |mib| {
                mib.saturating_mul(1 << 20)
            }),
    );
    depthc::output::remove_partial_outputs_on_interrupt();
    // The command runs on a worker of the thread pool, so that a parallel
    // part wakes one other thread, not all of them while this one sleeps.
    rayon::ThreadPoolBuilder::new()
        .stack_size(16 << 20)
        .build_global()
        .expect("the thread pool is built once, first");
    let result = rayon::scope(|_| run(cli.command, &weight_cache));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Every model a command loads keeps its widened weights in `weight_cache`
/// (`--weight-cache`).
fn run(command: Command, weight_cache: &Arc<WeightCache>) -> anyhow::Result<()> {
    match command {
        Command::Inspect(a) => model::inspect(a),
        Command::Eval(a) => model::eval(a, weight_cache),
        Command::Convert(a) => model::convert(a, weight_cache),
        Command::BenchForward(a) => model::bench_forward(a, weight_cache),
        Command::Emit(a) => onnx::emit(a, weight_cache),
        Command::Validate(a) => onnx::validate(a, weight_cache),
        Command::Bench(a) => onnx::bench_command(a),
        Command::Search(a) => compile::search_command(a, weight_cache),
        Command::Compile(a) => compile::compile_command(a, weight_cache),
    }
}
