//! Integration tests of the cloud worker: the whole DiReDi cycle over a real broker, with the
//! gateway, the cloud worker service and the user's side in one process.
//!
//! They need ONNX Runtime (`scripts/fetch-onnxruntime.sh`), the HAPT data
//! (`scripts/fetch-hapt.sh`) and the shipped model; without them they skip with a message,
//! unless `DIREDI_REQUIRE_DATA` is set, in which case they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "cloud_worker/e2e.rs"]
mod e2e;
#[path = "cloud_worker/perf.rs"]
mod perf;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Skips (returns false) or, with `DIREDI_REQUIRE_DATA`, fails when `what` is missing.
pub fn available(what: &str, found: bool) -> bool {
    if found {
        return true;
    }
    assert!(
        std::env::var_os("DIREDI_REQUIRE_DATA").is_none(),
        "DIREDI_REQUIRE_DATA is set but {what} is missing"
    );
    eprintln!("skipping: {what} is missing");
    false
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
