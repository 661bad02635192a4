//! The config file of `shmlockd` (`--config FILE`): `[segment]` (the name and [`Capacities`]),
//! `[gateway]` ([`GatewaySection`]) and `[daemon]` (the metrics listener). Unknown tables and
//! keys are errors that name them.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::config::Capacities;
use crate::gateway::GatewaySection;

/// The config file: `[segment]` and `[gateway]`. Unknown tables are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    segment: toml::Table,
    #[serde(default)]
    gateway: GatewaySection,
    #[serde(default)]
    daemon: RawDaemon,
}

/// `[daemon]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    #[serde(default)]
    metrics: String,
}

/// What `shmlockd`'s config file says (validated once the flags are applied; see
/// `config/shmlock.toml` for every key). The default is the built-in configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFile {
    /// `[segment] name`, if given.
    pub name: Option<String>,
    /// The rest of `[segment]`.
    pub caps: Capacities,
    /// `[gateway]`.
    pub gateway: GatewaySection,
    /// `[daemon] metrics`: the Prometheus metrics listener's address; None (`""`, the
    /// default): no metrics listener.
    pub metrics: Option<SocketAddr>,
}

impl ConfigFile {
    /// Parses config text. `[segment]` is `name` plus the fields of [`Capacities`]; serde's
    /// `deny_unknown_fields` names any unknown key.
    pub fn parse(text: &str) -> Result<ConfigFile> {
        let file: RawFile = toml::from_str(text)?;
        let mut seg = file.segment;
        let name = match seg.remove("name") {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(v) => {
                return Err(anyhow!(
                    "[segment] name: expected a string such as \"/shmlock\", found {v}"
                ))
            }
        };
        let caps: Capacities = toml::Value::Table(seg).try_into().context("[segment]")?;
        let metrics = parse_metrics_addr(&file.daemon.metrics, "[daemon] metrics")?;
        Ok(ConfigFile {
            name,
            caps,
            gateway: file.gateway,
            metrics,
        })
    }

    /// Reads and parses the file at `path`; errors name it.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        ConfigFile::parse(&text).with_context(|| format!("config {}", path.display()))
    }
}

/// Parses a metrics listener address, IP:PORT (`what` names the setting in the error); `""`
/// is None (no listener).
pub fn parse_metrics_addr(text: &str, what: &str) -> Result<Option<SocketAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        anyhow!("{what}: {text:?} is not an address IP:PORT such as \"127.0.0.1:9464\" (\"\" = no metrics)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::DEFAULT_SEGMENT;

    #[test]
    fn example_config_equals_the_built_in_defaults() {
        let c = ConfigFile::parse(include_str!("../../config/shmlock.toml")).unwrap();
        assert_eq!(c.caps, Capacities::default());
        assert_eq!(c.name.as_deref(), Some(DEFAULT_SEGMENT));
        assert_eq!(c.gateway, GatewaySection::default());
        assert_eq!(c.metrics, None, "metrics are off by default");
    }

    #[test]
    fn the_metrics_address_is_parsed_and_a_bad_one_named() {
        let c = ConfigFile::parse("[daemon]\nmetrics = \"127.0.0.1:9464\"\n").unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        let c = ConfigFile::parse("[daemon]\nmetrics = \"[::1]:0\"\n").unwrap();
        assert_eq!(c.metrics, Some("[::1]:0".parse().unwrap()));
        assert_eq!(ConfigFile::parse("[daemon]\nmetrics = \"\"\n").unwrap().metrics, None);
        for bad in ["localhost:9464", "9464", "127.0.0.1"] {
            let e = format!(
                "{:#}",
                ConfigFile::parse(&format!("[daemon]\nmetrics = \"{bad}\"\n")).unwrap_err()
            );
            assert!(e.contains("[daemon] metrics") && e.contains(bad), "{e}");
        }
        let e = format!("{:#}", ConfigFile::parse("[daemon]\nmetric = \"x\"\n").unwrap_err());
        assert!(e.contains("metric"), "{e}");
    }

    #[test]
    fn empty_config_is_the_defaults() {
        assert_eq!(
            ConfigFile::parse("").unwrap(),
            ConfigFile {
                name: None,
                caps: Capacities::default(),
                gateway: GatewaySection::default(),
                metrics: None,
            }
        );
        assert_eq!(ConfigFile::parse("[segment]\n").unwrap().caps, Capacities::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = format!("{:#}", ConfigFile::parse("[segment]\nmax_lock = 5\n").unwrap_err());
        assert!(e.contains("max_lock"), "{e}");
        let e = format!("{:#}", ConfigFile::parse("[gateway]\nport = 1\n").unwrap_err());
        assert!(e.contains("port"), "{e}");
        let e = format!("{:#}", ConfigFile::parse("[gatewya]\n").unwrap_err());
        assert!(e.contains("gatewya"), "{e}");
        let e = format!("{:#}", ConfigFile::parse("[segment]\nname = 5\n").unwrap_err());
        assert!(e.contains("name"), "{e}");
    }
}
