use clap::Parser;

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
