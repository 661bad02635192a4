//! The key layout, exactly that of etcd's `concurrency.Mutex` (go.etcd.io/etcd/client/v3/
//! concurrency/mutex.go): a lock `NAME` is the key prefix `NAME/`; each session that holds or
//! waits for it puts one key `NAME/<lease id in lowercase hex>` with its lease; the holder is the
//! key with the lowest create revision, and every other key waits for the deletion of the one
//! created just before it. So `etcdctl lock NAME` and Go's `concurrency.Mutex` on the same name
//! queue with us.
//!
//! Shared mode is ours: a shared key carries the value [`SHARED`]-marked, and a key is granted
//! when no exclusive key (any key not marked shared: ours, `etcdctl lock`'s, Go's) was created
//! before it. Go's Mutex ignores values, so to it a shared holder is an ordinary holder: it
//! excludes and queues correctly against our shared holders (it cannot share with them).
//!
//! Nothing here trusts what it parses: keys and values come from the cluster.

use crate::table::Mode;

/// The first bytes of the value of every key this crate puts.
const MAGIC: &[u8] = b"shmlock/1 ";

/// What a key's value says about its session (the keys of `etcdctl lock` and Go programs say
/// nothing: their value is empty, and they are exclusive).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyInfo {
    /// Shared mode (only keys put by shmlock can be).
    pub shared: bool,
    /// The process that put it, when shmlock put it.
    pub pid: Option<u32>,
    /// The host it ran on.
    pub host: Option<String>,
    /// When it was put, as milliseconds since the Unix epoch (by the putting host's clock).
    pub since_ms: Option<u64>,
    /// The owner's label (e.g. the command run).
    pub label: Option<String>,
}

impl KeyInfo {
    /// The mode this key holds or waits for.
    pub fn mode(&self) -> Mode {
        if self.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        }
    }
}

/// The value of a key put for `mode`: `shmlock/1 mode=M pid=P host=H since=MS label=L` (the
/// label last: it may hold spaces).
pub(crate) fn value(mode: Mode, pid: u32, host: &str, since_ms: u64, label: &str) -> Vec<u8> {
    let mode = match mode {
        Mode::Shared => "shared",
        Mode::Exclusive => "exclusive",
    };
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(format!("mode={mode} pid={pid} host={host} since={since_ms} label=").as_bytes());
    v.extend_from_slice(label.as_bytes());
    v
}

/// What a value tells; anything that is not shmlock's (an empty value, garbage) is an exclusive
/// key of someone else.
pub fn parse_value(v: &[u8]) -> KeyInfo {
    let mut info = KeyInfo::default();
    let Some(rest) = v.strip_prefix(MAGIC) else {
        return info;
    };
    let rest = String::from_utf8_lossy(rest);
    let (fields, label) = match rest.find("label=") {
        Some(at) => (&rest[..at], Some(rest[at + "label=".len()..].to_string())),
        None => (&rest[..], None),
    };
    for field in fields.split(' ') {
        match field.split_once('=') {
            Some(("mode", m)) => info.shared = m == "shared",
            Some(("pid", p)) => info.pid = p.parse().ok(),
            Some(("host", h)) if !h.is_empty() => info.host = Some(h.to_string()),
            Some(("since", s)) => info.since_ms = s.parse().ok(),
            _ => {}
        }
    }
    info.label = label.filter(|l| !l.is_empty());
    info
}

/// The key prefix of lock `name` under `prefix`: `<prefix><name>/`.
pub(crate) fn name_prefix(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(prefix.len() + name.len() + 1);
    p.extend_from_slice(prefix);
    p.extend_from_slice(name);
    p.push(b'/');
    p
}

