//! Metered networks (docs/protocol.md §7.13): NetworkManager's `Metered` property, read over
//! the system D-Bus. No bus, or no NetworkManager on it, means "not metered"; so does any
//! answer that takes longer than two seconds.

use std::time::Duration;

use zbus::zvariant::OwnedValue;

const NM: &str = "org.freedesktop.NetworkManager";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const TIMEOUT: Duration = Duration::from_secs(2);

/// NetworkManager's `NMMetered` values that mean "metered": `YES` (1) and `GUESS_YES` (3).
pub fn nm_value_is_metered(v: u32) -> bool {
    v == 1 || v == 3
}

/// Whether the connection is metered, by the system bus (`DBUS_SYSTEM_BUS_ADDRESS`, else the
/// standard socket).
pub async fn is_metered() -> bool {
    match tokio::time::timeout(TIMEOUT, query()).await {
        Ok(Ok(v)) => nm_value_is_metered(v),
        Ok(Err(e)) => {
            tracing::debug!("NetworkManager not asked ({e}): not metered");
            false
        }
        Err(_) => {
            tracing::debug!("NetworkManager did not answer within 2 s: not metered");
            false
        }
    }
}

async fn query() -> zbus::Result<u32> {
    let conn = zbus::Connection::system().await?;
    metered_on(&conn).await
}

/// NetworkManager's `Metered` value on `conn`.
pub async fn metered_on(conn: &zbus::Connection) -> zbus::Result<u32> {
    let reply = conn
        .call_method(Some(NM), NM_PATH, Some(PROPERTIES), "Get", &(NM, "Metered"))
        .await?;
    let v: OwnedValue = reply.body().deserialize()?;
    u32::try_from(v).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_and_guess_yes_are_metered() {
        let metered: Vec<u32> = (0..5).filter(|v| nm_value_is_metered(*v)).collect();
        assert_eq!(metered, vec![1, 3]);
    }
}
