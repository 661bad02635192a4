//! shmlockd's Prometheus metrics, scraped over HTTP from the real binary and parsed by a strict
//! parser of the text format: what real processes hold and wait for, owners by kind, gateway
//! sessions, the counters after a holder is SIGKILLed, the capacities; a listener that cannot
//! bind stops shmlockd with nothing left behind; silent, garbage-sending and flooding clients
//! stall neither the metrics nor the gateway.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use shmlock::remote::RemoteClient;
use shmlock::shm::{SEGMENT_ENV, SEGMENT_OWNER_ENV};
use shmlock::Error;

use common::{await_file, signal, wait_until, ChildCtx, GatewayDaemon, Raw, TestEnv, DEADLINE};

common::child_roles! {
    "hold" => role_hold,
    "waiter" => role_waiter,
}

/// Locks `name` in `mode` (exclusive or shared), signals `ready`, waits for `release`, unlocks.
fn role_hold(ctx: &ChildCtx) {
    let name: String = ctx.param("name");
    let client = ctx.client("metrics-hold");
    let g = match ctx.param::<String>("mode").as_str() {
        "exclusive" => client.lock(&name),
        _ => client.lock_shared(&name),
    }
    .expect("lock");
    signal(&ctx.path(&ctx.param::<String>("ready")), "");
    await_file(&ctx.path(&ctx.param::<String>("release")));
    g.unlock().expect("unlock");
}

/// Waits for `name` (exclusive; for `timeout_ms` if given: a timeout signals `done` with "T"),
/// signals `done` with "+" once granted, waits for `release`, unlocks.
fn role_waiter(ctx: &ChildCtx) {
    let name: String = ctx.param("name");
    let client = ctx.client("metrics-waiter");
    let done = ctx.path(&ctx.param::<String>("done"));
    let g = match ctx.opt_param("timeout_ms") {
        None => client.lock(&name),
        Some(ms) => client.try_lock_for(&name, Duration::from_millis(ms.parse().expect("timeout_ms"))),
    };
    match g {
        Err(Error::TimedOut { .. }) => signal(&done, "T"),
        g => {
            let g = g.expect("lock");
            signal(&done, "+");
            await_file(&ctx.path(&ctx.param::<String>("release")));
            g.unlock().expect("unlock");
        }
    }
}

// ---- a strict parser of the Prometheus text format (version 0.0.4) ---------------------------

/// One scrape: every sample by name and labels (sorted), and every family's type.
#[derive(Debug)]
struct Scrape {
    samples: HashMap<(String, Labels), f64>,
    types: HashMap<String, String>,
}

impl Scrape {
    /// The value of the sample `name{labels}`; fails if there is none.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.sort();
        *self
            .samples
            .get(&(name.to_string(), l))
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the scrape"))
    }

    fn int(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self.get(name, labels);
        assert!(v >= 0.0 && v.fract() == 0.0, "{name}{labels:?} = {v} is not a count");
        v as u64
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

/// A sample's labels, as `(name, value)`.
type Labels = Vec<(String, String)>;

/// `{k="v",...}` at the start of `s`: the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("no {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let key = &rest[..eq];
        if !valid_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..].strip_prefix('"').ok_or("label value without \"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling \\")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} twice"));
        }
        labels.push((key.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by ,".into());
        }
    }
}

