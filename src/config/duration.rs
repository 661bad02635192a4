//! The one duration grammar of shmlock (the config file and every command-line flag).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A duration that does not parse: its text, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    text: String,
    why: Option<String>,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.why {
            // A bare number: the unit is what is missing.
            None => write!(
                f,
                "{} is not a duration: write it with a unit, e.g. \"{}s\"",
                self.text, self.text
            ),
            Some(why) => write!(
                f,
                "{:?} is not a duration ({why}): write a number with a unit, e.g. \"250ms\", \"1.5s\", \"5m\", \"1h\"",
                self.text
            ),
        }
    }
}

impl std::error::Error for DurationError {}

/// The one duration grammar of shmlock, for the config file and every command-line flag: a
/// number with a unit (humantime's), e.g. `250ms`, `30s`, `1.5s`, `5m`, `1h`, `1h 30m`; `0s` is
/// zero. A bare number is refused with an error that shows the form with a unit.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, DurationError> {
    let t = text.trim();
    if !t.is_empty() && t.parse::<f64>().is_ok() {
        return Err(DurationError {
            text: t.to_string(),
            why: None,
        });
    }
    humantime::parse_duration(t).map_err(|e| DurationError {
        text: text.to_string(),
        why: Some(e.to_string()),
    })
}

/// serde `deserialize_with` helper for a duration kept as its text (the gateway's `[gateway]`
/// keys): a string in the grammar of [`parse_duration`], checked here so that the config file's
/// error points at the key; a number is refused with the form it should have.
pub fn duration_text<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    use serde::de::Error as _;
    let text = match toml_like::Value::deserialize(d)? {
        toml_like::Value::Text(s) => s,
        toml_like::Value::Number(n) => n,
    };
    parse_duration(&text).map_err(D::Error::custom)?;
    Ok(text)
}

/// serde `deserialize_with` helper for a [`Duration`] field: as [`duration_text`], parsed.
pub fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    use serde::de::Error as _;
    let text = duration_text(d)?;
    parse_duration(&text).map_err(D::Error::custom)
}

mod toml_like {
    use serde::de::{self, Visitor};
    use std::fmt;

    /// A string, or a number kept as written (to show it back in the error).
    pub(super) enum Value {
        Text(String),
        Number(String),
    }

    impl<'de> serde::Deserialize<'de> for Value {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Value;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a duration with a unit, e.g. \"30s\"")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
                    Ok(Value::Text(v.to_string()))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
                    Ok(Value::Number(v.to_string()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
                    Ok(Value::Number(v.to_string()))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
                    Ok(Value::Number(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_hours_and_fractions() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("1h 30m"), Duration::from_secs(5400));
        assert_eq!(ok("0s"), Duration::ZERO);
        // What the gateway's own parser took before: spaces around and inside.
        assert_eq!(ok(" 60s "), Duration::from_secs(60));
        assert_eq!(ok("60 s"), Duration::from_secs(60));
    }

    #[test]
    fn a_bare_number_is_refused_with_the_form_it_should_have() {
        let e = |s: &str| parse_duration(s).unwrap_err().to_string();
        assert_eq!(e("30"), "30 is not a duration: write it with a unit, e.g. \"30s\"");
        assert_eq!(e("1.5"), "1.5 is not a duration: write it with a unit, e.g. \"1.5s\"");
        let soon = e("soon");
        assert!(soon.starts_with("\"soon\" is not a duration"), "{soon}");
        assert!(soon.contains("250ms") && soon.contains("1h"), "{soon}");
    }

    #[test]
    #[cfg(feature = "daemon")] // toml
    fn a_number_in_the_file_where_a_duration_belongs_shows_the_form() {
        #[derive(Debug, Deserialize)]
        struct T {
            #[serde(deserialize_with = "deserialize_duration")]
            idle_timeout: Duration,
        }
        let e = toml::from_str::<T>("idle_timeout = 30").unwrap_err().to_string();
        assert!(e.contains("idle_timeout = 30"), "the error does not show the key: {e}");
        assert!(
            e.contains("30 is not a duration: write it with a unit, e.g. \"30s\""),
            "{e}"
        );
        let t: T = toml::from_str("idle_timeout = \"1h\"").unwrap();
        assert_eq!(t.idle_timeout, Duration::from_secs(3600));
    }
}
