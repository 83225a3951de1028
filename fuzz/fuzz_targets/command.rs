//! Control messages into the gateway: commands (`diredi/v1/{gw}/command`, `CommandMsg::parse`)
//! and the cloud's knowledge receipts (`diredi/v1/{gw}/knowledge/ack`, parsed with serde_json
//! as the gateway does). Neither panics; what parses survives a JSON round trip.
#![no_main]

use diredi_protocol::messages::{CommandMsg, KnowledgeAckMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match CommandMsg::parse(data) {
        Ok(cmd) => {
            let text = serde_json::to_vec(&cmd).expect("a command serialises");
            assert_eq!(CommandMsg::parse(&text), Ok(cmd));
        }
        Err(e) => {
            assert_eq!(e.kind(), "malformed_command");
            assert!(!e.to_string().is_empty());
        }
    }
    if let Ok(ack) = serde_json::from_slice::<KnowledgeAckMsg>(data) {
        let text = serde_json::to_vec(&ack).expect("an ack serialises");
        let back: KnowledgeAckMsg = serde_json::from_slice(&text).expect("an ack reparses");
        assert_eq!(back, ack);
    }
});
