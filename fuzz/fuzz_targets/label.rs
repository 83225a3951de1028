//! Label messages (`diredi/v1/{gw}/label/{sensor}`): `LabelMsg::parse` never panics, errors
//! are typed, an accepted range is not empty, and an accepted label survives a JSON round trip.
#![no_main]

use diredi_protocol::messages::LabelMsg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match LabelMsg::parse(data) {
        Ok(label) => {
            if let LabelMsg::Range { from_ts, to_ts, .. } = &label {
                assert!(from_ts <= to_ts);
            }
            assert!(label.class().len() <= data.len());
            let text = serde_json::to_vec(&label).expect("a label serialises");
            assert_eq!(LabelMsg::parse(&text).as_ref(), Ok(&label));
        }
        Err(e) => {
            assert!(
                matches!(e.kind(), "malformed_label" | "empty_range"),
                "{e:?}"
            );
            assert!(!e.to_string().is_empty());
        }
    }
});
