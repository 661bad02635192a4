//! TLS on the gateway, end to end with certificates this test makes (rcgen): a remote client
//! that trusts the CA locks through a TLS gateway; a wrong CA, an expired certificate, a name
//! the certificate does not carry, a plain client against TLS and a TLS client against plain
//! each get a clear error, while a good session beside them never notices; a handshake that
//! never comes does not hold the gateway; bad certificate files stop the gateway (and shmlockd,
//! which then leaves no segment) before it serves; the CLI's `--remote --tls-ca`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, DEADLINE};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use shmlock::gateway::{self, Gateway, GatewayConfig, TlsFiles};
use shmlock::remote::{ConnectOptions, RemoteClient, TlsOptions};
use shmlock::Error;

/// A CA, and a certificate it signed for `localhost` and 127.0.0.1, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Another CA, which signed nothing of the gateway's.
    other_ca: PathBuf,
    /// A certificate for the same names, expired, signed by `ca`.
    expired_cert: PathBuf,
    expired_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(ca: &(rcgen::Certificate, KeyPair), expired: bool) -> (String, String) {
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "shmlockd test");
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let authority = ca("shmlock test CA");
        let (cert, key) = leaf(&authority, false);
        let (expired_cert, expired_key) = leaf(&authority, true);
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        Pki {
            ca: write("ca.pem", &authority.0.pem()),
            cert: write("cert.pem", &cert),
            key: write("key.pem", &key),
            other_ca: write("other-ca.pem", &ca("another CA").0.pem()),
            expired_cert: write("expired-cert.pem", &expired_cert),
            expired_key: write("expired-key.pem", &expired_key),
        }
    }
}

fn tls_gateway(env: &TestEnv, cert: &Path, key: &Path) -> Gateway {
    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        // Also the time a handshake may take: a client that sends none is closed after it.
        line_timeout: Some(Duration::from_secs(1)),
        tls: Some(TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }),
        ..GatewayConfig::default()
    };
    gateway::serve(config, Arc::clone(&env.table)).expect("start a TLS gateway")
}

fn connect(gw: &Gateway, ca: &Path, name: Option<&str>) -> shmlock::Result<RemoteClient> {
    let options = ConnectOptions {
        connect_timeout: Some(DEADLINE),
        read_timeout: Some(DEADLINE),
        tls: Some(TlsOptions {
            ca_file: ca.to_path_buf(),
            server_name: name.map(str::to_string),
        }),
        ..ConnectOptions::default()
    };
    RemoteClient::connect_with(gw.local_addr(), &options)
}

/// The reason in a connection error, for assertions.
fn why(r: shmlock::Result<RemoteClient>) -> String {
    match r {
        Err(Error::Connection { why, .. }) => why,
        Err(e) => panic!("expected a connection error, got {e:?}"),
        Ok(_) => panic!("expected a connection error, got a client"),
    }
}

#[test]
fn a_client_that_trusts_the_ca_locks_through_a_tls_gateway() {
    let env = TestEnv::new("tls-ok");
    let pki = Pki::new(&env.dir);
    let gw = tls_gateway(&env, &pki.cert, &pki.key);
    let a = connect(&gw, &pki.ca, Some("localhost")).expect("TLS by name");
    // The server name defaults to the address connected to (an IP address the certificate has).
    let b = connect(&gw, &pki.ca, None).expect("TLS by IP address");
    let g = a.lock("tls/1").expect("lock through TLS");
    assert!(matches!(b.try_lock("tls/1"), Err(Error::WouldBlock)));
    // The lock is a lock of the segment.
    let local = env.client("local");
    assert!(matches!(local.try_lock("tls/1"), Err(Error::WouldBlock)));
    let first = g.token();
    g.unlock().expect("unlock");
    let g = b.try_lock_for("tls/1", DEADLINE).expect("b after a");
    assert!(g.token() > first);
    drop(g);
    // Pipelined waits and admin queries work over TLS as over TCP.
    assert!(b.ping().is_ok());
    let held = a.lock("tls/2").expect("lock");
    assert!(b
        .locks(None)
        .expect("LOCKS over TLS")
        .iter()
        .any(|l| l.name == b"tls/2"));
    drop(held);
}

