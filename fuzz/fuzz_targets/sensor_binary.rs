//! `DRB1` binary sensor frames: first byte = channel configuration (see
//! `diredi_fuzz::sensor_setup`), the rest = everything after the magic (channels, flags,
//! timestamp, frames), so no input is wasted on the magic itself.
#![no_main]

use diredi_protocol::sensor::BINARY_MAGIC;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, rest)) = data.split_first() else {
        return;
    };
    let mut payload = Vec::with_capacity(BINARY_MAGIC.len() + rest.len());
    payload.extend_from_slice(BINARY_MAGIC);
    payload.extend_from_slice(rest);
    diredi_fuzz::check_sensor(&payload, cfg);
});
