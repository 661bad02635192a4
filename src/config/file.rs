//! The config file of `shmlockd` (`--config FILE`): `[segment]` (the name and [`Capacities`])
//! and `[gateway]` ([`GatewaySection`]). Unknown tables and keys are errors that name them.

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
        Ok(ConfigFile {
            name,
            caps,
            gateway: file.gateway,
        })
    }

    /// Reads and parses the file at `path`; errors name it.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        ConfigFile::parse(&text).with_context(|| format!("config {}", path.display()))
    }
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
    }

    #[test]
    fn empty_config_is_the_defaults() {
        assert_eq!(
            ConfigFile::parse("").unwrap(),
            ConfigFile {
                name: None,
                caps: Capacities::default(),
                gateway: GatewaySection::default(),
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
