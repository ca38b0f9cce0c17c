use clap::Parser;

// glibc's allocator showed up as about a fifth of the server's CPU time under load (lock
// contention and chunk consolidation); mimalloc's per-thread heaps avoid both.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // sqlx uses ring and other crates aws-lc-rs: pick one provider before any TLS is made.
    let _ = rustls::crypto::ring::default_provider().install_default();
    api::telemetry::init();
    match api::cli::run(api::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("essayflow: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
