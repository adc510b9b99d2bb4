//! Log sink selection for both binaries: journald when systemd says stderr is the journal,
//! else a human formatter on stderr filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global logger. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && systemd_journal_logger::connected_to_journal()
    {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            if logger.install().is_ok() {
                // No tracing subscriber in this mode: tracing's `log` feature forwards events
                // to the `log` facade only when none is installed, and journald is behind it.
                log::set_max_level(log::LevelFilter::Info);
                drop(filter);
                return;
            }
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
