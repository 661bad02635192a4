//! The one mapping between the library's [`Error`] and the protocol's [`ErrorCode`]s, both ways.
//!
//! The gateway answers a library error with [`encode_error_for`]; the remote client turns an
//! error answer back into an [`Error`] with [`error_of`]. Codes that have a library variant
//! (`BUSY`, `TIMEOUT`, `BAD_NAME`, `ALREADY_HELD`, `NOT_HELD`, `TABLE_FULL`, `CANCELLED`) come
//! back as that variant; the protocol's own codes (limits, authentication, framing) come back as
//! [`Error::Remote`] with the typed code.
//!
//! Some answers carry facts as `key=value` words at the start of their message (an extension of
//! version 1 that older clients read as part of the free text): `TIMEOUT` carries `waited_ms`,
//! and, when the lock was held at the deadline, the holder's `pid`, `label` (escaped as
//! [`encode_word`](super::encode_word) does), `held_ms` and `holders`; `BAD_NAME` carries `len`
//! and `max`; `TABLE_FULL` carries `pool` (escaped), `capacity` and, for a per-shard pool,
//! `shard`.

use std::io::Write as _;
use std::time::Duration;

use super::{decode_word, encode_word, ErrorCode};
use crate::error::{Error, HolderInfo};

/// The pools a `TABLE_FULL` answer may name (the table's, as [`Error::PoolFull`] names them).
const POOLS: [&str; 3] = ["lock entry", "hold/wait", "owner"];

/// The protocol's code for a library error (`INTERNAL` for errors of the server itself).
pub fn code_of(e: &Error) -> ErrorCode {
    match e {
        Error::WouldBlock => ErrorCode::Busy,
        Error::TimedOut { .. } => ErrorCode::Timeout,
        Error::AlreadyHeld => ErrorCode::AlreadyHeld,
        Error::NotHeld => ErrorCode::NotHeld,
        Error::NameInvalid { .. } => ErrorCode::BadName,
        Error::PoolFull { .. } => ErrorCode::TableFull,
        Error::Cancelled => ErrorCode::Cancelled,
        Error::Remote { code, .. } => *code,
        _ => ErrorCode::Internal,
    }
}

/// Appends `tag ERR CODE [key=value ...] message\n` for `e`.
pub fn encode_error_for(out: &mut Vec<u8>, tag: &str, e: &Error) {
    let mut facts = Vec::new();
    match e {
        Error::TimedOut { waited, holder } => {
            let _ = write!(facts, "waited_ms={}", waited.as_millis());
            if let Some(h) = holder {
                let _ = write!(facts, " pid={} label=", h.pid);
                encode_word(&mut facts, h.label.as_bytes());
                let _ = write!(facts, " held_ms={} holders={}", h.held_for.as_millis(), h.holders);
            }
            facts.push(b' ');
        }
        Error::NameInvalid { len, max } => {
            let _ = write!(facts, "len={len} max={max} ");
        }
        Error::PoolFull { pool, shard, capacity } => {
            facts.extend_from_slice(b"pool=");
            encode_word(&mut facts, pool.as_bytes());
            let _ = write!(facts, " capacity={capacity} ");
            if let Some(s) = shard {
                let _ = write!(facts, "shard={s} ");
            }
        }
        _ => {}
    }
    // Facts are printable ASCII words (escaped); the message is what people read.
    let message = match e {
        Error::Remote { message, .. } => message.clone(),
        e => e.to_string(),
    };
    let mut msg = String::from_utf8(facts).unwrap_or_default();
    msg.push_str(&message);
    super::encode_error(out, tag, code_of(e), &msg);
}

/// The `key=value` words at the start of `message`, and the rest.
fn facts(message: &str) -> (Vec<(&str, &str)>, &str) {
    let mut kv = Vec::new();
    let mut rest = message;
    // At most a few: a message is never scanned for more than its leading words.
    while kv.len() < 8 {
        let word = rest.split(' ').next().unwrap_or("");
        let Some((k, v)) = word.split_once('=') else { break };
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            break;
        }
        kv.push((k, v));
        rest = rest[word.len()..].trim_start_matches(' ');
    }
    (kv, rest)
}

fn fact<T: std::str::FromStr>(kv: &[(&str, &str)], key: &str) -> Option<T> {
    kv.iter().find(|(k, _)| *k == key).and_then(|(_, v)| v.parse().ok())
}