/// Parses a scrape; any line that is not HELP, TYPE or a sample of a family declared before it
/// (with a name, labels and a value of the format) fails.
fn parse(text: &str) -> Result<Scrape, String> {
    let mut samples = HashMap::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').ok_or_else(|| at("HELP without text".into()))?;
            if !valid_name(name) || helps.insert(name.into(), help.into()).is_some() {
                return Err(at("bad or repeated HELP".into()));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').ok_or_else(|| at("TYPE without a type".into()))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                return Err(at(format!("unknown type {ty}")));
            }
            if !valid_name(name) || types.insert(name.into(), ty.into()).is_some() {
                return Err(at("bad or repeated TYPE".into()));
            }
            current = Some(name.into());
        } else if line.starts_with('#') || line.is_empty() {
            return Err(at("unexpected comment or blank line".into()));
        } else {
            let end = line
                .find(['{', ' '])
                .ok_or_else(|| at("sample without a value".into()))?;
            let name = &line[..end];
            let (mut labels, rest) = if line[end..].starts_with('{') {
                parse_labels(&line[end..]).map_err(at)?
            } else {
                (Vec::new(), &line[end..])
            };
            let value = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("no space before the value".into()))?;
            let value = parse_value(value).map_err(at)?;
            if current.as_deref() != Some(name) {
                return Err(at(format!("sample {name} outside its family")));
            }
            if types[name] == "counter" && !name.ends_with("_total") {
                return Err(at("counter not named _total".into()));
            }
            labels.sort();
            if samples.insert((name.to_string(), labels), value).is_some() {
                return Err(at("repeated sample".into()));
            }
        }
    }
    if let Some(name) = types.keys().find(|k| !helps.contains_key(*k)) {
        return Err(format!("{name} has no HELP"));
    }
    Ok(Scrape { samples, types })
}

