//! `--remote HOST:PORT`: the options, and `locks` and `status` through shmlockd's gateway.
//!
//! The queries go through `shmlock::remote::RemoteClient` (as `run --remote` does, see `exec`),
//! whose `LOCKS` and `STATUS` answers are the same snapshots the local commands render; this
//! module only says what went wrong in the CLI's words.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use shmlock::proto::admin::{self, CheckReport};
use shmlock::proto::ErrorCode;
use shmlock::remote::{ConnectOptions, RemoteClient, TlsOptions};
use shmlock::table::LockInfo;
use shmlock::Error;

use crate::render::{CheckOutcome, Status};

/// How long connecting to the gateway may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one answer may take to arrive (`STATUS CHECK` walks the whole table).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment variable holding the gateway's secret (when no --auth-token-file is given).
pub(crate) const TOKEN_ENV: &str = "SHMLOCK_AUTH_TOKEN";

/// Where the gateway is and how to authenticate: the `--remote` options of a subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct RemoteArgs {
    /// Ask shmlockd's gateway at HOST:PORT (e.g. 10.0.0.5:7411) instead of opening the segment.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) remote: Option<String>,
    /// With --remote: a file whose first line is the gateway's secret [default: $SHMLOCK_AUTH_TOKEN].
    #[arg(long, value_name = "FILE", requires = "remote")]
    pub(crate) auth_token_file: Option<PathBuf>,
    /// With --remote: speak TLS, trusting the CA certificates in this PEM file (and only those)
    /// to have signed the gateway's certificate.
    #[arg(long, value_name = "FILE", requires = "remote")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the gateway's certificate must carry [default: the host of
    /// --remote].
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub(crate) tls_server_name: Option<String>,
}

impl RemoteArgs {
    /// The secret: the first line of --auth-token-file, else `$SHMLOCK_AUTH_TOKEN` if set and
    /// not empty, else none.
    pub(crate) fn token(&self) -> Result<Option<String>> {
        if let Some(path) = &self.auth_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                bail!(
                    "the token file {} is empty (its first line is the secret)",
                    path.display()
                );
            }
            return Ok(Some(token));
        }
        Ok(std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()))
    }

    /// The TLS options, if --tls-ca asks for TLS; the server name defaults to the host part of
    /// `addr` (a DNS name or an IP address).
    pub(crate) fn tls(&self, addr: &str) -> Option<TlsOptions> {
        let ca_file = self.tls_ca.clone()?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some(TlsOptions {
            ca_file,
            server_name: Some(self.tls_server_name.clone().unwrap_or_else(|| host.to_string())),
        })
    }
}

/// What to say when the gateway wants a token and none was given.
pub(crate) fn token_needed(addr: &str) -> anyhow::Error {
    anyhow!(
        "the gateway at {addr} requires authentication: give its secret with --auth-token-file FILE \
         or ${TOKEN_ENV}"
    )
}

/// One connection to a gateway, authenticated if it asked.
#[derive(Debug)]
pub(crate) struct Gateway {
    addr: String,
    client: RemoteClient,
}

impl Gateway {
    /// Connects to `addr` as `args` say (TLS, the secret), reads the greeting, and sends `AUTH`
    /// if a secret is given.
    pub(crate) fn connect(addr: &str, args: &RemoteArgs) -> Result<Gateway> {
        let token = args.token()?;
        let token = token.as_deref();
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve the gateway address {addr} (want HOST:PORT)"))?
            .collect();
        let options = ConnectOptions {
            auth_token: token.map(str::to_string),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            tls: args.tls(addr),
        };
        let client = RemoteClient::connect_with(addrs.as_slice(), &options).map_err(|e| match e {
            Error::Connection { why, .. } => anyhow!(
                "cannot connect to the gateway at {addr}: {why} (is shmlockd running there, with its gateway on?)"
            ),
            Error::ProtocolVersion { found, expected, .. } => {
                anyhow!("the gateway at {addr} speaks protocol version {found}; this shmlock speaks version {expected}")
            }
            Error::Remote {
                code: ErrorCode::AuthFailed,
                message,
            } => anyhow!("the gateway at {addr} refused the token: {message}"),
            Error::Remote { code, message } => {
                anyhow!("the gateway at {addr} refused the connection: {code} {message}")
            }
            e => anyhow!(e).context(format!("cannot connect to the gateway at {addr}")),
        })?;
        if client.hello().auth_required && token.is_none() {
            return Err(token_needed(addr));
        }
        Ok(Gateway {
            addr: addr.to_string(),
            client,
        })
    }

    /// The error for a query `verb` that failed.
    fn refused(&self, verb: &str, e: Error) -> anyhow::Error {
        let addr = &self.addr;
        match e {
            Error::Remote {
                code: ErrorCode::AuthFailed,
                message,
            } => anyhow!("the gateway at {addr} refused the token: {message}"),
            Error::Remote {
                code: ErrorCode::AuthRequired,
                ..
            } => token_needed(addr),
            Error::Remote {
                code: ErrorCode::UnknownCommand,
                ..
            } => anyhow!("the gateway at {addr} does not serve {verb} (a shmlockd older than this shmlock?)"),
            Error::Remote { code, message } => anyhow!("the gateway at {addr} answered {verb} with {code}: {message}"),
            Error::Connection { why, .. } => anyhow!("gateway {addr}: {why}"),
            e => anyhow!("the gateway at {addr} answered {verb} with an error: {e}"),
        }
    }

    /// Every lock held or waited on whose name starts with `prefix`, page by page (each page
    /// starts after the cursor the previous one ended with, so every lock held throughout comes
    /// once; the walk ends, since each cursor lies beyond the last).
    pub(crate) fn locks(&mut self, prefix: Option<&[u8]>) -> Result<Vec<LockInfo>> {
        self.client.locks(prefix).map_err(|e| self.refused("LOCKS", e))
    }

    /// `STATUS CHECK`, as the local `status` shows it.
    pub(crate) fn status(&mut self) -> Result<Status> {
        let answer = self.client.status(true).map_err(|e| self.refused("STATUS", e))?;
        let check = match answer.check {
            CheckReport::Skipped => CheckOutcome::NotRun("the gateway did not run it"),
            CheckReport::Consistent => CheckOutcome::Consistent,
            CheckReport::Violations { total, mut shown } => {
                let more = total.saturating_sub(shown.len() as u64);
                if more > 0 {
                    shown.push(format!(
                        "... and {more} more (the gateway sends the first {})",
                        admin::MAX_VIOLATIONS
                    ));
                }
                CheckOutcome::Violations(shown)
            }
        };
        Ok(Status::new(answer.report, check))
    }
}
