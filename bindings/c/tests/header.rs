//! include/shmlock.h is what cbindgen makes of src/ with cbindgen.toml: CI fails when the
//! checked-in header is stale. `SHMLOCK_BLESS=1` rewrites it.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = dir.join("include/shmlock.h");
    if std::env::var_os("SHMLOCK_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write the header");
        return;
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "bindings/c/include/shmlock.h is stale (or missing): regenerate it with\n    \
         SHMLOCK_BLESS=1 cargo test -p shmlock-c --test header\nand commit it"
    );
}
