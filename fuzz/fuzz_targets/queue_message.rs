//! A message body as the stages read one another's: an envelope (features reads it), an
//! inferred record (results), a stored result (review, the API). Parsed or refused, never a
//! panic; what parses writes back out and reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::envelope::Envelope;
use sluice_core::record::{InferredRecord, PredictionResult};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::from_json(data) {
        assert_eq!(Envelope::from_json(&envelope.to_json()).unwrap(), envelope);
    }
    if let Ok(record) = InferredRecord::from_json(data) {
        assert_eq!(InferredRecord::from_json(&record.to_json()).unwrap().envelope, record.envelope);
    }
    let _ = serde_json::from_slice::<PredictionResult>(data);
    let mut skipped = 0;
    let _ = sluice_core::capture::parse_lines(data, &mut skipped);
});