/// The library error for an error answer with `code` and `message`. `TIMEOUT`'s `waited` is
/// `waited_ms` if the answer carries it, else `waited` (what the client measured).
pub fn error_of(code: ErrorCode, message: &str, waited: Duration) -> Error {
    let (kv, text) = facts(message);
    match code {
        ErrorCode::Busy => Error::WouldBlock,
        ErrorCode::AlreadyHeld => Error::AlreadyHeld,
        ErrorCode::NotHeld => Error::NotHeld,
        ErrorCode::Cancelled => Error::Cancelled,
        ErrorCode::Timeout => {
            let holder = fact::<u32>(&kv, "pid").map(|pid| HolderInfo {
                pid,
                label: kv
                    .iter()
                    .find(|(k, _)| *k == "label")
                    .and_then(|(_, v)| decode_word(v.as_bytes()))
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
                held_for: Duration::from_millis(fact(&kv, "held_ms").unwrap_or(0)),
                holders: fact(&kv, "holders").unwrap_or(1),
            });
            Error::TimedOut {
                waited: fact(&kv, "waited_ms").map_or(waited, Duration::from_millis),
                holder,
            }
        }
        ErrorCode::BadName => match (fact(&kv, "len"), fact(&kv, "max")) {
            (Some(len), Some(max)) => Error::NameInvalid { len, max },
            _ => Error::Remote {
                code,
                message: text.to_string(),
            },
        },
        ErrorCode::TableFull => Error::PoolFull {
            pool: kv
                .iter()
                .find(|(k, _)| *k == "pool")
                .and_then(|(_, v)| decode_word(v.as_bytes()))
                .and_then(|p| POOLS.iter().copied().find(|n| n.as_bytes() == p))
                .unwrap_or("gateway's lock table"),
            shard: fact(&kv, "shard"),
            capacity: fact(&kv, "capacity").unwrap_or(0),
        },
        code => Error::Remote {
            code,
            message: message.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_response, Response, CODES};
    use super::*;

    fn answer(e: &Error) -> (ErrorCode, String) {
        let mut out = Vec::new();
        encode_error_for(&mut out, "t", e);
        match parse_response(&out).unwrap() {
            Response::Error {
                tag: "t",
                code: Some(code),
                message,
                ..
            } => (code, message.to_string()),
            r => panic!("{r:?}"),
        }
    }

    /// Every code the gateway can send comes back as an error that maps to the same code.
    #[test]
    fn every_code_round_trips_through_error() {
        for (code, _) in CODES {
            let e = error_of(code, "some words", Duration::ZERO);
            assert_eq!(code_of(&e), code, "{code} -> {e:?}");
            let (back, _) = answer(&e);
            assert_eq!(back, code);
        }
    }

    /// Every library error the gateway sends comes back as the same variant, with its facts.
    #[test]
    fn every_error_the_gateway_sends_round_trips_to_its_variant() {
        let holder = HolderInfo {
            pid: 4711,
            label: "10.0.0.5:40122 run x".into(),
            held_for: Duration::from_millis(3200),
            holders: 2,
        };
        let sent = [
            Error::WouldBlock,
            Error::AlreadyHeld,
            Error::NotHeld,
            Error::Cancelled,
            Error::TimedOut {
                waited: Duration::from_millis(250),
                holder: Some(holder.clone()),
            },
            Error::TimedOut {
                waited: Duration::from_millis(7),
                holder: None,
            },
            Error::NameInvalid { len: 66, max: 64 },
            Error::PoolFull {
                pool: "hold/wait",
                shard: Some(3),
                capacity: 368,
            },
        ];
        for e in sent {
            let (code, message) = answer(&e);
            let back = error_of(code, &message, Duration::from_secs(99));
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{e:?} -> {back:?}"
            );
            match (&e, &back) {
                (Error::TimedOut { waited: a, holder: ha }, Error::TimedOut { waited: b, holder: hb }) => {
                    assert_eq!((a, ha), (b, hb));
                }
                (Error::NameInvalid { len: a, max: m }, Error::NameInvalid { len: b, max: n }) => {
                    assert_eq!((a, m), (b, n));
                }
                (
                    Error::PoolFull { pool, shard, capacity },
                    Error::PoolFull {
                        pool: p,
                        shard: s,
                        capacity: c,
                    },
                ) => assert_eq!((pool, shard, capacity), (p, s, c)),
                _ => {}
            }
            // People still read the library's own message.
            assert!(message.ends_with(&e.to_string()), "{message}");
        }
        // An answer without the facts (an older gateway) still gives the variant.
        let e = error_of(ErrorCode::Timeout, "timed out after 5ms", Duration::from_millis(5));
        assert!(matches!(e, Error::TimedOut { holder: None, waited } if waited == Duration::from_millis(5)));
    }
}
