//! Helpers the inference stage's tests share.

#![allow(dead_code, unreachable_pub)]

use sluice_core::backend::Receipt;
use sluice_core::envelope::{ContentType, Envelope, Payload, RecordId};
use sluice_core::worker::{Delivery, Origin};

/// A delivery from the inference queue of record `id`, whose vector is in the feature store.
pub fn delivery(id: &str) -> Delivery {
    let mut envelope = Envelope::inline(RecordId::parse(id).unwrap(), "test", ContentType::Png, Vec::new());
    envelope.payload = Payload::Released;
    Delivery {
        body: envelope.to_json(),
        attributes: Default::default(),
        receive_count: 1,
        first_received_ms: None,
        origin: Origin::Queue(Receipt(id.into())),
    }
}
