//! SenML sensor packs (RFC 8428): first byte = channel configuration (see
//! `diredi_fuzz::sensor_setup`), the rest = the payload. Inputs of another format are kept
//! out of this corpus.
#![no_main]

use diredi_protocol::sensor::{detect_format, Format};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((&cfg, payload)) = data.split_first() else {
        return Corpus::Reject;
    };
    if detect_format(payload) != Some(Format::Senml) {
        return Corpus::Reject;
    }
    diredi_fuzz::check_sensor(payload, cfg);
    Corpus::Keep
});
