use std::process::ExitCode;

use botmetrics::config::Config;
use botmetrics::startup::{Application, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    botmetrics::memory::init();
    let config = Config::from_env_and_args();
    botmetrics::telemetry::init(config.log_format);
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("stopped with an error: {e}");
            ExitCode::FAILURE
        }
    }
}