#[test]
fn bad_certificates_and_mismatched_peers_get_clear_errors_and_others_never_notice() {
    let env = TestEnv::new("tls-bad");
    let pki = Pki::new(&env.dir);
    let gw = tls_gateway(&env, &pki.cert, &pki.key);
    // A good session holds a lock all along.
    let good = connect(&gw, &pki.ca, None).expect("a good client");
    let held = good.lock("kept").expect("lock");

    let e = why(connect(&gw, &pki.other_ca, None));
    assert!(e.contains("certificate") && e.contains("UnknownIssuer"), "{e}");
    let e = why(connect(&gw, &pki.ca, Some("other.example")));
    assert!(e.contains("certificate not valid for name"), "{e}");
    // A plain client against the TLS gateway: the gateway waits for a handshake that never
    // comes and closes; the client is told TLS may be the reason.
    let plain = ConnectOptions {
        read_timeout: Some(Duration::from_secs(15)),
        ..ConnectOptions::default()
    };
    let e = why(RemoteClient::connect_with(gw.local_addr(), &plain));
    assert!(e.contains("TLS"), "{e}");

    // An expired certificate on another gateway of the same segment.
    let expired = tls_gateway(&env, &pki.expired_cert, &pki.expired_key);
    let e = why(connect(&expired, &pki.ca, None));
    assert!(e.contains("certificate expired"), "{e}");
    // A TLS client against a plain gateway.
    let plain_gw = gateway::serve(
        GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..GatewayConfig::default()
        },
        Arc::clone(&env.table),
    )
    .unwrap();
    let e = why(connect(&plain_gw, &pki.ca, None));
    assert!(e.contains("TLS") || e.contains("corrupt"), "{e}");

    // The good session never noticed.
    assert!(good.ping().is_ok());
    assert!(matches!(
        connect(&gw, &pki.ca, None).unwrap().try_lock("kept"),
        Err(Error::WouldBlock)
    ));
    held.unlock().expect("still held by the good session");
}

#[test]
fn handshakes_that_never_come_do_not_hold_the_gateway() {
    let env = TestEnv::new("tls-slow");
    let pki = Pki::new(&env.dir);
    let gw = tls_gateway(&env, &pki.cert, &pki.key);
    // Silent connections, and one that sends garbage instead of a ClientHello.
    let mut silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(gw.local_addr()).unwrap()).collect();
    let mut garbage = TcpStream::connect(gw.local_addr()).unwrap();
    garbage.write_all(b"1 LOCK x\n").unwrap();
    garbage.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    // The gateway answers garbage with a TLS alert or by closing; never with a protocol line.
    let n = garbage.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..n].starts_with(b"*"),
        "a plaintext greeting over TLS: {:?}",
        &buf[..n]
    );
    // A good client is served meanwhile.
    let c = connect(&gw, &pki.ca, None).expect("a good client beside silent ones");
    c.lock("through").expect("lock").unlock().expect("unlock");
    silent.clear();
}

#[test]
fn bad_certificate_files_stop_the_gateway_before_it_serves() {
    let env = TestEnv::new("tls-files");
    let pki = Pki::new(&env.dir);
    let bind = |cert: &Path, key: &Path| {
        gateway::bind(GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: Some(TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }),
            ..GatewayConfig::default()
        })
        .map(|_| ())
    };
    let missing = env.dir.join("missing.pem");
    let e = bind(&missing, &pki.key).unwrap_err().to_string();
    assert!(e.contains("gateway.tls_cert") && e.contains("missing.pem"), "{e}");
    let e = bind(&pki.cert, &missing).unwrap_err().to_string();
    assert!(e.contains("gateway.tls_key"), "{e}");
    // A key that is not the certificate's.
    let e = bind(&pki.cert, &pki.expired_key).unwrap_err().to_string();
    assert!(e.contains("gateway.tls_key"), "{e}");
    // A file that holds no certificate.
    let e = bind(&pki.key, &pki.key).unwrap_err().to_string();
    assert!(e.contains("no certificate"), "{e}");

    // shmlockd with such a config exits with the reason and leaves no segment.
    let segment = format!("{}-d", env.segment);
    let config = env.dir.join("shmlock.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            missing.display().to_string(),
            pki.key.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shmlockd"))
        .args(["--segment", &segment, "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("gateway.tls_cert"), "{stderr}");
    assert!(
        !Path::new(&format!("/dev/shm{segment}")).exists(),
        "a failed start left its segment"
    );
}

#[test]
fn the_cli_speaks_tls_with_tls_ca() {
    let env = TestEnv::new("tls-cli");
    let pki = Pki::new(&env.dir);
    let gw = tls_gateway(&env, &pki.cert, &pki.key);
    let addr = gw.local_addr().to_string();
    let shmlock = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shmlock"))
            .args(args)
            .env_remove("SHMLOCK_AUTH_TOKEN")
            .output()
            .unwrap()
    };
    let ca = pki.ca.display().to_string();
    let out = shmlock(&["status", "--remote", &addr, "--tls-ca", &ca]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = shmlock(&["run", "--remote", &addr, "--tls-ca", &ca, "cli/tls", "--", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let other = pki.other_ca.display().to_string();
    let out = shmlock(&["locks", "--remote", &addr, "--tls-ca", &other]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
}
