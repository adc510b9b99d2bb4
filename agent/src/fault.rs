//! Fault injection for crash tests, compiled into debug builds only.
//!
//! `ROOST_FAULT=<phase>` makes the agent SIGKILL itself when it reaches the start of that
//! phase; `ROOST_FAULT=<phase>:pause` makes it stop there for an hour instead, so a test can
//! kill it (or look at the half-done state) at a known point. Phases, in deploy order, so
//! that between any two saves of `state.json` there is one:
//! `fetch` (before each manifest poll), `realise` (before `nix-store --realise`; the
//! pending record is saved next), `switch-intent` (pending record saved, before the intent
//! to switch a profile is), `set-profile` (intent saved, before `nix-env --set`),
//! `profile-set` (`nix-env` done, its generation not saved yet), `activate` (switch saved,
//! before its activation starts), `activation-spawned` (the activation's process started and
//! held at its start gate, its process group not yet saved), `activated` (activation done,
//! not yet recorded), `confirm` (activated and saved, before health checks), `rollback`
//! (before a rollback), `report` (before queued reports are sent).
//! Release builds ignore the variable.

/// Where phase `phase` begins: kills or pauses the agent when `ROOST_FAULT` names it.
pub fn point(phase: &str) {
    #[cfg(debug_assertions)]
    if let Ok(spec) = std::env::var("ROOST_FAULT") {
        let (p, how) = spec.split_once(':').unwrap_or((spec.as_str(), "kill"));
        if p == phase {
            tracing::warn!(phase, how, "ROOST_FAULT: injected fault");
            if how == "pause" {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
            let _ = ::nix::sys::signal::raise(::nix::sys::signal::Signal::SIGKILL);
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = phase;
}
