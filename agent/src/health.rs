//! Health checks of DESIGN §3: commands that must exit 0 and HTTP GETs that must answer 2xx,
//! retried until they pass or the confirmation deadline passes.

use std::time::Duration;

use roost_common::wire::v1::{HealthCheck, HealthResult};
use tokio::time::Instant;

use crate::activate::{self, Outcome};

/// Runs one check once.
pub async fn check_once(client: &reqwest::Client, check: &HealthCheck) -> HealthResult {
    let timeout = Duration::from_secs(check.timeout_s().max(1));
    let (ok, detail) = match check {
        HealthCheck::Command { argv, .. } => match activate::run(argv, &[], None, timeout).await {
            Outcome::Ok => (true, String::new()),
            other => (false, other.describe(&format!("`{}`", argv.join(" ")))),
        },
        HealthCheck::Http { url, .. } => match client.get(url).timeout(timeout).send().await {
            Ok(r) if r.status().is_success() => (true, String::new()),
            Ok(r) => (false, format!("GET {url} answered {}", r.status())),
            Err(e) => (false, format!("GET {url}: {e}")),
        },
    };
    HealthResult {
        name: check.name(),
        ok,
        detail,
    }
}

/// Runs every check until all pass or `deadline`; returns the last results.
pub async fn confirm(
    client: &reqwest::Client,
    checks: &[HealthCheck],
    deadline: Instant,
) -> (bool, Vec<HealthResult>) {
    loop {
        let mut results = Vec::with_capacity(checks.len());
        for c in checks {
            results.push(check_once(client, c).await);
        }
        let all_ok = results.iter().all(|r| r.ok);
        if all_ok || Instant::now() + Duration::from_secs(1) >= deadline {
            return (all_ok, results);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
