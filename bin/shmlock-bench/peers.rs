//! Redis and PostgreSQL as lock managers (cargo feature `peers`), on servers the user points the
//! bench at with `--redis-url` and `--pg-url`.
//!
//! - Redis: lock = `SET key token NX PX 30000`, retried at once while it answers nil (Redis has no
//!   blocking lock); unlock = compare-and-delete, a Lua script run with `EVALSHA`.
//! - PostgreSQL: session-level advisory locks, `pg_advisory_lock(k)` / `pg_advisory_unlock(k)`
//!   with k a 64-bit FNV-1a hash of the name, through prepared statements.
//!
//! Keys and hashes are of `{prefix}:{name}`, the prefix naming this bench process, so two benches
//! on one server never share a lock by accident.

use anyhow::{bail, ensure, Context, Result};

use crate::peer::Peer;

/// Compare-and-delete: deletes the key only if it still holds our token.
const UNLOCK_SCRIPT: &str =
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

/// Lock time-to-live of the Redis locks, in milliseconds.
const TTL_MS: u64 = 30_000;

pub(crate) struct RedisPeer {
    con: redis::Connection,
    keys: Vec<String>,
    token: String,
    script: redis::Script,
}

impl RedisPeer {
    pub(crate) fn connect(url: &str, prefix: &str, names: &[String]) -> Result<RedisPeer> {
        let client = redis::Client::open(url).with_context(|| format!("redis url {url:?}"))?;
        let mut con = client
            .get_connection()
            .with_context(|| format!("connect to redis at {url}"))?;
        let script = redis::Script::new(UNLOCK_SCRIPT);
        script.prepare_invoke().load(&mut con).context("redis SCRIPT LOAD")?;
        let token = format!(
            "{}-{}",
            std::process::id(),
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?
        );
        Ok(RedisPeer {
            con,
            keys: names.iter().map(|n| format!("{prefix}:{n}")).collect(),
            token,
            script,
        })
    }

    fn set_nx(&self, i: usize) -> redis::Cmd {
        let mut c = redis::cmd("SET");
        c.arg(&self.keys[i]).arg(&self.token).arg("NX").arg("PX").arg(TTL_MS);
        c
    }
}

impl Peer for RedisPeer {
    fn name(&self) -> &'static str {
        "redis"
    }

    #[inline]
    fn lock(&mut self, i: usize) -> Result<()> {
        loop {
            let r: Option<String> = self.set_nx(i).query(&mut self.con).context("redis SET NX")?;
            if r.is_some() {
                return Ok(());
            }
        }
    }

    #[inline]
    fn unlock(&mut self, i: usize) -> Result<()> {
        let deleted: i64 = self
            .script
            .key(&self.keys[i])
            .arg(&self.token)
            .invoke(&mut self.con)
            .context("redis EVALSHA (compare-and-delete)")?;
        ensure!(deleted == 1, "redis: {} was not ours to delete", self.keys[i]);
        Ok(())
    }

    fn pipelined(&mut self, i: usize, depth: usize) -> Result<()> {
        let mut p = redis::pipe();
        for _ in 0..depth {
            p.add_command(self.set_nx(i));
            p.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(1)
                .arg(&self.keys[i])
                .arg(&self.token);
        }
        let answers: Vec<redis::Value> = p.query(&mut self.con).context("redis pipeline")?;
        ensure!(
            answers.len() == 2 * depth,
            "redis: {} answers to {} commands",
            answers.len(),
            2 * depth
        );
        for pair in answers.chunks(2) {
            match pair {
                [redis::Value::Okay, redis::Value::Int(1)] => {}
                other => bail!("redis pipeline: expected OK and 1, got {other:?}"),
            }
        }
        Ok(())
    }
}

pub(crate) struct PgPeer {
    client: postgres::Client,
    keys: Vec<i64>,
    lock: postgres::Statement,
    unlock: postgres::Statement,
}

/// FNV-1a, 64 bits: the advisory lock key of a name.
fn fnv1a(bytes: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

impl PgPeer {
    pub(crate) fn connect(url: &str, prefix: &str, names: &[String]) -> Result<PgPeer> {
        let mut client = postgres::Client::connect(url, postgres::NoTls)
            .with_context(|| format!("connect to postgresql at {url}"))?;
        let lock = client.prepare("SELECT pg_advisory_lock($1)").context("prepare lock")?;
        let unlock = client
            .prepare("SELECT pg_advisory_unlock($1)")
            .context("prepare unlock")?;
        Ok(PgPeer {
            client,
            keys: names
                .iter()
                .map(|n| fnv1a(format!("{prefix}:{n}").as_bytes()))
                .collect(),
            lock,
            unlock,
        })
    }
}

impl Peer for PgPeer {
    fn name(&self) -> &'static str {
        "postgres"
    }

    #[inline]
    fn lock(&mut self, i: usize) -> Result<()> {
        self.client
            .execute(&self.lock, &[&self.keys[i]])
            .context("pg_advisory_lock")?;
        Ok(())
    }

    #[inline]
    fn unlock(&mut self, i: usize) -> Result<()> {
        let row = self
            .client
            .query_one(&self.unlock, &[&self.keys[i]])
            .context("pg_advisory_unlock")?;
        ensure!(
            row.get::<_, bool>(0),
            "postgresql: advisory lock {} was not held",
            self.keys[i]
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_known_values() {
        assert_eq!(super::fnv1a(b"") as u64, 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a") as u64, 0xaf63_dc4c_8601_ec8c);
    }
}
