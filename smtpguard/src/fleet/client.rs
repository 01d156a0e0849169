//! Connecting to etcd as `[fleet]` says: endpoints, TLS with rustls
//! (mutual when `cert` and `key` are set), user and password.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::FleetConfig;

use super::FleetError;

/// gRPC keepalive interval: etcd refuses pings under 5 s (its minimum ping
/// interval) and closes the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to one endpoint.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One unary request (get, put, txn, status).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects and checks that a member answers (`Client::connect` alone
/// succeeds while etcd is down).
///
/// # Errors
///
/// [`FleetError`] naming the file that could not be read, or etcd being
/// unreachable.
pub async fn connect(config: &FleetConfig) -> Result<Client, FleetError> {
    let mut options = ConnectOptions::new()
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| FleetError::ReadFile {
                path: path.to_owned(),
                source,
            })
        };
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(t);
    }
    if let Some(auth) = &config.auth {
        let text = std::fs::read_to_string(&auth.password_file).map_err(|source| {
            FleetError::ReadFile {
                path: auth.password_file.clone(),
                source,
            }
        })?;
        let password = text.lines().next().unwrap_or("").to_owned();
        options = options.with_user(auth.user.clone(), password);
    }
    // One member per connection, the next one first each time: the client
    // keeps sending to a dead member of a multi-endpoint channel, so a
    // session sticks to one member and a failure moves on to the next.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = config.endpoints.len();
    let first = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut last = FleetError::Timeout("connecting");
    for i in 0..n {
        let endpoint = &config.endpoints[(first + i) % n];
        match connect_one(endpoint, options.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_one(endpoint: &str, options: ConnectOptions) -> Result<Client, FleetError> {
    let connect = Client::connect([endpoint], Some(options));
    let mut client = tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, connect)
        .await
        .map_err(|_| FleetError::Timeout("connecting"))?
        .map_err(|e| FleetError::Etcd("connecting", e))?;
    tokio::time::timeout(REQUEST_TIMEOUT, client.status())
        .await
        .map_err(|_| FleetError::Timeout("asking for the status"))?
        .map_err(|e| FleetError::Etcd("asking for the status", e))?;
    Ok(client)
}
