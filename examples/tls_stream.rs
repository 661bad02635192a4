//! Remote `stream` over TLS against plain TCP, in one run: one client per gateway doing
//! lock+unlock pairs back to back, in alternating blocks, on two gateways of one scratch
//! segment (one plain, one TLS with a certificate made here). Prints pairs/s of each and the ratio.
//!
//! ```sh
//! cargo run --release --example tls_stream            # 5 blocks of 1 s each
//! cargo run --release --example tls_stream -- 10 0.5  # 10 blocks of 0.5 s
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use shmlock::gateway::{self, GatewayConfig, TlsFiles};
use shmlock::remote::{ConnectOptions, RemoteClient, TlsOptions};
use shmlock::{Capacities, LockTable};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let blocks: usize = args.first().map_or(Ok(5), |a| a.parse())?;
    let secs: f64 = args.get(1).map_or(Ok(1.0), |a| a.parse())?;

    let dir = std::env::temp_dir().join(format!("shmlock-tls-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca_key = KeyPair::generate()?;
    let ca = ca.self_signed(&ca_key)?;
    let leaf_key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&leaf_key, &ca, &ca_key)?;
    let (ca_file, cert, key) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&ca_file, ca.pem())?;
    std::fs::write(&cert, leaf.pem())?;
    std::fs::write(&key, leaf_key.serialize_pem())?;

    let segment = format!("/shmlock-tls-stream-{}", std::process::id());
    let table = Arc::new(LockTable::create_or_open(&segment, &Capacities::default())?);
    let listen = "127.0.0.1:0".parse()?;
    let plain_gw = gateway::serve(
        GatewayConfig {
            listen,
            ..GatewayConfig::default()
        },
        table.clone(),
    )?;
    let tls_gw = gateway::serve(
        GatewayConfig {
            listen,
            tls: Some(TlsFiles { cert, key }),
            ..GatewayConfig::default()
        },
        table.clone(),
    )?;
    let plain = RemoteClient::connect(plain_gw.local_addr())?;
    let options = ConnectOptions {
        tls: Some(TlsOptions {
            ca_file,
            server_name: None,
        }),
        ..ConnectOptions::default()
    };
    let tls = RemoteClient::connect_with(tls_gw.local_addr(), &options)?;

    let block = |c: &RemoteClient| -> Result<f64, shmlock::Error> {
        let (start, mut pairs) = (Instant::now(), 0u64);
        while start.elapsed() < Duration::from_secs_f64(secs) {
            c.lock("stream")?.unlock()?;
            pairs += 1;
        }
        Ok(pairs as f64 / start.elapsed().as_secs_f64())
    };
    block(&plain)?;
    block(&tls)?;
    let (mut p, mut t) = (Vec::new(), Vec::new());
    for _ in 0..blocks {
        p.push(block(&plain)?);
        t.push(block(&tls)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, t) = (median(&mut p), median(&mut t));
    println!("remote stream, plain TCP: {p:>9.0} pairs/s (median of {blocks} blocks of {secs} s)");
    println!("remote stream, TLS:       {t:>9.0} pairs/s");
    println!("TLS / plain:              {:>9.2}", t / p);
    drop((plain, tls, plain_gw, tls_gw));
    shmlock::Segment::unlink(&segment)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