#[test]
fn the_parser_is_strict() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total 3\n# HELP b B.\n# TYPE b gauge\nb{x=\"1\",y=\"a\\\"b\"} 2.5\nb{x=\"2\"} +Inf\n";
    let s = parse(good).unwrap();
    assert_eq!(s.get("a_total", &[]), 3.0);
    assert_eq!(s.get("b", &[("y", "a\"b"), ("x", "1")]), 2.5);
    for bad in [
        "a 1\n",
        "# HELP a A.\n# TYPE a gauge\na 1\na 1\n",
        "# HELP a A.\n# TYPE a gauge\nb 1\n",
        "# HELP a A.\n# TYPE a counter\na 1\n",
        "# HELP a A.\n# TYPE a gauge\na{x=1} 1\n",
        "# HELP a A.\n# TYPE a gauge\na one\n",
        "# TYPE a gauge\na 1\n",
        "# HELP a A.\n# TYPE a gauge\n\na 1\n",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

// ---- HTTP ---------------------------------------------------------------------------------------

/// Sends `request` and reads the whole answer (the server closes): status code, headers, body.
fn http(addr: &str, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .expect("read the answer (a deadline passed?)");
    let answer = String::from_utf8(answer).expect("UTF-8 answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head: {answer:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    (status, head.to_string(), body.to_string())
}

/// `GET /metrics`, checked (200, the text format's content type, a length that matches) and
/// parsed.
fn scrape(addr: &str) -> Scrape {
    let (status, head, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n\r\n");
    assert_eq!(status, 200, "{head}\n{body}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert!(lower.contains(&format!("content-length: {}", body.len())), "{head}");
    parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// The metrics address a shmlockd logged (`metrics ready listen=ADDR`).
fn metrics_addr(d: &GatewayDaemon) -> String {
    let mut addr = String::new();
    wait_until("shmlockd to log its metrics address", || {
        let log = d.log();
        if let Some(i) = log.find("metrics ready listen=") {
            addr = log[i + "metrics ready listen=".len()..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
        }
        !addr.is_empty()
    });
    addr
}

const METRICS_ON: &str = "[daemon]\nmetrics = \"127.0.0.1:0\"\n";

/// A scrape that satisfies `cond`, scraping again until one does (fails after the deadline).
fn scrape_until(addr: &str, what: &str, mut cond: impl FnMut(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    wait_until(what, || {
        let s = scrape(addr);
        let ok = cond(&s);
        last = Some(s);
        ok
    });
    last.unwrap()
}

// ---- the tests ----------------------------------------------------------------------------------

#[test]
fn a_scrape_reports_what_real_processes_hold_and_wait_for() {
    let env = TestEnv::new("metrics");
    let d = GatewayDaemon::start(&env, Some(METRICS_ON));
    let addr = metrics_addr(&d);

    let s = scrape(&addr);
    for (name, ty) in [
        ("shmlock_locks_held", "gauge"),
        ("shmlock_locks_waited_on", "gauge"),
        ("shmlock_waiters", "gauge"),
        ("shmlock_oldest_wait_seconds", "gauge"),
        ("shmlock_waiters_by_wait_seconds", "gauge"),
        ("shmlock_owners", "gauge"),
        ("shmlock_gateway_sessions", "gauge"),
        ("shmlock_grants_total", "counter"),
        ("shmlock_waits_total", "counter"),
        ("shmlock_timeouts_total", "counter"),
        ("shmlock_handoffs_total", "counter"),
        ("shmlock_reaps_total", "counter"),
        ("shmlock_repairs_total", "counter"),
        ("shmlock_pool_records", "gauge"),
        ("shmlock_pool_capacity", "gauge"),
        ("shmlock_segment_size_bytes", "gauge"),
    ] {
        assert_eq!(s.types.get(name).map(String::as_str), Some(ty), "{name}");
    }
    assert!(
        s.types.keys().all(|k| k.starts_with("shmlock_")),
        "{:?}",
        s.types.keys()
    );
    // Nothing happens yet: the daemon itself holds and waits for nothing.
    assert_eq!(s.int("shmlock_locks_held", &[]), 0);
    assert_eq!(s.int("shmlock_waiters", &[]), 0);
    assert_eq!(s.int("shmlock_owners", &[("kind", "local")]), 0);
    // The capacities are the segment's.
    let caps = common::small_caps();
    assert_eq!(s.int("shmlock_max_locks", &[]), u64::from(caps.max_locks));
    assert_eq!(s.int("shmlock_max_holds", &[]), u64::from(caps.max_holds));
    assert_eq!(s.int("shmlock_max_owners", &[]), u64::from(caps.max_owners));
    let size = std::fs::metadata(Path::new("/dev/shm").join(&env.segment[1..]))
        .unwrap()
        .len();
    assert_eq!(s.int("shmlock_segment_size_bytes", &[]), size);
    let pools = env.table.pool_counts();
    for (pool, label) in [(&pools[0], "entry"), (&pools[1], "hold"), (&pools[2], "owner")] {
        assert_eq!(
            s.int("shmlock_pool_capacity", &[("pool", label)]),
            pool.capacity,
            "{label}"
        );
        let states: u64 = pool
            .states
            .iter()
            .map(|(st, _)| {
                s.int(
                    "shmlock_pool_records",
                    &[("pool", label), ("state", &st.to_ascii_lowercase())],
                )
            })
            .sum();
        assert_eq!(states, pool.capacity, "{label}: the states add up to the capacity");
    }
    let grants0 = s.int("shmlock_grants_total", &[]);

    // Two holders (one exclusive, one shared), a waiter for the exclusive one, a remote session
    // holding a third lock.
    let x = env.spawn(
        "hold",
        &[
            ("name", &"m/x"),
            ("mode", &"exclusive"),
            ("ready", &"x-ready"),
            ("release", &"x-release"),
        ],
    );
    let sh = env.spawn(
        "hold",
        &[
            ("name", &"m/s"),
            ("mode", &"shared"),
            ("ready", &"s-ready"),
            ("release", &"s-release"),
        ],
    );
    await_file(&env.path("x-ready"));
    await_file(&env.path("s-ready"));
    let w = env.spawn(
        "waiter",
        &[("name", &"m/x"), ("done", &"w-done"), ("release", &"w-release")],
    );
    env.wait_for("the waiter to queue", |t| t.stats().waiting == 1);
    let remote = RemoteClient::connect(d.addr.as_str()).expect("connect to the gateway");
    let rg = remote.lock("m/r").expect("remote lock");

    let s = scrape(&addr);
    assert_eq!(s.int("shmlock_locks_held", &[]), 3, "m/x, m/s, m/r");
    assert_eq!(s.int("shmlock_locks_waited_on", &[]), 1, "m/x");
    assert_eq!(s.int("shmlock_waiters", &[]), 1);
    assert_eq!(s.int("shmlock_shared_holds", &[]), 1);
    assert_eq!(
        s.int("shmlock_owners", &[("kind", "local")]),
        3,
        "two holders and the waiter"
    );
    assert_eq!(s.int("shmlock_owners", &[("kind", "remote")]), 1);
    assert_eq!(s.int("shmlock_gateway_sessions", &[]), 1);
    assert_eq!(s.int("shmlock_waiters_by_wait_seconds", &[("le", "+Inf")]), 1);
    let mut last = 0;
    for le in ["0.001", "0.01", "0.1", "0.5", "1", "5", "30", "300", "+Inf"] {
        let n = s.int("shmlock_waiters_by_wait_seconds", &[("le", le)]);
        assert!(n >= last, "buckets are cumulative: le={le} has {n} < {last}");
        last = n;
    }
    assert!(s.get("shmlock_oldest_wait_seconds", &[]) > 0.0);
    assert!(s.int("shmlock_waits_total", &[]) >= 1);
    assert!(s.int("shmlock_grants_total", &[]) >= grants0 + 3);
    assert_eq!(
        s.int("shmlock_pool_records", &[("pool", "hold"), ("state", "waiting")]),
        1
    );
    assert_eq!(
        s.int("shmlock_pool_records", &[("pool", "owner"), ("state", "live")]),
        4
    );

    // SIGKILL the exclusive holder: shmlockd reaps it and hands m/x to the waiter.
    let reaps0 = s.int("shmlock_reaps_total", &[]);
    let handoffs0 = s.int("shmlock_handoffs_total", &[]);
    env.kill(x);
    await_file(&env.path("w-done"));
    let s = scrape_until(&addr, "the reap to show", |s| {
        s.int("shmlock_reaps_total", &[]) > reaps0
    });
    assert_eq!(s.int("shmlock_reaps_total", &[]), reaps0 + 1);
    assert!(
        s.int("shmlock_handoffs_total", &[]) > handoffs0,
        "m/x went to its waiter"
    );
    assert_eq!(s.int("shmlock_waiters", &[]), 0);
    assert_eq!(s.int("shmlock_locks_waited_on", &[]), 0);
    assert_eq!(s.int("shmlock_owners", &[("kind", "local")]), 2);
    assert_eq!(s.int("shmlock_locks_held", &[]), 3, "m/x (the waiter's now), m/s, m/r");

    // A waiter that times out.
    let timeouts0 = s.int("shmlock_timeouts_total", &[]);
    let t = env.spawn(
        "waiter",
        &[
            ("name", &"m/s"),
            ("timeout_ms", &30),
            ("done", &"t-done"),
            ("release", &"t-release"),
        ],
    );
    // m/s is held shared and the waiter asks exclusive: it must time out.
    assert_eq!(await_file(&env.path("t-done")), "T");
    env.wait_success(t);
    let s = scrape(&addr);
    assert_eq!(s.int("shmlock_timeouts_total", &[]), timeouts0 + 1);

    // The remote session ends: its lock and its owner go.
    rg.unlock().expect("remote unlock");
    drop(remote);
    let s = scrape_until(&addr, "the gateway session to end", |s| {
        s.int("shmlock_gateway_sessions", &[]) == 0
    });
    assert_eq!(s.int("shmlock_owners", &[("kind", "remote")]), 0);
    assert_eq!(s.int("shmlock_locks_held", &[]), 2);

    signal(&env.path("s-release"), "");
    signal(&env.path("w-release"), "");
    env.wait_success(w);
    env.wait_success(sh);
    assert_eq!(env.table.check(), Vec::<String>::new());
}

fn shmlockd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlockd"));
    cmd.env_remove(SEGMENT_ENV)
        .env_remove(SEGMENT_OWNER_ENV)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs shmlockd that must fail to start; its exit code and stderr.
fn failed_start(mut cmd: Command) -> (Option<i32>, String) {
    let child = cmd.spawn().expect("spawn shmlockd");
    let out = common::within("shmlockd to fail", move || child.wait_with_output().expect("wait"));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_metrics_address_that_cannot_be_bound_stops_shmlockd_and_leaves_no_segment() {
    let segment = format!("/shmlock-t-metrics-bind-{}", std::process::id());
    let shm = Path::new("/dev/shm").join(&segment[1..]);
    let _ = std::fs::remove_file(&shm);
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();

    let mut cmd = shmlockd();
    cmd.args(["--segment", &segment, "--no-gateway", "--metrics", &addr]);
    let (code, err) = failed_start(cmd);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("shmlockd: cannot start the metrics listener on {addr}")),
        "{err}"
    );
    assert!(
        err.to_ascii_lowercase().contains("address"),
        "the reason is given: {err}"
    );
    assert!(!shm.exists(), "a failed start left segment {segment}");

    // The same from the config file, with the gateway on.
    let dir = std::env::temp_dir().join(&segment[1..]);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("shmlock.toml");
    std::fs::write(
        &config,
        format!("[gateway]\nlisten = \"127.0.0.1:0\"\n[daemon]\nmetrics = \"{addr}\"\n"),
    )
    .unwrap();
    let mut cmd = shmlockd();
    cmd.args(["--segment", &segment]).arg("--config").arg(&config);
    let (code, err) = failed_start(cmd);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot start the metrics listener on {addr}")),
        "{err}"
    );
    assert!(!shm.exists(), "a failed start left segment {segment}");

    // Not an address at all: named, and nothing created.
    let mut cmd = shmlockd();
    cmd.args(["--segment", &segment, "--no-gateway", "--metrics", "localhost"]);
    let (code, err) = failed_start(cmd);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--metrics") && err.contains("\"localhost\""), "{err}");
    assert!(!shm.exists());
    let _ = std::fs::remove_dir_all(&dir);
    drop(busy);
}

#[test]
fn silent_garbage_and_flooding_clients_stall_neither_the_metrics_nor_the_gateway() {
    let env = TestEnv::new("metrics-abuse");
    let d = GatewayDaemon::start(&env, Some(METRICS_ON));
    let addr = metrics_addr(&d);

    // Connections that never send a byte, more than the listener reads at once.
    let silent: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(&addr).expect("connect")).collect();
    // One that sends an endless request head.
    let mut endless = TcpStream::connect(&addr).expect("connect");
    endless.set_write_timeout(Some(DEADLINE)).unwrap();
    let junk = vec![b'x'; 1024];
    let mut sent = 0;
    while sent < 64 * 1024 {
        match endless.write(&junk) {
            Ok(n) => sent += n,
            Err(_) => break, // closed on us: as it should be
        }
    }
    // Garbage, a wrong method, a wrong path, HEAD.
    let (status, _, _) = http(&addr, "\x16\x03\x01\x00\x7fgarbage\r\n\r\n");
    assert_eq!(status, 400);
    let (status, head, _) = http(&addr, "POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    let (status, _, _) = http(&addr, "GET /nope HTTP/1.1\r\n\r\n");
    assert_eq!(status, 404);
    let (status, head, body) = http(&addr, "HEAD /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200, "{head}");
    assert!(body.is_empty(), "HEAD has no body");

    // A scraper still gets its metrics, and the gateway still answers, while all that is open.
    let s = scrape(&addr);
    assert_eq!(s.int("shmlock_locks_held", &[]), 0);
    let mut raw = Raw::connect(d.addr.as_str());
    assert_eq!(raw.ask("p PING"), "p PONG");
    let remote = RemoteClient::connect(d.addr.as_str()).expect("connect to the gateway");
    let g = remote
        .lock("abuse/x")
        .expect("remote lock while the metrics are flooded");
    let s = scrape(&addr);
    assert_eq!(s.int("shmlock_gateway_sessions", &[]), 2);
    assert_eq!(s.int("shmlock_locks_held", &[]), 1);
    g.unlock().unwrap();

    // The oldest silent connections were closed to make room for the new ones.
    let mut first = silent.into_iter().next().unwrap();
    first.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = Vec::new();
    let _ = first.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "a connection closed for room gets nothing: {:?}",
        String::from_utf8_lossy(&buf)
    );
    drop(endless);
    let mut d = d;
    let (_, status) = d.terminate();
    assert!(status.success(), "{}", d.log());
}

#[test]
fn metrics_are_off_by_default() {
    let env = TestEnv::new("metrics-off");
    let d = GatewayDaemon::start(&env, None);
    wait_until("shmlockd to run", || d.log().contains("running; stop with"));
    assert!(!d.log().contains("metrics ready"), "{}", d.log());
}
