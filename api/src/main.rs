//! The `hindsight` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use hindsight_api::config::Cli;

/// jemalloc rather than the C library's allocator, which took about a fifth of the server's
/// CPU under write load (measurements in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = hindsight_api::telemetry::init(cli.logging.log_format);
    let result = hindsight_api::run(cli).await;
    // Write out the queued log lines before the last word.
    drop(logs);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
