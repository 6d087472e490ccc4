//! A DLQ message as an operator's tools read it back: attributes (the first line, a JSON object
//! of strings, as SQS message attributes arrive) and the body after it, for every DLQ and the
//! review queue. Whatever a queue holds, it reads as an item: never a panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use sluice_core::backend::{Receipt, ReceivedMessage};
use sluice_core::dlq::{Item, Letters};

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&data[..0], data),
    };
    let attributes: BTreeMap<String, String> = serde_json::from_slice(head).unwrap_or_default();
    for letters in Letters::ALL {
        let message = ReceivedMessage {
            id: "m".into(),
            body: body.to_vec(),
            attributes: attributes.clone(),
            receipt: Receipt("r".into()),
            receive_count: 1,
            sent_at_ms: 1,
            first_received_ms: None,
        };
        let item = Item::from_message(letters, message);
        let _ = item.record_id();
    }
});