/// The key of the session `lease` in the lock whose key prefix is `pfx` (as Go's
/// `fmt.Sprintf("%s%x", pfx, lease)`).
pub(crate) fn session_key(pfx: &[u8], lease: i64) -> Vec<u8> {
    let mut k = pfx.to_vec();
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

/// Is `key` (found under the prefix `pfx`) one session's key of that lock, rather than the key
/// of a longer name that shares the prefix (`a/b/<lease>` under `a/`)? Go's Mutex does not
/// tell them apart (to it, a lock on `a/b` also holds `a`); shmlock does, for its own clients.
pub(crate) fn is_session_key(pfx: &[u8], key: &[u8]) -> bool {
    match key.strip_prefix(pfx) {
        Some(rest) => !rest.is_empty() && rest.len() <= 16 && rest.iter().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// Splits a session key into its lock's name (under `prefix`) and its lease id; None for a key
/// that is not one (no `/`, a suffix that is not a lease id in hex).
pub(crate) fn split_session_key<'k>(prefix: &[u8], key: &'k [u8]) -> Option<(&'k [u8], i64)> {
    let rest = key.strip_prefix(prefix)?;
    let slash = rest.iter().rposition(|&b| b == b'/')?;
    let (name, lease) = (&rest[..slash], &rest[slash + 1..]);
    if name.is_empty() || lease.is_empty() || lease.len() > 16 || !lease.iter().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let lease = u64::from_str_radix(std::str::from_utf8(lease).ok()?, 16).ok()?;
    Some((name, lease as i64))
}

/// The end of the range of all keys that start with `prefix` (etcd's `WithPrefix`): `prefix`
/// with its last byte below 0xff incremented and the rest cut; `\0` (all keys) when there is
/// none.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("not empty") += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

/// One key of a lock's queue, in create-revision order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Queued {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub lease: i64,
    pub shared: bool,
}

/// How many keys at the head of `queue` (sorted by create revision) hold the lock: the first
/// key if it is exclusive, else every shared key before the first exclusive one.
pub(crate) fn holders(queue: &[Queued]) -> usize {
    match queue.first() {
        None => 0,
        Some(q) if !q.shared => 1,
        Some(_) => queue.iter().take_while(|q| q.shared).count(),
    }
}

/// Whether a key of mode `shared` may be granted behind `before` (the keys created before it,
/// in create-revision order), and if not, the key it waits for: the last key before it
/// (exclusive), or the last exclusive key before it (shared).
pub(crate) fn blocker(before: &[Queued], shared: bool) -> Option<&Queued> {
    if shared {
        before.iter().rev().find(|q| !q.shared)
    } else {
        before.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(rev: i64, shared: bool) -> Queued {
        Queued {
            key: format!("n/{rev:x}").into_bytes(),
            create_revision: rev,
            lease: rev,
            shared,
        }
    }

    #[test]
    fn keys_are_go_mutex_keys() {
        let pfx = name_prefix(b"", b"orders/42");
        assert_eq!(pfx, b"orders/42/");
        assert_eq!(session_key(&pfx, 0x694d7f3a2b1c0d0e), b"orders/42/694d7f3a2b1c0d0e");
        assert!(is_session_key(&pfx, b"orders/42/694d7f3a2b1c0d0e"));
        assert!(
            !is_session_key(&pfx, b"orders/42/7/694d7f3a2b1c0d0e"),
            "a longer name's key"
        );
        assert!(!is_session_key(&pfx, b"orders/42/"));
        assert!(!is_session_key(&pfx, b"orders/4/1"));
        assert_eq!(
            split_session_key(b"", b"orders/42/694d7f3a2b1c0d0e"),
            Some((&b"orders/42"[..], 0x694d7f3a2b1c0d0e))
        );
        assert_eq!(split_session_key(b"", b"orders/42/x1"), None);
        assert_eq!(split_session_key(b"", b"/1"), None);
        assert_eq!(split_session_key(b"", b"plain"), None);
        assert_eq!(
            split_session_key(b"", b"n/ffffffffffffffffff"),
            None,
            "longer than a lease id"
        );
        assert_eq!(split_session_key(b"p/", b"q/n/1"), None, "outside the prefix");
    }

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn values_round_trip_and_foreign_values_are_exclusive() {
        let v = value(Mode::Shared, 42, "box", 1_700_000_000_000, "run make -j 4");
        let info = parse_value(&v);
        assert!(info.shared);
        assert_eq!(info.pid, Some(42));
        assert_eq!(info.host.as_deref(), Some("box"));
        assert_eq!(info.since_ms, Some(1_700_000_000_000));
        assert_eq!(info.label.as_deref(), Some("run make -j 4"));
        assert_eq!(
            parse_value(&value(Mode::Exclusive, 1, "h", 0, "")).mode(),
            Mode::Exclusive
        );
        assert_eq!(parse_value(b""), KeyInfo::default(), "etcdctl lock's value");
        assert_eq!(
            parse_value(b"mode=shared").mode(),
            Mode::Exclusive,
            "not ours: exclusive"
        );
        let garbage = parse_value(b"shmlock/1 mode=shared pid=-1 since=x \xff\xfe label");
        assert!(garbage.shared);
        assert_eq!((garbage.pid, garbage.since_ms), (None, None));
    }

    #[test]
    fn holders_and_blockers() {
        assert_eq!(holders(&[]), 0);
        assert_eq!(holders(&[q(1, false), q(2, true)]), 1);
        assert_eq!(holders(&[q(1, true), q(2, true), q(3, false), q(4, true)]), 2);
        let before = [q(1, true), q(2, false), q(3, true)];
        assert_eq!(blocker(&before, false).map(|b| b.create_revision), Some(3));
        assert_eq!(blocker(&before, true).map(|b| b.create_revision), Some(2));
        assert_eq!(blocker(&[q(1, true)], true), None);
        assert_eq!(blocker(&[], false), None);
    }
}
